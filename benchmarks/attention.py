"""Decode attention (one query per row over a KV cache): the XLA:CPU formulations, per shape.

    python -m benchmarks.attention [--reps=20] [--layers=30] [--flush_mib=256]

`common.models.decoder.head_major_attention` reads the KV cache's layout (keys [B, K, D, S], values
[B, K, S, D]) and, for one query per row, chooses between multiply-and-reduce fusions (broadcast q
against the keys, sum over D, a major axis; broadcast the probabilities against v, sum over S) and
batched einsums: with G = heads / kv heads > 1 (SmolLM2 9/3, Gemma-3 4/1, Qwen2.5 14/2) the
fusions, with G == 1 (multi-head attention: the tiny test and RL-benchmark decoders; there the
fusions are 10-14x slower) the einsums. The other variants read keys stored [B, K, S, D]: "fused"
(the same fusions summing over a minor D: the decoder's form before the keys became slot-minor),
"einsum", and "keys_left" (the scores as a dot with the keys as its left operand, [S, D] x [D, G]
per kv head, so YNNPACK packs only the small query block). No dot is an option inside the decode
loop: any dot on the cache just written makes XLA:CPU copy every layer's cache on every step
(`tests/common/sampling/sampler_test.py::test_decode_loop_updates_the_donated_cache_in_place`).

Each variant runs as a model would: a chain of --layers attentions, each over its own cache, after
--flush_mib of other memory has been read (a decoder streams its weights between two layers'
attention, so the caches are cold). Variants are interleaved rep by rep; the script prints wall ms
per chain, median (range), and the ratio of each variant to the decoder's choice.
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from common.models import decoder

FLAGS = flags.FLAGS
flags.DEFINE_integer('reps', 20, 'timed repetitions per variant (after one warm-up)')
flags.DEFINE_integer('layers', 30, 'attention layers per timed chain, each over its own cache')
flags.DEFINE_integer('flush_mib', 256, 'MiB read before each timed chain (0: caches stay warm)')

# (name, B, K, G, S, D)
SHAPES = (
  ('tiny MHA, RL rollout (B=64)', 64, 4, 1, 48, 16),
  ('MHA d=256 (B=16)', 16, 4, 1, 256, 64),
  ('SmolLM2, S=128 (B=16)', 16, 3, 3, 128, 64),
  ('SmolLM2, S=512 (B=16)', 16, 3, 3, 512, 64),
  ('SmolLM2, S=128 (B=1)', 1, 3, 3, 128, 64),
  ('SmolLM2, S=512 (B=1)', 1, 3, 3, 512, 64),
  ('Gemma-3, S=128 (B=16)', 16, 1, 4, 128, 256),
  ('Gemma-3, S=512 (B=16)', 16, 1, 4, 512, 256),
  ('Gemma-3, S=128 (B=1)', 1, 1, 4, 128, 256),
  ('Qwen2.5, S=128 (B=16)', 16, 2, 7, 128, 64),
  ('Qwen2.5, S=128 (B=1)', 1, 2, 7, 128, 64),
)


def fused(q, k, v, mask, scale):
  b, t, h, d = q.shape
  kv = k.shape[1]
  qf = q.reshape(b, t, kv, h // kv, d)[:, 0, :, :, None, :]
  logits = jnp.sum(qf * k[:, :, None], axis=-1)[:, :, :, None] * scale
  return _fused_values(_softmax(logits, mask), v, q.shape)


def einsum(q, k, v, mask, scale):
  b, t, h, d = q.shape
  kv = k.shape[1]
  q = q.reshape(b, t, kv, h // kv, d)
  logits = jnp.einsum('btkgd,bksd->bkgts', q, k, preferred_element_type=jnp.float32) * scale
  probs = _softmax(logits, mask)
  out = jnp.einsum('bkgts,bksd->btkgd', probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, d)


def keys_left(q, k, v, mask, scale):
  b, t, h, d = q.shape
  kv = k.shape[1]
  qg = q.reshape(b, kv, h // kv, d)
  logits = jnp.swapaxes(jnp.einsum('bksd,bkgd->bksg', k, qg), -1, -2)[:, :, :, None] * scale
  return _fused_values(_softmax(logits, mask), v, q.shape)


def _fused_values(probs, v, q_shape):
  """The probability-weighted values [B, 1, H, D] as a multiply-and-reduce over the slots."""
  out = jnp.sum(probs[:, :, :, 0, :, None] * v[:, :, None], axis=3)
  return out[:, None].reshape(q_shape)


def _softmax(logits, mask):
  mask = mask[:, :, None]
  probs = jax.nn.softmax(jnp.where(mask, logits, decoder.MASKED_LOGIT), axis=-1)
  return jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)


def _chain(attn, scale):
  """One query through `layers` attentions, each over its own cache, fed back as the next query."""

  def f(q, ks, vs, mask):
    for k, v in zip(ks, vs, strict=True):
      q = q + jnp.tanh(attn(q, k, v, mask, scale=scale))
    return q

  return jax.jit(f)


def _fmt(ts: list[float]) -> str:
  return f'{statistics.median(ts):8.2f} ({min(ts):.2f}-{max(ts):.2f})'


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  flush = jnp.ones((FLAGS.flush_mib * 2**18,), jnp.float32)
  read = jax.jit(jnp.sum)
  forms = {'fused': fused, 'einsum': einsum, 'keys_left': keys_left}
  print(
    f'{jax.devices()[0].platform}, wall ms per chain of {FLAGS.layers} layers, {FLAGS.flush_mib} MiB '
    f'read before each, median (range) of {FLAGS.reps}; x = variant time / decoder time'
  )
  print(f'{"shape":30s}' + ''.join(f'{n:>28s}' for n in [*forms, 'decoder']))
  for name, b, kv, g, s, d in SHAPES:
    h, scale = kv * g, d**-0.5
    q = jnp.asarray(rng.normal(size=(b, 1, h, d)), jnp.float32)
    ks = [jnp.asarray(rng.normal(size=(b, kv, s, d)), jnp.float32) for _ in range(FLAGS.layers)]
    vs = [jnp.asarray(rng.normal(size=(b, kv, s, d)), jnp.float32) for _ in range(FLAGS.layers)]
    mask = jnp.asarray(rng.random((b, 1, 1, s)) < 0.9)
    kts = [jnp.swapaxes(k, -1, -2).copy() for k in ks]  # the cache's slot-minor keys
    fns = {n: _chain(f, scale) for n, f in forms.items()}
    fns['decoder'] = _chain(decoder.head_major_attention, scale)
    keys = {n: kts if n == 'decoder' else ks for n in fns}
    ref = np.asarray(fns['decoder'](q, kts, vs, mask))
    for f in forms:
      np.testing.assert_allclose(np.asarray(fns[f](q, ks, vs, mask)), ref, atol=1e-4)
    # Interleave the variants rep by rep so load changes hit them alike.
    times = {n: [] for n in fns}
    for _ in range(FLAGS.reps):
      for n, fn in fns.items():
        if FLAGS.flush_mib:
          read(flush).block_until_ready()
        start = time.perf_counter()
        jax.block_until_ready(fn(q, keys[n], vs, mask))
        times[n].append((time.perf_counter() - start) * 1e3)
    dec_ms = statistics.median(times['decoder'])
    cells = [f'{_fmt(t)} {statistics.median(t) / dec_ms:4.2f}x' for t in times.values()]
    print(f'{f"{name} G={g}":30s}' + ''.join(f'{c:>28s}' for c in cells))
    del ks, kts, vs, keys


if __name__ == '__main__':
  app.run(main)
