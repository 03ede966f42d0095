"""One optimizer recipe for every paper: clipped AdamW with an optional warm-up + cosine schedule.

`config.optimizer` holds lr, clip_norm, weight_decay (and optionally b1, b2); with `warmup_steps`
the learning rate rises linearly from 0 over warmup_steps and decays by a cosine to
lr * final_lr_frac (default 0.1) at train.num_steps, otherwise it is constant. Papers with their
own schedule (GEM's phases) pass `lr`; extra transforms after AdamW (GEM's temperature clamp) go in
`then`; `flatten` runs the chain on one raveled vector (many small adapter leaves: S'MoRE).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import ml_collections
import optax


def learning_rate(o: ml_collections.ConfigDict, num_steps: int) -> float | optax.Schedule:
  """config.optimizer's learning rate: constant, or warm-up + cosine when it has warmup_steps."""
  if 'warmup_steps' not in o:
    return o.lr
  return optax.warmup_cosine_decay_schedule(
    0.0,
    o.lr,
    o.warmup_steps,
    max(num_steps, o.warmup_steps + 1),
    o.lr * o.get('final_lr_frac', 0.1),
  )


def make_optimizer(
  o: ml_collections.ConfigDict,
  num_steps: int,
  *,
  lr: float | optax.Schedule | None = None,
  decay_mask: Callable[[Any], Any] | None = None,
  then: Sequence[optax.GradientTransformation] = (),
  flatten: bool = False,
) -> optax.GradientTransformation:
  """clip_by_global_norm(o.clip_norm) -> AdamW(lr, o.b1, o.b2, o.weight_decay) -> `then`."""
  tx = optax.chain(
    optax.clip_by_global_norm(o.clip_norm),
    optax.adamw(
      learning_rate(o, num_steps) if lr is None else lr,
      b1=o.get('b1', 0.9),
      b2=o.get('b2', 0.999),
      weight_decay=o.weight_decay,
      mask=decay_mask,
    ),
    *then,
  )
  return optax.flatten(tx) if flatten else tx
