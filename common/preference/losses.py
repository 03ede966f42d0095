"""Pairwise preference losses over sequence log-probabilities (or scalar rewards), in float32.

Each loss takes per-pair arrays [B] (what `scoring.score_pairs` and `reference.reference_logps`
give) and an optional `mask` [B] (1 for a real pair, 0 for padding or a non-preference item; any
non-negative weights work), and returns a `LossOutput`: the weighted mean loss over the kept
pairs, the per-pair losses times the mask (0 where masked out, so a mixed batch can add them to
other items' losses) and metrics named as TRL logs them (`rewards/chosen`, `rewards/rejected`,
`rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`; tunix's DPO trainer
logs the same quantities as `rewards/margin`, `rewards/accuracy`, `log_probs/*`). Everything is
jit-able and differentiable with respect to the policy's log-probs; metrics are computed under
stop_gradient.

Which reduction each loss expects (the caller passes it; `scoring.SequenceLogps` has all three):
  dpo, ipo, hinge, cdpo: summed log pi(y|x)            (`.sum`)
  simpo, orpo:           length-normalised log-probs    (`.mean`)
TRL length-normalises IPO (its authors' choice); pass `.mean` to ipo for that, `.sum` for the
paper's sequence-level form.

With h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)):
  DPO (Rafailov et al. 2023, Eq. 7):   -log sigmoid(beta h)
  cDPO (label smoothing eps; Mitchell 2023; TRL, tunix):
                                       -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
  IPO (Azar et al. 2023, Eq. 17):      (h - 1/(2 beta))^2
  hinge (SLiC, Zhao et al. 2023):      max(0, 1 - beta h)
  SimPO (Meng et al. 2024, Eq. 6):     -log sigmoid(beta (mean_w - mean_l) - gamma)
  ORPO (Hong et al. 2024, Eqs. 4-7):   nll_w - lam log sigmoid(log odds(y_w) - log odds(y_l)),
                                       odds(y) = P / (1 - P), log P = mean token log-prob
  Bradley-Terry (reward heads):        -log sigmoid(r_w - r_l - margin)
  CDPO (FusionRoute, Eq. 3):           -log sigmoid(beta h + stop_gradient(bias)),
                                       bias = beta (log pi_exp(y_w) - log pi_exp(y_l))
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Largest length-normalised log-prob ORPO's odds accept: P = 1 (log P = 0) has infinite odds.
# -1e-6 keeps log(1 - P) finite in float32 (about -13.8) and moves no realistic sequence.
_MAX_MEAN_LOGP = -1e-6


class LossOutput(NamedTuple):
  """loss: mean over kept pairs (f32 scalar); losses: per pair [B] (0 where masked out);
  metrics: {name: f32 scalar}, means over kept pairs (a pytree, so it leaves jit whole)."""

  loss: jax.Array
  losses: jax.Array
  metrics: dict[str, jax.Array]


def _inputs(mask, *xs) -> tuple[jax.Array, ...]:
  """(weights [B], *inputs as float32 with masked-out pairs zeroed).

  Zeroing first (the "double where"): a NaN or inf in a masked-out pair would otherwise reach
  the gradient as 0 * NaN = NaN through the untaken branch of the final `where`.
  """
  xs = tuple(jnp.asarray(x, jnp.float32) for x in xs)
  if mask is None:
    return (jnp.ones_like(xs[0]), *xs)
  w = jnp.asarray(mask, jnp.float32)
  return (w, *(jnp.where(w > 0, x, 0.0) for x in xs))


def _mean(x: jax.Array, w: jax.Array) -> jax.Array:
  """Weighted mean over kept pairs (0 when none is kept)."""
  # where, not multiply: a masked-out pair with a non-finite value must not poison the mean.
  total = jnp.sum(w)
  return jnp.sum(jnp.where(w > 0, x * w, 0.0)) / jnp.where(total > 0, total, 1.0)


def _output(losses: jax.Array, w: jax.Array, metrics: dict[str, jax.Array]) -> LossOutput:
  loss = _mean(losses, w)
  losses = jnp.where(w > 0, losses * w, 0.0)
  metrics = {k: jax.lax.stop_gradient(_mean(v, w)) for k, v in metrics.items()}
  return LossOutput(loss, losses, {'loss': jax.lax.stop_gradient(loss), **metrics})


def reward_metrics(
  chosen_rewards: jax.Array,
  rejected_rewards: jax.Array,
  chosen_logps: jax.Array,
  rejected_logps: jax.Array,
) -> dict[str, jax.Array]:
  """TRL's per-pair preference metrics (before averaging): implicit rewards, their margin, whether
  the chosen one wins (ties count as losses, as in TRL), and the policy's log-probs."""
  return {
    'rewards/chosen': chosen_rewards,
    'rewards/rejected': rejected_rewards,
    'rewards/accuracies': (chosen_rewards > rejected_rewards).astype(jnp.float32),
    'rewards/margins': chosen_rewards - rejected_rewards,
    'logps/chosen': chosen_logps,
    'logps/rejected': rejected_logps,
  }


def _log_ratios(mask, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
  w, pc, pr, rc, rr = _inputs(mask, policy_chosen, policy_rejected, ref_chosen, ref_rejected)
  return w, pc, pr, pc - rc, pr - rr


def sigmoid_loss(logits: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): the Bradley-Terry negative log-likelihood of
  the preference, with the label flipped with probability eps (conservative DPO). eps = 0 is the
  plain logistic loss; log_sigmoid keeps both terms finite for any z."""
  logits = jnp.asarray(logits, jnp.float32)
  loss = -jax.nn.log_sigmoid(logits)
  if label_smoothing:
    loss = (1.0 - label_smoothing) * loss - label_smoothing * jax.nn.log_sigmoid(-logits)
  return loss


def dpo(
  policy_chosen: jax.Array,
  policy_rejected: jax.Array,
  ref_chosen: jax.Array,
  ref_rejected: jax.Array,
  *,
  beta: float,
  label_smoothing: float = 0.0,
  mask: jax.Array | None = None,
) -> LossOutput:
  """DPO (Rafailov et al. 2023, Eq. 7) on summed log-probs; `label_smoothing` eps > 0 is
  conservative DPO (the preference label is wrong with probability eps; TRL's and tunix's
  `label_smoothing`). At pi = pi_ref the loss is log 2 whatever eps."""
  w, pc, pr, cr, rr = _log_ratios(mask, policy_chosen, policy_rejected, ref_chosen, ref_rejected)
  losses = sigmoid_loss(beta * (cr - rr), label_smoothing)
  return _output(losses, w, reward_metrics(beta * cr, beta * rr, pc, pr))


def ipo(
  policy_chosen: jax.Array,
  policy_rejected: jax.Array,
  ref_chosen: jax.Array,
  ref_rejected: jax.Array,
  *,
  beta: float,
  mask: jax.Array | None = None,
) -> LossOutput:
  """IPO (Azar et al. 2023, Eq. 17 with tau = beta): (h - 1/(2 beta))^2, a regression of the
  log-ratio margin onto 1/(2 beta) that, unlike DPO, stops pushing once the margin is reached
  (its gradient is 0 there). TRL passes per-token means here; the paper, sums."""
  w, pc, pr, cr, rr = _log_ratios(mask, policy_chosen, policy_rejected, ref_chosen, ref_rejected)
  losses = jnp.square(cr - rr - 1.0 / (2.0 * beta))
  return _output(losses, w, reward_metrics(beta * cr, beta * rr, pc, pr))


def hinge(
  policy_chosen: jax.Array,
  policy_rejected: jax.Array,
  ref_chosen: jax.Array,
  ref_rejected: jax.Array,
  *,
  beta: float,
  mask: jax.Array | None = None,
) -> LossOutput:
  """Hinge (SLiC-HF, Zhao et al. 2023, in TRL's DPO form): max(0, 1 - beta h). Pairs already
  separated by beta h >= 1 contribute no loss and no gradient."""
  w, pc, pr, cr, rr = _log_ratios(mask, policy_chosen, policy_rejected, ref_chosen, ref_rejected)
  losses = jax.nn.relu(1.0 - beta * (cr - rr))
  return _output(losses, w, reward_metrics(beta * cr, beta * rr, pc, pr))


def simpo(
  chosen_mean: jax.Array,
  rejected_mean: jax.Array,
  *,
  beta: float,
  gamma: float,
  label_smoothing: float = 0.0,
  mask: jax.Array | None = None,
) -> LossOutput:
  """SimPO (Meng et al. 2024, Eq. 6): -log sigmoid(beta mean_w - beta mean_l - gamma), on
  length-normalised log-probs (`SequenceLogps.mean`), with no reference model; gamma is the
  target reward margin. Rewards are beta * mean log-prob (the paper's Eq. 4), as TRL's CPO
  trainer logs them."""
  w, cm, rm = _inputs(mask, chosen_mean, rejected_mean)
  losses = sigmoid_loss(beta * (cm - rm) - gamma, label_smoothing)
  return _output(losses, w, reward_metrics(beta * cm, beta * rm, cm, rm))


def log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012): log(-expm1(x)) near 0, where
  1 - exp(x) cancels, and log1p(-exp(x)) below -log 2, where expm1 loses relative precision."""
  x = jnp.asarray(x, jnp.float32)
  near_zero = x > -jnp.log(2.0)
  safe_near = jnp.where(near_zero, x, -1.0)  # keep the untaken branch finite (gradients)
  safe_far = jnp.where(near_zero, -1.0, x)
  return jnp.where(near_zero, jnp.log(-jnp.expm1(safe_near)), jnp.log1p(-jnp.exp(safe_far)))


def log_odds(mean_logps: jax.Array) -> jax.Array:
  """log odds(y|x) = log P - log(1 - P) with log P the length-normalised log-prob (ORPO Eq. 4).

  log P is clipped at -1e-6: a sequence the model is certain of (P = 1) has infinite odds.
  """
  lp = jnp.minimum(jnp.asarray(mean_logps, jnp.float32), _MAX_MEAN_LOGP)
  return lp - log1mexp(lp)


def orpo(
  chosen_mean: jax.Array,
  rejected_mean: jax.Array,
  *,
  lam: float,
  nll: jax.Array | None = None,
  mask: jax.Array | None = None,
) -> LossOutput:
  """ORPO (Hong et al. 2024): L_SFT + lam L_OR (Eq. 6), L_OR = -log sigmoid(log odds(y_w) -
  log odds(y_l)) (Eq. 7, odds of Eq. 4) on length-normalised log-probs; no reference model.

  `nll` [B] is each pair's SFT term; by default the chosen response's mean token NLL,
  -chosen_mean (pass a token-weighted one to match TRL's batch cross-entropy exactly).
  Metrics add TRL's `nll_loss`, `log_odds_ratio` (mean log sigmoid of the log-odds gap) and
  `log_odds_chosen` (the mean gap); rewards are lam * mean log-prob, as TRL logs them.
  """
  w, cm, rm = _inputs(mask, chosen_mean, rejected_mean)
  nll = -cm if nll is None else _inputs(mask, nll)[1]
  gap = log_odds(cm) - log_odds(rm)
  ratio = jax.nn.log_sigmoid(gap)
  losses = nll - lam * ratio
  metrics = reward_metrics(lam * cm, lam * rm, cm, rm)
  metrics.update({'nll_loss': nll, 'log_odds_ratio': ratio, 'log_odds_chosen': gap})
  return _output(losses, w, metrics)


def bradley_terry(
  chosen_rewards: jax.Array,
  rejected_rewards: jax.Array,
  *,
  margin: jax.Array | float = 0.0,
  center_rewards_coefficient: float = 0.0,
  mask: jax.Array | None = None,
) -> LossOutput:
  """Bradley-Terry reward-model loss for scalar reward heads: -log sigmoid(r_w - r_l - margin)
  (the maximum-likelihood estimate of P(y_w > y_l) = sigmoid(r_w - r_l); InstructGPT Eq. 1,
  Llama 2's per-pair margin), plus TRL's optional c * (r_w + r_l)^2 that centres the rewards
  (BT is invariant to a shared shift). Metrics as TRL's RewardTrainer names them: accuracy,
  margin, mean_reward (min/max are batch statistics; compute them outside if wanted)."""
  w, rc, rr, margin = _inputs(
    mask,
    chosen_rewards,
    rejected_rewards,
    jnp.broadcast_to(jnp.asarray(margin, jnp.float32), jnp.shape(chosen_rewards)),
  )
  losses = -jax.nn.log_sigmoid(rc - rr - margin)
  if center_rewards_coefficient:
    losses = losses + center_rewards_coefficient * jnp.square(rc + rr)
  metrics = {
    'accuracy': (rc > rr).astype(jnp.float32),
    'margin': rc - rr,
    'mean_reward': 0.5 * (rc + rr),
  }
  return _output(losses, w, metrics)


def expert_bias(expert_chosen: jax.Array, expert_rejected: jax.Array, *, beta: float) -> jax.Array:
  """FusionRoute's CDPO bias (Eq. 3): beta (log pi_exp(y_w) - log pi_exp(y_l)), from the summed
  log-probs of the responses under the selected expert(s), with no gradient to anything."""
  ec, er = (jnp.asarray(x, jnp.float32) for x in (expert_chosen, expert_rejected))
  return jax.lax.stop_gradient(beta * (ec - er))


def cdpo(
  policy_chosen: jax.Array,
  policy_rejected: jax.Array,
  ref_chosen: jax.Array,
  ref_rejected: jax.Array,
  bias: jax.Array,
  *,
  beta: float,
  mask: jax.Array | None = None,
) -> LossOutput:
  """Complemented DPO (FusionRoute, arXiv 2601.05106, Eq. 3): -log sigmoid(beta h + sg[bias]).

  `bias` [B] is the frozen expert's own preference margin, usually `expert_bias(...)`: beta times
  the chosen-minus-rejected summed log-probs under the expert the router selects at each token.
  It is stop-gradient here as well, so whatever produced it (the experts, the routing head) gets
  no gradient from this loss. Where the expert already separates the pair (large bias), the
  policy's gradient sigmoid(-(beta h + bias)) is small; where it fails, the policy learns the
  correction, which is what makes its logits complementary. At pi = pi_ref the loss is
  -log sigmoid(bias) (log 2 at zero bias). Metrics: DPO's, plus `cdpo/bias`.
  """
  w, pc, pr, cr, rr = _log_ratios(mask, policy_chosen, policy_rejected, ref_chosen, ref_rejected)
  bias = jax.lax.stop_gradient(_inputs(mask, bias)[1])
  losses = sigmoid_loss(beta * (cr - rr) + bias)
  metrics = reward_metrics(beta * cr, beta * rr, pc, pr)
  metrics['cdpo/bias'] = bias
  return _output(losses, w, metrics)
