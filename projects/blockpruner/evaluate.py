"""Evaluation of a pruned model, and comparisons at equal numbers of removed parameters.

`evaluate` scores the model with a block mask (the dense model's parameters, blocks skipped; the
structurally pruned model computes the same, see tests) on:
  * held-out perplexity of real text (`common.models.perplexity`): '<source>/loss' (nats/token) and
    '<source>/perplexity' for the R documentation ('rdocs') and chatterbot dialogues ('chatterbot');
  * zero-shot multiple-choice accuracy scored by log-likelihood ('mc/<task>', 'mc/mean'): the choice
    with the highest mean log-probability per token wins (ties: the first), as lm-eval's acc_norm
    with token counts.

BlockPruner removes blocks of unequal size (in SmolLM2 an MLP block holds 3x the parameters of an
MHA block) and layer pruning removes both, so methods are compared at equal removed parameters, not
equal steps (the paper compares at equal pruning ratios): `at_equal_params` pairs each point of a
layer-pruning curve (k layers) with the first point of a block curve that removes at least as many
parameters, so the block method is never credited with removing less.

`evaluate_memo` is `evaluate` behind an in-process memo keyed by `fingerprint` (a digest of the
model's configuration and weights, the evaluation sets and the batch layout) and the mask: the
claims run 12 searches of one model in one process, and every one of them evaluates the dense model
first, and ShortGPT removes the same layers for every calibration seed. A repeated evaluation
returns the numbers the first one computed (the same program on the same inputs), without running it.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from collections.abc import Sequence
import hashlib
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common import cache
from common import sharding
from common.models import decoder
from common.models import perplexity
from projects.blockpruner import input_pipeline
from projects.blockpruner import models


def choice_accuracy(
  model: decoder.Decoder,
  task: input_pipeline.ChoiceTask,
  *,
  batch_size: int,
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  model_kwargs: Mapping[str, Any] | None = None,
) -> float:
  """Share of items whose correct choice has the highest mean log-probability per choice token."""
  sums, counts = perplexity.row_nll(
    model, task.rows, batch_size=batch_size, mesh=mesh, rules=rules, model_kwargs=model_kwargs
  )
  scores = (-sums / np.maximum(counts, 1.0)).reshape(task.num_items, task.num_choices)
  return float(np.mean(np.argmax(scores, axis=1) == task.labels))


def evaluate(
  model: decoder.Decoder,
  data: input_pipeline.Data,
  block_mask: np.ndarray,
  *,
  batch_size: int,
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  with_mc: bool = True,
) -> dict[str, float]:
  """Held-out perplexity per source and (with_mc) multiple-choice accuracy under `block_mask`."""
  kwargs = {'block_mask': np.asarray(block_mask, bool)}
  out = {}
  for name, w in data.held_out.items():
    r = perplexity.evaluate(
      model, w, batch_size=batch_size, mesh=mesh, rules=rules, model_kwargs=kwargs
    )
    out[f'{name}/loss'] = r['loss']
    out[f'{name}/perplexity'] = r['perplexity']
  if with_mc and data.tasks:
    accs = []
    for task in data.tasks:
      acc = choice_accuracy(
        model, task, batch_size=batch_size, mesh=mesh, rules=rules, model_kwargs=kwargs
      )
      out[f'mc/{task.name}'] = acc
      accs.append(acc)
    out['mc/mean'] = float(np.mean(accs))
  return out


def fingerprint(
  model: decoder.Decoder,
  data: input_pipeline.Data,
  *,
  batch_size: int,
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> str | None:
  """A digest of what `evaluate` reads besides the mask: the model's config and every weight, the
  held-out windows and task rows, the batch size and the mesh. None when the weights are not all
  addressable here (several processes): nothing is memoized then."""
  state = nnx.state(model)
  if jax.process_count() > 1 and not cache.fully_addressable(state):
    return None
  h = hashlib.blake2b(digest_size=20)
  mesh_shape = None if mesh is None else dict(mesh.shape)
  h.update(repr((model.cfg, batch_size, mesh_shape, rules)).encode())
  h.update(cache.tree_fingerprint(state).encode())
  rows = {
    'held_out': {name: (w.tokens, w.mask) for name, w in data.held_out.items()},
    'tasks': {t.name: (t.rows.tokens, t.rows.mask, t.labels) for t in data.tasks},
  }
  h.update(cache.tree_fingerprint(rows).encode())
  return h.hexdigest()


_MEMO: collections.OrderedDict[tuple, dict[str, float]] = collections.OrderedDict()
MEMO_SIZE = 1024  # evaluations kept (a few hundred bytes each)


def evaluate_memo(
  key: str | None,
  model: decoder.Decoder,
  data: input_pipeline.Data,
  block_mask: np.ndarray,
  *,
  batch_size: int,
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  with_mc: bool = True,
) -> dict[str, float]:
  """`evaluate`, memoized in this process under (key = `fingerprint(...)`, mask, with_mc); key None
  evaluates every time."""
  mask = np.asarray(block_mask, bool)
  entry = None if key is None else (key, mask.shape, mask.tobytes(), bool(with_mc))
  if entry is not None and entry in _MEMO:
    _MEMO.move_to_end(entry)
    return dict(_MEMO[entry])
  out = evaluate(model, data, mask, batch_size=batch_size, mesh=mesh, rules=rules, with_mc=with_mc)
  if entry is not None:
    _MEMO[entry] = dict(out)
    while len(_MEMO) > MEMO_SIZE:
      _MEMO.popitem(last=False)
  return out


def removal_gap(
  model: decoder.Decoder, small: decoder.Decoder, removed: Sequence[Any], tokens: np.ndarray
) -> float:
  """max |logits of the structurally pruned `small` - logits of `model` with `removed` skipped|
  on tokens int [B, T] (0 up to float rounding: deployment computes what the search measured)."""
  mask = jnp.asarray(models.mask_of(removed, model.cfg.num_layers))
  tokens = jnp.asarray(tokens, jnp.int32)
  return float(jnp.max(jnp.abs(small(tokens) - model(tokens, block_mask=mask))))


# ---------------------------------------------------------------------------------------------------
# Curves and equal-parameter comparisons (from a run's metrics.jsonl rows).


def curve(
  rows: Sequence[Mapping[str, Any]], key: str, split: str = 'eval'
) -> list[tuple[float, float]]:
  """[(removed parameters, value)] of the `split` rows that carry `key`, by step (split 'train':
  the search's own calibration loss / perplexity after each removal)."""
  picked = [r for r in rows if r.get('split') == split and key in r]
  return [
    (float(r['removed_params']), float(r[key])) for r in sorted(picked, key=lambda r: r['step'])
  ]


def at_equal_params(
  blocks: Sequence[tuple[float, float]], layers: Sequence[tuple[float, float]]
) -> list[tuple[float, float, float, float]]:
  """[(layer budget, block value, layer value, block removed)] for each layer point with removed
  parameters > 0 that the block curve reaches: the block curve's first point removing at least as
  many parameters (see the module docstring)."""
  out = []
  for budget, value in layers:
    if budget <= 0:
      continue
    reached = [(p, v) for p, v in blocks if p >= budget]
    if reached:
      p, v = min(reached, key=lambda pv: pv[0])
      out.append((budget, v, value, p))
  return out


def interpolate(points: Sequence[tuple[float, float]], x: float, log: bool = True) -> float:
  """The curve [(removed parameters, value)] read at x: linear between its two neighbouring points
  (in log value when `log`, for perplexities), exact at a point, NaN outside its range. A neutral
  reading beside `at_equal_params`, which charges a block curve for its next point's overshoot."""
  pts = sorted(points)
  for px, py in pts:
    if px == x:
      return py
  for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
    if x0 < x < x1:
      w = (x - x0) / (x1 - x0)
      if log:
        return math.exp((1 - w) * math.log(y0) + w * math.log(y1))
      return (1 - w) * y0 + w * y1
  return math.nan


def mean_log_ratio(pairs: Sequence[tuple[float, float, float, float]]) -> float:
  """Mean over the paired budgets of log(block perplexity / layer perplexity); < 0: blocks win."""
  if not pairs:
    return math.nan
  return float(np.mean([math.log(b / a) for _, b, a, _ in pairs]))
