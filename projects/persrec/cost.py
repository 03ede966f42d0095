"""Serving cost vs history length: analytic FLOPs and measured time for full, recent-only, PerSRec.

Per request (one user, batch 1 by default), with R recent items and P old items:
  full      one causal pass over P + R items            O((P + R)^2 d) attention
  recent    one pass over the last R items              O(R^2 d)
  persrec   R items against the k tokens' cached K/V    O(R (R + k) d), independent of P
  compress  the per-user refresh: [P old, k tokens]     O((P + k)^2 d) single pass, amortised
Times are medians over interleaved repetitions (round-robin over the models, so every model sees the
same machine state on a shared VM); FLOPs come from models.serving_flops. Randomly initialised
weights: speed does not depend on the values. Used by benchmarks/persrec_serving.py and the claims.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import statistics
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from projects.persrec import models

ARMS = ('recent', 'full', 'persrec', 'compress')


@dataclasses.dataclass
class Row:
  old_len: int
  arm: str  # 'full' | 'recent' | 'persrec' | 'compress'
  flops: float
  times: list[float]

  @property
  def median(self) -> float:
    return statistics.median(self.times)


def _config(base: models.ModelConfig, old_len: int, mode: str) -> models.ModelConfig:
  return dataclasses.replace(base, old_len=old_len, token_mode=mode)


def _time(fn, reps_out: list[float]) -> None:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  reps_out.append(time.perf_counter() - t0)


def measure(
  base: models.ModelConfig,
  old_lens: Sequence[int],
  *,
  batch: int = 1,
  reps: int = 10,
  warmup: int = 2,
  seed: int = 0,
  arms: Sequence[str] = ARMS,
) -> list[Row]:
  """Rows (old_len, arm, FLOPs per request (one user), seconds per call of `batch` users).

  `base` gives the shapes (recent_len R, tokens k, layers...); token_mode/old_len are overridden.
  The recent-only model does not depend on P and is measured once (old_len 0). `arms`: which of
  ARMS to build and time (each costs a compile).
  """
  unknown = set(arms) - set(ARMS)
  if unknown:
    raise ValueError(f'unknown arms {sorted(unknown)}; use some of {ARMS}')
  rng = np.random.default_rng(seed)
  r = base.recent_len
  recent_cfg = _config(base, 0, 'none')
  recent_model = models.build(recent_cfg) if 'recent' in arms else None
  single = nnx.jit(lambda m, i: m.user_vectors(i))
  serve = nnx.jit(lambda m, c, i: m.serve(c, i))
  compress = nnx.jit(lambda m, i: m.compress(i))
  recent_items = jnp.asarray(rng.integers(1, base.num_items + 1, (batch, r)), jnp.int32)
  jobs = [
    (
      'recent',
      0,
      models.serving_flops(recent_cfg)['request'],
      lambda: single(recent_model, recent_items),
    )
  ]
  for p in old_lens:
    full_cfg, per_cfg = _config(base, p, 'none'), _config(base, p, 'learned')
    full_model = models.build(full_cfg) if 'full' in arms else None
    per_model = models.build(per_cfg)
    items = jnp.asarray(rng.integers(1, base.num_items + 1, (batch, p + r)), jnp.int32)
    old, recent = items[:, :p], items[:, p:]
    cache = compress(per_model, old)
    flops = models.serving_flops(per_cfg)
    jobs += [
      (
        'full',
        p,
        models.serving_flops(full_cfg)['request'],
        lambda m=full_model, i=items: single(m, i),
      ),
      ('persrec', p, flops['request'], lambda m=per_model, c=cache, i=recent: serve(m, c, i)),
      ('compress', p, flops['compress'], lambda m=per_model, i=old: compress(m, i)),
    ]
  jobs = [j for j in jobs if j[0] in arms]
  times: list[list[float]] = [[] for _ in jobs]
  for _ in range(warmup):
    for j in jobs:
      jax.block_until_ready(j[3]())
  for _ in range(reps):
    for j, out in zip(jobs, times, strict=True):
      _time(j[3], out)
  return [Row(p, arm, f, t) for (arm, p, f, _), t in zip(jobs, times, strict=True)]


def table(rows: Sequence[Row], batch: int = 1) -> str:
  """Markdown: per-request FLOPs, ms per request (median, range) and full-at-this-P / this."""
  full = {r.old_len: r.median for r in rows if r.arm == 'full'}
  lines = [
    '| P (old) | model | MFLOP / request | ms / request (median, range) | full at this P / this |',
    '|---|---|---|---|---|',
  ]
  for r in rows:
    ratio = f'{full[r.old_len] / r.median:.1f}x' if r.arm == 'persrec' and r.old_len in full else ''
    ms = [t * 1e3 / batch for t in r.times]
    lines.append(
      f'| {r.old_len} | {r.arm} | {r.flops / 1e6:.2f} | {statistics.median(ms):.2f} '
      f'({min(ms):.2f}-{max(ms):.2f}) | {ratio} |'
    )
  return '\n'.join(lines)


def ratio_table(rows: Sequence[Row]) -> str:
  """Markdown: full-history / PerSRec per P, by FLOPs and by time (ratio of the medians, and the
  median and range of the per-repetition ratios: repetition i of both ran back to back)."""
  full = {r.old_len: r for r in rows if r.arm == 'full'}
  per = {r.old_len: r for r in rows if r.arm == 'persrec'}
  lines = [
    '| P (old) | FLOPs full / PerSRec | time full / PerSRec (ratio of medians) '
    '| per-rep ratio (median, range) |',
    '|---|---|---|---|',
  ]
  for p in sorted(full.keys() & per.keys()):
    f, q = full[p], per[p]
    paired = [a / b for a, b in zip(f.times, q.times, strict=True)]
    lines.append(
      f'| {p} | {f.flops / q.flops:.1f}x | {f.median / q.median:.1f}x | '
      f'{statistics.median(paired):.1f}x ({min(paired):.1f}-{max(paired):.1f}) |'
    )
  return '\n'.join(lines)
