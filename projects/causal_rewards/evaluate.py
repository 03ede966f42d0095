"""What Causal Rewards' claims measure, on the test quads of input_pipeline (for each test prompt:
(gold, no cue), (gold, cue), (wrong, no cue), (wrong, cue)):

  acc_decorrelated  pairwise accuracy with the cue on the chosen side for half of the pairs and on
                    the rejected side for the other half (the cue independent of the label): the
                    paper's accuracy on the decorrelated split; also acc_aligned (cue on chosen),
                    acc_anti (cue on rejected) and acc_clean (no cue);
  spearman          Spearman(reward, spurious feature) over the test responses (the cue indicator;
                    the token length for the length cue);
  bias              mean of r(y with cue) - r(y without) over counterfactual pairs, in standard
                    deviations of the test rewards (an analogue of the paper's Bias@C: how far the
                    concept alone moves the reward); cue_pref: P(r(y with cue) > r(y));
  bon_*             Best-of-4 over each quad: bon_accuracy (a correct response wins), bon_cue_rate
                    (the winner carries the cue; an invariant, accurate model: about 1/2),
                    bon_cue_wins (a wrong response wins because of its cue: the reward hack; the
                    analogue of the paper's sycophancy rate);
  ece               calibration of sigmoid(r_w - r_l) on the decorrelated pairs.
Every metric is also reported for the length-penalty baseline (prefix lp_): r - alpha * (length in
standard units), alpha the least-squares slope of the reward on standardised length over
training-distribution responses (the penalty that removes the length trend the model learnt).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import functools

from flax import nnx
import jax
import ml_collections
import numpy as np

from common import sharding
from common.reward_models import metrics as rm_metrics
from projects.causal_rewards import input_pipeline

MODEL_KEYS = ('tokens', 'positions', 'segment_ids', 'response_mask', 'last_index')
PENALTY_FIT_PAIRS = 256


@functools.cache
def _forward(graphdef):
  return jax.jit(lambda state, rows: nnx.merge(graphdef, state)(rows).rewards)


def rewards(
  model: nnx.Module,
  rows: Mapping[str, np.ndarray],
  *,
  batch: int,
  mesh: jax.sharding.Mesh,
  rules: sharding.Rules,
) -> np.ndarray:
  """Sequence rewards [R] of host rows, in batches of `batch` sharded over the mesh's batch axes
  (the last batch padded with copies of row 0, dropped after)."""
  graphdef, state = nnx.split(model)
  fn = _forward(graphdef)
  n = len(rows['tokens'])
  out = []
  for start in range(0, n, batch):
    idx = np.arange(start, start + batch)
    idx = np.where(idx < n, idx, 0)
    b = {k: np.asarray(rows[k])[idx] for k in MODEL_KEYS}
    out.append(np.asarray(sharding.gather_rows(fn(state, sharding.global_rows(b, mesh, rules)))))
  return np.concatenate(out)[:n]


def quad_metrics(r: np.ndarray, spurious: np.ndarray) -> dict[str, float]:
  """The metrics above from quad rewards r [T, 4] and spurious values [T, 4] (column order:
  (gold, -), (gold, cue), (wrong, -), (wrong, cue))."""
  r, spurious = np.asarray(r, np.float64), np.asarray(spurious, np.float64)
  g0, g1, w0, w1 = r.T
  acc = rm_metrics.pairwise_accuracy
  aligned, anti = acc(g1, w0), acc(g0, w1)
  diff = np.concatenate([g1 - g0, w1 - w0])
  scale = r.std()
  pick = np.argmax(r, axis=1)
  chosen, rejected = np.concatenate([g1, g0]), np.concatenate([w0, w1])
  return {
    'acc_decorrelated': 0.5 * (aligned + anti),
    'acc_aligned': aligned,
    'acc_anti': anti,
    'acc_clean': acc(g0, w0),
    'spearman': rm_metrics.spearman(r.ravel(), spurious.ravel()),
    'bias': float(diff.mean() / scale) if scale > 0 else 0.0,
    'bias_raw': float(diff.mean()),
    'cue_pref': float(np.mean((diff > 0) + 0.5 * (diff == 0))),
    'bon_accuracy': float(np.mean(pick < 2)),
    'bon_cue_rate': float(np.mean(pick % 2 == 1)),
    'bon_cue_wins': float(np.mean(pick == 3)),
    'ece': rm_metrics.calibration(chosen, rejected)['ece'],
    'reward_std': float(scale),
  }


def length_penalty(train_r: np.ndarray, train_len: np.ndarray) -> Callable:
  """r -> r - alpha * (len - mean) / std with alpha the OLS slope of train_r on standardised
  train_len (fit on training-distribution responses)."""
  mu, sd = float(train_len.mean()), float(train_len.std()) or 1.0
  x = (train_len - mu) / sd
  alpha = float(np.sum(x * (train_r - train_r.mean())) / max(np.sum(x * x), 1e-12))

  def apply(r: np.ndarray, length: np.ndarray) -> np.ndarray:
    return r - alpha * (length - mu) / sd

  apply.alpha = alpha
  return apply


def evaluate(
  model: nnx.Module,
  d: input_pipeline.Data,
  *,
  batch: int,
  mesh: jax.sharding.Mesh,
  rules: sharding.Rules,
  fit_rows: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float]:
  """Every metric of the module docstring (and lp_ ones) for `model` on the data's test quads."""
  test = d.test
  r = rewards(model, test, batch=batch, mesh=mesh, rules=rules)
  out = quad_metrics(r.reshape(-1, 4), test['spurious'].reshape(-1, 4))
  fit_rows = fit_rows or input_pipeline.penalty_fit_rows(d, PENALTY_FIT_PAIRS)
  fit_r = rewards(model, fit_rows, batch=batch, mesh=mesh, rules=rules)
  penalty = length_penalty(fit_r, fit_rows['response_mask'].sum(-1))
  r_lp = penalty(r, test['response_mask'].sum(-1))
  lp = quad_metrics(r_lp.reshape(-1, 4), test['spurious'].reshape(-1, 4))
  out.update({f'lp_{k}': v for k, v in lp.items()})
  out['lp_alpha'] = penalty.alpha
  return out


def make_eval_fn(
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  rules: sharding.Rules,
  d: input_pipeline.Data,
) -> Callable[[nnx.Module, int], dict[str, float]]:
  """fit's eval_fn(model, step)."""
  fit_rows = input_pipeline.penalty_fit_rows(d, PENALTY_FIT_PAIRS)

  def eval_fn(model, step):
    del step
    return evaluate(
      model, d, batch=config.data.eval_batch, mesh=mesh, rules=rules, fit_rows=fit_rows
    )

  return eval_fn
