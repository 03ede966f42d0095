"""What bounds SmolLM2 decode on this CPU: memory bandwidth, or the matmul kernels at small M?

    python -m benchmarks.decode_roofline [--reps=15] [--batches=1,16,64]

No weights are fetched: random f32 tensors with SmolLM2-135M's decode shapes (30 layers of q, k, v,
o, gate, up, down projections, distinct per layer so nothing stays in cache, and the tied
49152 x 576 head; 513 MiB). In one process, interleaved per repetition, it times

* a streaming read of all the weights (`jnp.sum`): the bandwidth limit;
* one decode step's weight matmuls (the 30 layers unrolled, as in the decoder, then the head) at each batch
  size: the time a decode step cannot beat with these XLA:CPU kernels, as GB/s of weights read and
  GFLOP/s;
* the head alone in two layouts ([V, D] contracted on D, as the tied head is; and a [D, V] copy);
* the same step with q|k|v as one matrix per layer (what the decoder multiplies for one row,
  `decoder.fuse_qkv`), and the attention projections and the MLP projections alone, with the
  paired ratio separate / fused: at one row each small matrix-vector product pays a fixed cost on
  XLA:CPU's intra-op pool, so the 120 attention matrices read far slower than the 90 MLP ones.

At batch 1 a step reads every weight once for 2 FLOPs per weight, so its bound is bandwidth; at
batch 16 it does 32 FLOPs per weight read, and the question is whether the kernels get there. The
medians (and ranges) say which: benchmarks/decode.py compares the real sampler with transformers.
"""

from __future__ import annotations

import functools
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from common import machine

FLAGS = flags.FLAGS
flags.DEFINE_integer('reps', 15, 'timed repetitions per variant (after one warm-up), interleaved')
flags.DEFINE_list('batches', ['1', '16', '64'], 'decode batch sizes')

LAYERS, D, KV, F, VOCAB = 30, 576, 192, 1536, 49152  # SmolLM2-135M: 9 q heads, 3 kv heads of 64


def weights(key):
  """Per-layer projections [in, out] (separate arrays, as the decoder's) and the tied head [V, D]."""
  shapes = dict(q=(D, D), k=(D, KV), v=(D, KV), o=(D, D), gate=(D, F), up=(D, F), down=(F, D))
  keys = iter(jax.random.split(key, LAYERS * len(shapes) + 1))
  layers = [
    {n: jax.random.normal(next(keys), s) * 0.02 for n, s in shapes.items()} for _ in range(LAYERS)
  ]
  return layers, jax.random.normal(next(keys), (VOCAB, D)) * 0.02


@jax.jit
def read_all(layers, head):
  return sum(jnp.sum(w) for layer in layers for w in layer.values()) + jnp.sum(head)


@functools.partial(jax.jit, static_argnames=('parts', 'fused'))
def step_matmuls(x, layers, head, parts=('attn', 'mlp', 'head'), fused=False):
  """Every weight matmul of one decode step (attention over the cache and norms left out), or only
  its `parts`; `fused`: q|k|v as one product per layer, as the decoder multiplies one row
  (`decoder.fuse_qkv`; layers then carry a 'qkv' matrix)."""

  def layer(x, w):
    if 'attn' in parts:
      if fused:
        qkv = x @ w['qkv']
        q, k, v = qkv[:, :D], qkv[:, D : D + KV], qkv[:, D + KV :]
      else:
        q, k, v = x @ w['q'], x @ w['k'], x @ w['v']
      attn = q + 1e-3 * (jnp.tile(k, (1, 3)) + jnp.tile(v, (1, 3)))  # keeps k and v live
      x = x + attn @ w['o']
    if 'mlp' in parts:
      x = x + (jax.nn.silu(x @ w['gate']) * (x @ w['up'])) @ w['down']
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6), None

  for w in layers:  # unrolled, as the decoder's layers are (a scan would slice a stacked copy)
    x, _ = layer(x, w)
  return jnp.einsum('bd,vd->bv', x, head) if 'head' in parts else x


def fuse(layers):
  """The layers with q|k|v concatenated per layer (the separate matrices dropped)."""
  out = []
  for w in layers:
    rest = {n: a for n, a in w.items() if n not in 'qkv'}
    out.append(dict(rest, qkv=jnp.concatenate([w['q'], w['k'], w['v']], axis=1)))
  return out


@jax.jit
def head_vd(x, head):
  return jnp.einsum('bd,vd->bv', x, head)


@jax.jit
def head_dv(x, head_t):
  return x @ head_t


def _timed(f, *args) -> float:
  t = time.perf_counter()
  jax.block_until_ready(f(*args))
  return time.perf_counter() - t


def _fmt(xs, scale=1.0, digits=1) -> str:
  xs = [x * scale for x in xs]
  return f'{statistics.median(xs):.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})'


def main(argv) -> None:
  del argv
  batches = [int(b) for b in FLAGS.batches]
  layers, head = weights(jax.random.key(0))
  head_t = jnp.asarray(np.asarray(head).T.copy())
  n_weights = sum(w.size for layer in layers for w in layer.values()) + head.size
  nbytes = 4 * n_weights
  n_attn = sum(layer[n].size for layer in layers for n in 'qkvo')
  n_mlp = sum(layer[n].size for layer in layers for n in ('gate', 'up', 'down'))
  xs = {b: jax.random.normal(jax.random.key(b), (b, D)) for b in batches}
  fused = fuse(layers)
  attn = functools.partial(step_matmuls, parts=('attn',))
  variants = {'read all weights (jnp.sum)': (read_all, (layers, head))}
  for b in batches:
    variants[f'step matmuls, batch {b}'] = (step_matmuls, (xs[b], layers, head))
    variants[f'step matmuls, q|k|v fused, batch {b}'] = (
      functools.partial(step_matmuls, fused=True),
      (xs[b], fused, head),
    )
    variants[f'attention projections, batch {b}'] = (attn, (xs[b], layers, head))
    variants[f'attention projections, q|k|v fused, batch {b}'] = (
      functools.partial(attn, fused=True),
      (xs[b], fused, head),
    )
    mlp = functools.partial(step_matmuls, parts=('mlp',))
    variants[f'MLP projections, batch {b}'] = (mlp, (xs[b], layers, head))
    variants[f'head [V,D], batch {b}'] = (head_vd, (xs[b], head))
    variants[f'head [D,V], batch {b}'] = (head_dv, (xs[b], head_t))
  for f, args in variants.values():  # compile + warm up
    _timed(f, *args)
  times = {name: [] for name in variants}
  for _ in range(FLAGS.reps):
    for name, (f, args) in variants.items():
      times[name].append(_timed(f, *args))

  print(
    f'SmolLM2-135M decode shapes, f32, {nbytes / 2**20:.0f} MiB of weights, jax {jax.__version__}, '
    f'{FLAGS.reps} interleaved reps; median (range); {machine.cpu()}\n'
  )
  print('| variant | ms | weights read GB/s | GFLOP/s | tok/s bound |')
  print('|---|---|---|---|---|')
  for name, ts in times.items():
    if name.startswith('read'):
      print(f'| {name} | {_fmt(ts, 1e3)} | {_fmt([nbytes / t / 1e9 for t in ts])} | - | - |')
      continue
    b = int(name.rsplit(' ', 1)[1])
    n = {'step': n_weights, 'head': head.size, 'atte': n_attn, 'MLP ': n_mlp}[name[:4]]
    gbs = _fmt([4 * n / t / 1e9 for t in ts])
    gflops = _fmt([2 * b * n / t / 1e9 for t in ts])
    tok = _fmt([b / t for t in ts], digits=0) if name.startswith('step') else '-'
    print(f'| {name} | {_fmt(ts, 1e3)} | {gbs} | {gflops} | {tok} |')
  print(
    '\nq|k|v fused vs separate, paired per repetition (separate time / fused time; > 1: fused faster)'
  )
  for b in batches:
    for what in ('step matmuls', 'attention projections'):
      sep, fus = times[f'{what}, batch {b}'], times[f'{what}, q|k|v fused, batch {b}']
      print(
        f'  {what}, batch {b}: {_fmt([a / c for a, c in zip(sep, fus, strict=True)], digits=3)}'
      )


if __name__ == '__main__':
  app.run(main)
