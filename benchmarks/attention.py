"""Decode attention (one query per row over a KV cache): the two XLA:CPU formulations, per shape.

    python -m benchmarks.attention [--reps=40]

`common.models.decoder.head_major_attention` reads the cache as [B, K, S, D] and, for one query per
row, chooses between multiply-and-reduce fusions (broadcast q against k, sum over D; broadcast the
probabilities against v, sum over S) and batched einsums. Which one XLA:CPU runs faster depends on
the group size G = heads / kv heads: with G > 1 (SmolLM2 9/3, Gemma-3 4/1, Qwen2.5 14/2) the fusions
win; with G == 1 (multi-head attention: the tiny test and RL-benchmark decoders) they were 4-25x
slower, so the decoder takes the einsums there. This script times both formulations and the
decoder's own choice on the shapes that matter, in one process, and prints CPU-time medians and
ranges (steadier than wall time on a shared machine) and the ratio einsum / fused.
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

from common.models import decoder

FLAGS = flags.FLAGS
flags.DEFINE_integer('reps', 40, 'timed repetitions per variant (after one warm-up)')

# (name, B, K, G, S, D)
SHAPES = (
  ('tiny MHA, RL rollout (B=64)', 64, 4, 1, 48, 16),
  ('MHA d=256 (B=16)', 16, 4, 1, 256, 64),
  ('SmolLM2, S=128 (B=16)', 16, 3, 3, 128, 64),
  ('SmolLM2, S=512 (B=16)', 16, 3, 3, 512, 64),
  ('SmolLM2, S=128 (B=1)', 1, 3, 3, 128, 64),
  ('Gemma-3, S=128 (B=16)', 16, 1, 4, 128, 256),
)


def fused(q, k, v, mask, scale):
  b, t, h, d = q.shape
  kv = k.shape[1]
  qf = q.reshape(b, t, kv, h // kv, d)[:, 0, :, :, None, :]
  logits = jnp.sum(qf * k[:, :, None], axis=-1)[:, :, :, None] * scale
  probs = _softmax(logits, mask)
  out = jnp.sum(probs[:, :, :, 0, :, None] * v[:, :, None], axis=3)
  return out[:, None].reshape(b, t, h, d)


def einsum(q, k, v, mask, scale):
  b, t, h, d = q.shape
  kv = k.shape[1]
  q = q.reshape(b, t, kv, h // kv, d)
  logits = jnp.einsum('btkgd,bksd->bkgts', q, k, preferred_element_type=jnp.float32) * scale
  probs = _softmax(logits, mask)
  out = jnp.einsum('bkgts,bksd->btkgd', probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, d)


def _softmax(logits, mask):
  mask = mask[:, :, None]
  probs = jax.nn.softmax(jnp.where(mask, logits, decoder.MASKED_LOGIT), axis=-1)
  return jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)


def _cpu_ms(fn, args, reps: int) -> list[float]:
  jax.block_until_ready(fn(*args))
  out = []
  for _ in range(reps):
    c = time.process_time()
    jax.block_until_ready(fn(*args))
    out.append((time.process_time() - c) * 1e3)
  return out


def _fmt(ts: list[float]) -> str:
  return f'{statistics.median(ts):8.3f} ({min(ts):.3f}-{max(ts):.3f})'


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  print(f'{jax.devices()[0].platform}, CPU ms per call, median (range) of {FLAGS.reps}')
  print(f'{"shape":32s} {"fused":>24s} {"einsum":>24s} {"decoder":>24s}  einsum/fused')
  for name, b, kv, g, s, d in SHAPES:
    h, scale = kv * g, d**-0.5
    q = jnp.asarray(rng.normal(size=(b, 1, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, kv, s, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, kv, s, d)), jnp.float32)
    mask = jnp.asarray(rng.random((b, 1, 1, s)) < 0.9)
    fns = {
      'fused': jax.jit(functools.partial(fused, scale=scale)),
      'einsum': jax.jit(functools.partial(einsum, scale=scale)),
      'decoder': jax.jit(functools.partial(decoder.head_major_attention, scale=scale)),
    }
    ref = np.asarray(fns['decoder'](q, k, v, mask))
    for f in ('fused', 'einsum'):
      np.testing.assert_allclose(np.asarray(fns[f](q, k, v, mask)), ref, atol=2e-5)
    # Interleave the variants rep by rep so load changes hit them alike.
    times = {n: [] for n in fns}
    for _ in range(FLAGS.reps):
      for n, fn in fns.items():
        times[n] += _cpu_ms(fn, (q, k, v, mask), 1)
    ratio = statistics.median(times['einsum']) / statistics.median(times['fused'])
    label = f'{name} G={g}'
    print(
      f'{label:32s} {_fmt(times["fused"])} {_fmt(times["einsum"])} {_fmt(times["decoder"])}  '
      f'{ratio:.2f}x'
    )


if __name__ == '__main__':
  app.run(main)
