"""Can bf16 / f16 weights make SmolLM2 decode matmuls faster than f32 on this XLA:CPU?

    python -m benchmarks.low_precision_matmul [--reps=7] [--batches=1,16,64] [--groups=gate,step]
    python -m benchmarks.low_precision_matmul --hlo_dir=/tmp/lp_hlo   # what XLA emits, no timing

Random weights with SmolLM2-135M's decode shapes (30 distinct layers of q [576,576], k/v [576,192],
o [576,576], gate/up [576,1536], down [1536,576], and the tied head [49152,576] contracted on 576;
f32 513 MiB), stored once in f32, bf16 and f16. Each formulation of `x @ W` (x f32 [M, K]):

* ``f32``: f32 x f32 (the decoder today);
* ``bf16-dot`` / ``f16-dot``: x cast to the weight's dtype, ``lax.dot_general(...,
  preferred_element_type=f32)`` (a low-precision dot accumulating in f32);
* ``bf16-upcast`` / ``f16-upcast``: the low-precision weight converted to f32 inside the jit, then an
  f32 dot (what a module computing in f32 on bf16-stored weights does);
* ``bf16-linear`` / ``f16-linear``: x cast, a dot with a bf16 / f16 result, cast
  back (what ``nnx.Linear(dtype=bfloat16)``, i.e. the decoder with cfg.dtype=bfloat16, emits);
* ``bf16-dot-pad`` (``f32-dot-pad`` / ``f16-dot-pad`` not run by default): at M=1, x repeated to two
  rows and row 0 of the result kept (XLA:CPU sends M >= 2 dots to YNNPACK, M=1 to its own gemv);
* ``f32-reduce`` / ``bf16-reduce`` / ``f16-reduce`` (not run by default): no dot, ``sum(x[:, :, None] *
  w.astype(f32), 1)``, so the convert is fused into the reduction loop instead of materialised;

is timed on each group of weights (``q``: the 30 q projections, ``kv``, ``gate``, ``down``, ``head``, and
``step``: every weight matmul of one decode step, as benchmarks/decode_roofline.py) and batch M, one
call per (group, batch, formulation) per repetition, interleaved, with a 384 MiB read between calls so
that every call streams its weights from DRAM (the L3 is 300 MiB here; --noflush times warm caches).
Matmuls are chained (each layer's input depends on the previous output) as in decode. It prints the
median (range) ms, the weight bytes read per call and implied GB/s, GFLOP/s, and the per-repetition
ratio to f32's time (median (range); < 1 is faster than f32).

What jax 0.10.2's XLA:CPU emits (--hlo_dir; perf on a Sapphire-Rapids-class Xeon with AVX512-BF16 and
AMX): dots with M >= 2 go to YNNPACK (``__ynn_fusion``); an M=1 dot stays on XLA's own LLVM gemv
(256-bit FMAs). Only a bf16 x bf16 -> f32 dot at M >= 2 stays in bf16 (YNNPACK's avx512bf16 kernel at
small M, its amxbf16 kernel at M=16/64); every other low-precision formulation (M=1, any f16 dot, a
bf16 dot with a bf16 result as nnx.Linear(dtype=bfloat16) emits, an explicit upcast) becomes a
separate fusion that writes an f32 copy of the whole weight every call, into a fresh buffer whose pages
fault on first touch (perf stat: 864 faults per 576x1536 weight per call). Even the native bf16 route
re-packs the weight every call (``ynn::interleave2_x16_avx512`` for [K, N], ``ynn::transpose_x32`` for
[N, K]), since the weight is a runtime operand.

XLA_FLAGS is read once per process: compare library routes (e.g.
``--xla_cpu_experimental_xnn_fusion_type=...``, ``--xla_cpu_use_onednn``) by separate runs, each with
its own f32 baseline. --hlo_dir writes the optimized HLO of one gate-shaped call per formulation and
batch and prints, per formulation, the dot's operand types, the converts and the fusion / thunk kinds.
"""

from __future__ import annotations

import os
import pathlib
import re
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from common import machine

FLAGS = flags.FLAGS
flags.DEFINE_integer('reps', 7, 'timed repetitions (after one warm-up), interleaved')
flags.DEFINE_list('batches', ['1', '16', '64'], 'batch sizes M')
flags.DEFINE_list(
  'groups', ['gate', 'step'], 'weight groups to time: q, kv, gate, down, head, step'
)
flags.DEFINE_list(
  'formulations',
  ['f32', 'bf16-linear', 'bf16-dot', 'bf16-dot-pad', 'bf16-upcast', 'f16-dot'],
  'formulations to time (f16-upcast, f32-dot-pad, f16-dot-pad, *-reduce, f16-linear also exist)',
)
flags.DEFINE_bool('flush', True, 'read 384 MiB between calls so weights come from DRAM')
flags.DEFINE_string(
  'hlo_dir', '', 'write optimized HLO per formulation here and summarise it; no timing'
)

LAYERS, D, KV, F, VOCAB = 30, 576, 192, 1536, 49152
SHAPES = dict(q=(D, D), k=(D, KV), v=(D, KV), o=(D, D), gate=(D, F), up=(D, F), down=(F, D))
GROUPS = dict(q=['q'], kv=['k', 'v'], gate=['gate'], down=['down'])
DTYPES = {'f32': jnp.float32, 'bf16': jnp.bfloat16, 'f16': jnp.float16}


def _dtype(form: str):
  return DTYPES[form.split('-')[0]]


def dims_of(head: bool):
  return (((1,), (1,)), ((), ())) if head else (((1,), (0,)), ((), ()))


def matmul(form: str, x, w, head: bool = False):
  """x [M, K] f32 times w ([K, N], or [N, K] contracted on K for the head), f32 result."""
  if form.endswith('-reduce'):  # multiply + reduce: the convert fuses into the reduction's loop
    w = w.astype(jnp.float32)
    if head:
      return jnp.sum(x[:, None, :] * w[None], axis=-1)
    return jnp.sum(x[:, :, None] * w[None], axis=1)
  if (
    form.endswith('-pad') and x.shape[0] == 1
  ):  # batch 1 as a 2-row dot (XLA keeps M=1 off YNNPACK)
    return matmul(form[: -len('-pad')], jnp.concatenate([x, x]), w, head)[:1]
  form = form.removesuffix('-pad')
  if form.endswith('-linear'):  # as nnx.Linear(dtype=bf16) computes: low-precision in and out
    return jax.lax.dot_general(x.astype(w.dtype), w, dims_of(head)).astype(jnp.float32)
  dims = dims_of(head)
  if form == 'f32' or form.endswith('-upcast'):
    return jax.lax.dot_general(x, w.astype(jnp.float32), dims)
  return jax.lax.dot_general(x.astype(w.dtype), w, dims, preferred_element_type=jnp.float32)


def _next(x, y):
  """Chains calls: the next input depends on this output (as decode's layers do)."""
  return x + 1e-3 * jnp.mean(y, axis=-1, keepdims=True)


def make_fn(form: str, group: str):
  if group == 'head':
    return jax.jit(lambda x, ws: matmul(form, x, ws, head=True))
  if group == 'step':

    def step(x, layers, head):
      for w in layers:  # unrolled, as the decoder's layers are
        q, k, v = (matmul(form, x, w[n]) for n in 'qkv')
        attn = q + 1e-3 * (jnp.tile(k, (1, 3)) + jnp.tile(v, (1, 3)))
        x = x + matmul(form, attn, w['o'])
        h = jax.nn.silu(matmul(form, x, w['gate'])) * matmul(form, x, w['up'])
        x = x + matmul(form, h, w['down'])
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
      return matmul(form, x, head, head=True)

    return jax.jit(step)

  def chain(x, ws):
    out = []
    for w in ws:
      y = matmul(form, x, w)
      out.append(jnp.sum(y))
      x = _next(x, y)
    return x, jnp.stack(out)

  return jax.jit(chain)


def weights(key):
  keys = iter(jax.random.split(key, LAYERS * len(SHAPES) + 1))
  layers = [
    {n: np.asarray(jax.random.normal(next(keys), s) * 0.02) for n, s in SHAPES.items()}
    for _ in range(LAYERS)
  ]
  return layers, np.asarray(jax.random.normal(next(keys), (VOCAB, D)) * 0.02)


def group_args(group, layers, head, x):
  """(args, number of weights, K of the first matmul) for a group at one dtype."""
  if group == 'head':
    return (x, head), head.size
  if group == 'step':
    n = sum(w.size for layer in layers for w in layer.values()) + head.size
    return (x, layers, head), n
  ws = [layer[n] for layer in layers for n in GROUPS[group]]
  return (x, ws), sum(w.size for w in ws)


def in_dim(group):
  return F if group == 'down' else D


def _fmt(xs, scale=1.0, digits=1) -> str:
  xs = [x * scale for x in xs]
  return f'{statistics.median(xs):.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})'


def summarise_hlo(text: str) -> str:
  """Each dot with its operand types, where it runs, and the weight-sized converts: materialised
  (a fusion whose result is the converted array, written to memory every call) or fused."""
  types = dict(re.findall(r'%([\w.-]+) = (\w+\[[\d,]*\])', text))
  dots = [
    f'{types.get(a, "?")} x {types.get(b, "?")} -> {o}'
    for o, a, b in re.findall(r'= (\w+\[[\d,]*\])\S* dot\(%([\w.-]+), %([\w.-]+)\)', text)
  ]

  def big(shape):
    return int(np.prod([int(d) for d in re.findall(r'\d+', shape.split('[')[1])] or [1])) >= D * KV

  materialised, fused = [], []
  for root, o, i in re.findall(
    r'(ROOT )?%[\w.-]+ = (\w+\[[\d,]*\])\S* convert\(%([\w.-]+)\)', text
  ):
    if big(o):
      (materialised if root else fused).append(f'{types.get(i, "?")} -> {o}')
  runs = sorted(set(re.findall(r'"kind":"(__\w+)"', text))) or ['XLA dot thunk']
  return (
    f'dot {dots or "none"} in {runs}; weight converts materialised per call: '
    f'{materialised or "none"}, fused: {fused or "none"}'
  )


def dump_hlo() -> None:
  out = pathlib.Path(FLAGS.hlo_dir)
  out.mkdir(parents=True, exist_ok=True)
  gate = jax.random.normal(jax.random.key(0), SHAPES['gate']) * 0.02
  w = {k: gate.astype(dt) for k, dt in DTYPES.items()}
  print(f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; {machine.cpu()}')
  for b in [int(b) for b in FLAGS.batches]:
    x = jnp.ones((b, D), jnp.float32)
    for form in FLAGS.formulations:
      f = jax.jit(lambda x, w, form=form: matmul(form, x, w))
      text = f.lower(x, w[form.split('-')[0]]).compile().as_text()
      (out / f'gate_{form}_m{b}.txt').write_text(text)
      print(f'M={b} {form}: {summarise_hlo(text)}')


FORMS = [
  f'{d}-{k}' for d in DTYPES for k in ('dot', 'upcast', 'linear', 'dot-pad', 'reduce') if d != 'f32'
] + ['f32', 'f32-dot-pad', 'f32-reduce']


def main(argv) -> None:
  del argv
  if bad := set(FLAGS.formulations) - set(FORMS):
    raise app.UsageError(f'unknown --formulations {sorted(bad)}; choose from {FORMS}')
  if bad := set(FLAGS.groups) - {*GROUPS, 'head', 'step'}:
    raise app.UsageError(
      f'unknown --groups {sorted(bad)}; choose from q, kv, gate, down, head, step'
    )
  if FLAGS.hlo_dir:
    dump_hlo()
    return
  layers32, head32 = weights(jax.random.key(0))
  batches = [int(b) for b in FLAGS.batches]
  stored = {}
  for name, dt in DTYPES.items():
    if not any(f.startswith(name) for f in FLAGS.formulations):
      continue
    stored[name] = (
      [{n: jnp.asarray(w, dt) for n, w in layer.items()} for layer in layers32],
      jnp.asarray(head32, dt),
    )
  del layers32, head32
  flush_buf = np.ones(384 * 2**18, np.float32) if FLAGS.flush else None

  def flush():
    if flush_buf is not None:
      flush_buf.sum()

  cases = {}  # (group, batch, form) -> (fn, args, weights, bytes)
  for group in FLAGS.groups:
    for b in batches:
      x = jax.random.normal(jax.random.key(b), (b, in_dim(group)), jnp.float32)
      for form in FLAGS.formulations:
        layers, head = stored[form.split('-')[0]]
        args, n = group_args(group, layers, head, x)
        cases[group, b, form] = (
          make_fn(form, group),
          args,
          n,
          n * jnp.dtype(_dtype(form)).itemsize,
        )
  t0 = time.perf_counter()
  for fn, args, _, _ in cases.values():  # compile + warm up
    jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  times = {k: [] for k in cases}
  for rep in range(FLAGS.reps):
    keys = list(cases)
    if rep % 2:  # alternate the order, so no formulation always follows the same one
      keys.reverse()
    for k in keys:
      fn, args, _, _ = cases[k]
      flush()
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[k].append(time.perf_counter() - t)

  print(
    f'SmolLM2-135M decode shapes; jax {jax.__version__}; {machine.cpu()}; '
    f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; flush={FLAGS.flush}; {FLAGS.reps} interleaved '
    f'reps (compile+warm-up {compile_s:.0f} s); load {os.getloadavg()[0]:.1f}; median (range)\n'
  )
  print('| group | M | formulation | ms | MB read | GB/s | GFLOP/s | time / f32 |')
  print('|---|---|---|---|---|---|---|---|')
  for (group, b, form), ts in times.items():
    _, _, n, nbytes = cases[group, b, form]
    base = times.get((group, b, 'f32'))
    ratio = _fmt([t / t0 for t, t0 in zip(ts, base, strict=True)], digits=2) if base else '-'
    print(
      f'| {group} | {b} | {form} | {_fmt(ts, 1e3, 2)} | {nbytes / 1e6:.1f} | '
      f'{_fmt([nbytes / t / 1e9 for t in ts])} | {_fmt([2 * b * n / t / 1e9 for t in ts])} | '
      f'{ratio} |'
    )


if __name__ == '__main__':
  app.run(main)
