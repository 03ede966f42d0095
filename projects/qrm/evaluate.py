"""What Q-RM's claims measure: the reward models on held-out pairs, and the RL runs' curves.

Reward model on held-out pairs (`rm_metrics`; token rewards r_t as the RL loop sees them):
  * pairwise accuracy of the model's sequence score (Q-RM: the masked mean of log phi, what its
    loss compares; DPO: the summed log-ratio to the reference);
  * credit localisation: on each rejected response, whether the lowest token reward sits at the
    first error (`error_pos`: the corrupted digit, or where a policy sample leaves the correct
    trace), against chance (1 / its length);
  * credit concentration on corrupted pairs (chosen and rejected differ at one position only):
    |r_err(rejected) - r_err(chosen)| / sum_t |r_t(rejected) - r_t(chosen)|, the share of the
    pair's token-reward difference that lands on the corrupted step (1 = all of it);
  * `profile`: the mean token reward of rejected and chosen responses at offsets from the error,
    the per-position plot (reports/qrm/).
The reward-model run reports the same metrics of the starting network read the same way
(beta log pi, 'start/...'): the control for localisation, since positions that are hard for the
policy (the answer's digits) already carry low log-probabilities before any preference training.
RL (`run_summary`, `steps_to_target`): the training rollouts' pass rate per step, and the first
step at which its running mean over `window` steps reaches a target (the "steps to a target
reward" of the 12x convergence claim; never reached = None).
"""

from __future__ import annotations

import pathlib

import numpy as np

from common.reward_models import metrics as rm_metrics_lib
from common.rl import evaluate as rl_evaluate

OFFSETS = tuple(range(-3, 4))


def rm_metrics(
  token_rewards: np.ndarray, seq_scores: np.ndarray, arrays: dict[str, np.ndarray]
) -> dict:
  """Metrics of a reward model on K pairs: token_rewards [2K, N] (chosen rows first, 0 on padding),
  seq_scores [2K], `arrays` a Pairs' arrays (lengths, error_pos, source)."""
  k = arrays['chosen'].shape[0]
  tc, tr = np.asarray(token_rewards[:k], np.float64), np.asarray(token_rewards[k:], np.float64)
  lc, lr = arrays['chosen_lengths'], arrays['rejected_lengths']
  err, src = arrays['error_pos'], arrays['source']
  n = tc.shape[1]
  valid_r = np.arange(n)[None] < lr[:, None]
  masked = np.where(valid_r, tr, np.inf)
  hit = (np.argmin(masked, axis=1) == err) & (err < lr)
  chance = 1.0 / np.maximum(lr, 1)
  out = {
    'pair_accuracy': rm_metrics_lib.pairwise_accuracy(seq_scores[:k], seq_scores[k:]),
    'num_pairs': int(k),
  }
  for name, sel in (('corrupted', src == 0), ('policy', src == 1)):
    if not sel.any():
      continue
    out[f'localisation/{name}'] = float(hit[sel].mean())
    out[f'localisation_chance/{name}'] = float(chance[sel].mean())
    out[f'pair_accuracy/{name}'] = rm_metrics_lib.pairwise_accuracy(
      seq_scores[:k][sel], seq_scores[k:][sel]
    )
  same = (src == 0) & (lc == lr)
  if same.any():
    valid = np.arange(n)[None] < lc[:, None]
    diff = np.where(valid, np.abs(tr - tc), 0.0)[same]
    at = diff[np.arange(len(diff)), err[same]]
    out['concentration'] = float(np.mean(at / np.maximum(diff.sum(1), 1e-12)))
    out['concentration_chance'] = float(np.mean(1.0 / lc[same]))
  out['profile'] = profile(tc, tr, lc, lr, err)
  return out


def profile(tc, tr, lc, lr, err) -> dict:
  """{'offsets', 'rejected', 'chosen'}: mean token reward at each offset from the first error
  (NaN where no response reaches that offset)."""
  rej, cho = [], []
  for o in OFFSETS:
    pos = err + o
    ok_r = (pos >= 0) & (pos < lr)
    ok_c = (pos >= 0) & (pos < lc)
    rows = np.arange(len(err))
    rej.append(float(tr[rows[ok_r], pos[ok_r]].mean()) if ok_r.any() else float('nan'))
    cho.append(float(tc[rows[ok_c], pos[ok_c]].mean()) if ok_c.any() else float('nan'))
  return {'offsets': list(OFFSETS), 'rejected': rej, 'chosen': cho}


def run_summary(workdir: str | pathlib.Path) -> dict:
  """{'train_steps', 'pass_rate', 'reward', 'eval_steps', 'eval': {key: [values]}} of an RL run."""
  return rl_evaluate.run_summary(workdir, {'pass_rate': 'pass_at_1', 'reward': 'reward_mean'})


def steps_to_target(steps, values, target: float, window: int = 5) -> int | None:
  """The first step whose running mean of the last `window` values is >= target (None: never)."""
  v = np.asarray(values, np.float64)
  for i in range(len(v)):
    if i + 1 >= window and v[i + 1 - window : i + 1].mean() >= target:
      return int(steps[i])
  return None
