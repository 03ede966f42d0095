"""FusionRoute's training losses: stage 1 (Eq. 2, SFT + routing on the disagreement set) and
stage 2 (Algorithm 1: the same SFT loss on SFT items plus CDPO, Eq. 3, on preference items).

Stage 1, on a batch of SFT rows (input_pipeline.sft_row; reply tokens t carry loss_mask 1):
  * L_LM: the router LM's next-token NLL of the reply tokens;
  * the disagreement set S = { t : argmax_y pi_i(y | x, y<=t) differs between two experts }
    (`disagreement`: greedy tokens only, restricted to reply targets);
  * the aggregated distribution on S: log pi_agg(.) = sum_i w_{t,i} log pi_i(.), with
    w_t = softmax(W h_t) and renormalised by a log-softmax (core.md §2(a) [R]: the paper writes raw
    w and no normalisation; `raw_weights=True` keeps w = W h, still renormalised);
  * L_expert = sum_{t in S} -log pi_agg(y_{t+1}), the only term that trains W;
  * L_SFT = L_LM + lambda L_expert (lambda = 1/3). Both sums are divided by the batch's number of
    reply tokens, so lambda weighs them exactly as in Eq. 2 whatever the batch's padding.
The experts are frozen (stop_gradient, and their weights are not nnx.Param), so L_expert moves
only the router's LM body (through h) and W.

Stage 2 (Algorithm 1, mixed batches of B SFT rows and B preference pairs): L = L_SFT(SFT items) +
L_CDPO(pairs). CDPO (Eq. 3, common.preference.losses.cdpo) compares the router LM's summed
log-probs of the chosen and rejected replies with the reference's (the stage-1 router, computed once
with common.preference.reference) and adds the stop-gradient bias beta (log pi_exp(y_w) -
log pi_exp(y_l)), where pi_exp is, at each reply token, the expert the router selects
(argmax_i w_t, computed with W under stop_gradient on the chosen / rejected prefixes; core.md
§2(a) [R]). Neither the bias nor the routing head gets any gradient from the pairs: W learns only
from the SFT items' L_expert, as the paper's mix prescribes.

The fine-tuned baseline ("the same SFT+DPO without routing") uses `routing=False`: L_LM alone in
stage 1 and plain DPO (CDPO with zero bias) in stage 2.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from common import losses as lm_losses
from common.preference import losses as pref_losses
from common.preference import scoring
from projects.fusionroute import input_pipeline
from projects.fusionroute import models


def disagreement(expert_logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """S as a bool mask [...]: positions where two experts' greedy tokens differ (and `mask` > 0).

  expert_logits [n, ..., V]. With identical experts S is empty.
  """
  greedy = jnp.argmax(expert_logits, axis=-1)  # [n, ...]
  s = jnp.any(greedy != greedy[:1], axis=0)
  return s if mask is None else s & (mask > 0)


def aggregated_logprobs(
  routing: jax.Array, expert_logits: jax.Array, *, raw_weights: bool = False
) -> jax.Array:
  """log pi_agg [..., V] = log_softmax(sum_i w_i log_softmax(expert_i)), w = softmax(routing)
  (or the raw routing logits), routing [..., n], expert_logits [n, ..., V]."""
  w = routing.astype(jnp.float32)
  if not raw_weights:
    w = jax.nn.softmax(w, axis=-1)
  le = jax.nn.log_softmax(expert_logits.astype(jnp.float32), axis=-1)
  return jax.nn.log_softmax(jnp.einsum('...n,n...v->...v', w, le), axis=-1)


def expert_nll(
  routing: jax.Array, expert_logits: jax.Array, targets: jax.Array, *, raw_weights: bool = False
) -> jax.Array:
  """-log pi_agg(target) per position [...] (L_expert's summand)."""
  logp = aggregated_logprobs(routing, expert_logits, raw_weights=raw_weights)
  return -lm_losses.token_logprobs(logp, targets)


def sft_loss(
  model: models.FusionRoute,
  batch: Mapping[str, jax.Array],
  *,
  lam: float,
  routing: bool = True,
  raw_weights: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eq. 2 on SFT rows: (L_LM + lam * L_expert, metrics), each sum over reply tokens divided by
  their count. `routing=False`: L_LM only (no experts are run)."""
  kw = {'positions': batch['positions'], 'segment_ids': batch['segment_ids']}
  mask = batch['loss_mask'] > 0
  count = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
  lm = model.router.lm
  h = lm.hidden_states(batch['inputs'], **kw)
  nll = -lm_losses.token_logprobs(lm.logits_from_hidden(h), batch['targets'])
  l_lm = jnp.sum(jnp.where(mask, nll, 0.0)) / count
  metrics = {'lm': l_lm, 'reply_tokens': count}
  if not routing:
    return l_lm, metrics
  w = model.router.route(h)  # [B, T, n]
  expert_logits = model.expert_logits(batch['inputs'], **kw)  # [n, B, T, V]
  s = disagreement(expert_logits, mask)
  agg = expert_nll(w, expert_logits, batch['targets'], raw_weights=raw_weights)
  l_expert = jnp.sum(jnp.where(s, agg, 0.0)) / count
  size = jnp.maximum(jnp.sum(s), 1).astype(jnp.float32)
  # Routing accuracy on S against the prompt's domain expert (what oracle routing would pick).
  match = jnp.argmax(w, axis=-1) == batch['domain'][:, None]
  metrics.update(
    expert=l_expert,
    disagreement=jnp.sum(s) / count,
    routing_domain_match=jnp.sum(jnp.where(s, match, False)) / size,
  )
  return l_lm + lam * l_expert, metrics


def selected_expert_logps(
  model: models.FusionRoute, rows: Mapping[str, jax.Array], h: jax.Array
) -> jax.Array:
  """log pi_{I*_t}(y_t) [R, N] for the reply tokens of scoring-layout rows: at each token the
  expert argmax_i W h_t that the router selects (W and h under stop_gradient)."""
  n_tok = rows['targets'].shape[1]
  w = model.router.route(jax.lax.stop_gradient(h[:, -n_tok:]))
  selected = jnp.argmax(jax.lax.stop_gradient(w), axis=-1)  # [R, N]
  kw = {'positions': rows['positions'], 'segment_ids': rows['segment_ids']}
  logits = model.expert_logits(rows['inputs'], **kw)[:, :, -n_tok:]  # [n, R, N, V]
  logp = lm_losses.token_logprobs(logits, rows['targets'][None])  # [n, R, N]
  picked = jnp.take_along_axis(logp, selected[None], axis=0)[0]
  return jax.lax.stop_gradient(picked)


def cdpo_loss(
  model: models.FusionRoute, pref: Mapping[str, jax.Array], *, beta: float, routing: bool = True
) -> pref_losses.LossOutput:
  """Eq. 3 on a batch of input_pipeline.pref_item pairs [B, 2, ...]: CDPO with the routed
  expert's stop-gradient bias (`routing=False`: plain DPO, the fine-tuned baseline's)."""
  rows = input_pipeline.pair_rows(pref)
  lm = model.router.lm
  h = lm.hidden_states(rows['inputs'], positions=rows['positions'], segment_ids=rows['segment_ids'])
  n_tok = rows['targets'].shape[1]
  logp = lm_losses.token_logprobs(lm.logits_from_hidden(h[:, -n_tok:]), rows['targets'])
  chosen, rejected = scoring.split(scoring.reduce(logp, rows['completion_mask']))
  ref_c, ref_r = pref['ref_chosen_logps'], pref['ref_rejected_logps']
  if not routing:
    return pref_losses.dpo(chosen.sum, rejected.sum, ref_c, ref_r, beta=beta)
  expert = scoring.reduce(selected_expert_logps(model, rows, h), rows['completion_mask'])
  e_c, e_r = scoring.split(expert)
  bias = pref_losses.expert_bias(e_c.sum, e_r.sum, beta=beta)
  return pref_losses.cdpo(chosen.sum, rejected.sum, ref_c, ref_r, bias, beta=beta)


def mixed_loss(
  model: models.FusionRoute,
  batch: Mapping[str, Mapping[str, jax.Array]],
  *,
  lam: float,
  beta: float,
  pref_weight: float = 1.0,
  routing: bool = True,
  raw_weights: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Algorithm 1's loss on a mixed batch {'sft': rows, 'pref': pairs}: L_SFT(SFT items, Eq. 2) +
  pref_weight * L_CDPO(pairs, Eq. 3). Metrics: 'sft/...' and 'cdpo/...' (TRL's names)."""
  l_sft, m_sft = sft_loss(model, batch['sft'], lam=lam, routing=routing, raw_weights=raw_weights)
  pref = cdpo_loss(model, batch['pref'], beta=beta, routing=routing)
  metrics = {f'sft/{k}': v for k, v in m_sft.items()}
  metrics.update({k if k.startswith('cdpo/') else f'cdpo/{k}': v for k, v in pref.metrics.items()})
  metrics['sft/loss'] = l_sft
  return l_sft + pref_weight * pref.loss, metrics


def stage1_loss_fn(config) -> Callable:
  """fit's loss_fn(model, batch, key) for stage 1 (the row's 'domain' is only logged)."""
  routing = config.method == 'fusionroute'

  def loss_fn(model, batch, key):
    del key  # deterministic: no dropout, no sampling
    return sft_loss(
      model,
      batch,
      lam=config.router.lam,
      routing=routing,
      raw_weights=config.router.raw_weights,
    )

  return loss_fn


def stage2_loss_fn(config) -> Callable:
  """fit's loss_fn(model, batch, key) for stage 2 (Algorithm 1's mixed batches)."""
  routing = config.method == 'fusionroute'

  def loss_fn(model, batch, key):
    del key
    return mixed_loss(
      model,
      batch,
      lam=config.router.lam,
      beta=config.cdpo.beta,
      pref_weight=config.cdpo.weight,
      routing=routing,
      raw_weights=config.router.raw_weights,
    )

  return loss_fn
