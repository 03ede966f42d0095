"""Which routing trees S'MoRE picks for which tokens (the notebook's views, tested here).

`record_routing` runs the model eagerly with `core.context(record=...)`, so every S'MoRE adapter
stores its routing (idx / weights per layer, leading dims [B, T]). `tree_label` writes the tree a
token took as text, top layer first: '1{0,3} 2{1,3}' = top experts 1 and 2, children {0,3} under 1
and {1,3} under 2 (children sets are sorted, so one structure has one label). `usage_by_task`
counts, per task, how often each expert is used at each layer (over the tokens whose prediction
is trained, loss_mask > 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.adapters import core
from projects.smore import models


def record_routing(model, batch) -> dict[str, models.Routing]:
  """{adapter path: Routing with [B, T, ...] leaves} for one eager forward of `batch`."""
  record: dict = {}
  with core.context(record=record):
    model(batch['inputs'], segment_ids=batch['segment_ids'], positions=batch['positions'])
  return record


def _label(idx1: np.ndarray, idx0: np.ndarray | None) -> str:
  parts = []
  for j, e in enumerate(idx1):
    kids = '' if idx0 is None else '{' + ','.join(str(int(c)) for c in sorted(idx0[j])) + '}'
    parts.append(f'{int(e)}{kids}')
  return ' '.join(sorted(parts))


def tree_label(routing: models.Routing, b: int, t: int) -> str:
  """The 1- or 2-layer tree of token (b, t) as text (deeper trees: the top two layers)."""
  top = np.asarray(routing.idx[-1][b, t])
  below = np.asarray(routing.idx[-2][b, t]) if len(routing.idx) > 1 else None
  if below is not None and below.ndim > 2:
    below = below.reshape(below.shape[0], -1)
  return _label(top, below)


def usage_by_task(
  routing: models.Routing, batch, num_tasks: int, experts: Sequence[int]
) -> list[np.ndarray]:
  """Per layer l, an array [num_tasks, s_l]: the fraction of trained tokens of each task whose
  tree uses expert e at layer l (an expert used twice in a tree counts once)."""
  mask = np.asarray(batch['loss_mask']) > 0
  tasks = np.broadcast_to(np.asarray(batch['task'])[:, None], mask.shape)
  out = []
  for l, idx in enumerate(routing.idx):  # noqa: E741 - the paper's layer index
    idx = np.asarray(idx).reshape(*mask.shape, -1)
    used = np.zeros((*mask.shape, experts[l]), bool)
    for e in range(experts[l]):
      used[..., e] = np.any(idx == e, axis=-1)
    table = np.zeros((num_tasks, experts[l]))
    for k in range(num_tasks):
      sel = mask & (tasks == k)
      if sel.any():
        table[k] = used[sel].mean(0)
    out.append(table)
  return out
