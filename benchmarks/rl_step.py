"""RL step speed: rollout tokens/s and update tokens/s of common.rl's loop pieces.

    python -m benchmarks.rl_step [--d_model=64] [--layers=2] [--prompts=16] [--group=4] [--steps=12]

Rollout: `common.sampling.sampler.generate` with num_samples=G (one prefill per prompt, the KV
cache forked G ways, jit-ed decode), and the whole `common.rl.loop.rollout` (plus host-side
rewards and batch building), on a random decoder with the smoke's shapes (vocab 21, prompt 12, up to 8 new tokens, no
stop token so every row decodes the full length); compared in the same run with the same samples
drawn from G tiled copies of each prompt (G prefills), the way a loop without forking samples.
Update: one clipped-surrogate optimizer step (`train_loop.make_train_step` on
`loop.make_loss_fn`) over the M*G sequences; tokens/s counts every input position.

Medians and ranges over --steps timed repetitions after 2 warm-up ones. The issue's peer,
google-tunix's GRPO learner, is not measured here yet (see projects/ebpo/README.md).
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import numpy as np
import optax

from common import train_loop
from common.models import decoder
from common.rl import curriculum
from common.rl import loop
from common.sampling import sampler as sampler_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer('d_model', 64, 'model width')
flags.DEFINE_integer('layers', 2, 'decoder layers')
flags.DEFINE_integer('prompts', 16, 'prompts per step (M)')
flags.DEFINE_integer('group', 4, 'samples per prompt (G)')
flags.DEFINE_integer('new_tokens', 8, 'generated tokens per sample')
flags.DEFINE_integer('steps', 12, 'timed repetitions')

VOCAB, PROMPT_LEN = 21, 12


def _model():
  cfg = decoder.DecoderConfig(
    vocab_size=VOCAB,
    d_model=FLAGS.d_model,
    num_layers=FLAGS.layers,
    num_heads=4,
    num_kv_heads=4,
    head_dim=FLAGS.d_model // 4,
    mlp_dim=4 * FLAGS.d_model,
  )
  with nnx.use_eager_sharding(False):
    return decoder.Decoder(cfg, rngs=nnx.Rngs(0))


def _timed(fns, reps: int) -> list[list[float]]:
  """Seconds per call of each function, calls interleaved (a, b, c, a, b, c, ...) so that a
  change in the machine's load hits every candidate alike."""
  for _ in range(2):
    for fn in fns:
      fn()
  out = [[] for _ in fns]
  for _ in range(reps):
    for i, fn in enumerate(fns):
      t0 = time.perf_counter()
      fn()
      out[i].append(time.perf_counter() - t0)
  return out


def _fmt(name: str, seconds: list[float], tokens: int) -> str:
  rates = sorted(tokens / s for s in seconds)
  return (
    f'{name:<28} {statistics.median(seconds) * 1e3:8.1f} ms '
    f'({min(seconds) * 1e3:.1f}-{max(seconds) * 1e3:.1f})  '
    f'{statistics.median(rates):10.0f} tok/s ({rates[0]:.0f}-{rates[-1]:.0f})'
  )


def main(argv):
  del argv
  m, g, n = FLAGS.prompts, FLAGS.group, FLAGS.new_tokens
  rng = np.random.default_rng(0)
  prompts = [
    curriculum.Prompt(uid=i, tokens=tuple(rng.integers(3, VOCAB, size=8).tolist()), payload=None)
    for i in range(m)
  ]
  rl = loop.rl_config()
  rl.update(group_size=g, prompts_per_step=m, prompt_len=PROMPT_LEN, max_new_tokens=n)
  setup = loop.RLSetup(
    create_model=_model,
    tx=optax.adam(1e-4),
    train_prompts=prompts,
    eval_prompts=[],
    verifier=lambda p, c: float(len(c) > 0 and c[0] % 2 == 0),
    stop_tokens=(),
  )
  model = _model()
  counter = loop._Counter()  # noqa: SLF001
  key = jax.random.key(0)

  def full_rollout():
    return loop.rollout(model, prompts, key, rl=rl, setup=setup, counter=counter)

  p_tokens, p_mask = loop.pad_prompts(prompts, PROMPT_LEN, 0)

  def forked():
    gen = sampler_lib.generate(
      model,
      p_tokens,
      p_mask,
      config=sampler_lib.SamplingConfig(max_new_tokens=n),
      key=sampler_lib.row_keys(key, np.arange(m)),
      num_samples=g,
      prompt_bucket=PROMPT_LEN,
    )
    return jax.block_until_ready(gen.tokens)

  tiled_prompts = [p for p in prompts for _ in range(g)]
  tokens, mask = loop.pad_prompts(tiled_prompts, PROMPT_LEN, 0)
  keys = sampler_lib.fork_keys(
    sampler_lib.row_keys(key, np.arange(m)), g
  )  # the forked run's per-sample keys

  def tiled():
    gen = sampler_lib.generate(
      model,
      tokens,
      mask,
      config=sampler_lib.SamplingConfig(max_new_tokens=n),
      key=keys,
      prompt_bucket=PROMPT_LEN,
    )
    return jax.block_until_ready(gen.tokens)

  gen_tokens = m * g * n
  fork_s, tile_s, full_s = _timed([forked, tiled, full_rollout], FLAGS.steps)

  ro = full_rollout()
  graphdef, state = nnx.split(train_loop.TrainState(_model(), setup.tx))
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step = train_loop.make_train_step(graphdef, loop.make_loss_fn(rl), shardings)
  batch = dict(ro.batch)
  batch['advantages'] = rng.normal(size=m * g).astype(np.float32)
  batch['old_logp'] = np.asarray(loop._score_train_state(graphdef, state, batch))  # noqa: SLF001
  batch['ref_logp'] = batch['old_logp']
  holder = {'state': state}

  def update():
    holder['state'], metrics = step(holder['state'], batch, jax.random.key(1))
    jax.block_until_ready(metrics['loss'])

  (upd_s,) = _timed([update], FLAGS.steps)
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(
    f'd_model {FLAGS.d_model}, {FLAGS.layers} layers ({params / 1e6:.2f}M params), M={m}, G={g}, '
    f'prompt {PROMPT_LEN}, {n} new tokens; {jax.devices()[0].platform}, {FLAGS.steps} reps'
  )
  print(_fmt('generate, forked (ours)', fork_s, gen_tokens))
  print(_fmt('generate, G tiled prompts', tile_s, gen_tokens))
  print(f'forked / tiled speed: {statistics.median(tile_s) / statistics.median(fork_s):.2f}x')
  print(_fmt('loop.rollout (+ rewards)', full_s, gen_tokens))
  print(_fmt('update (fwd+bwd+adam)', upd_s, int(batch['inputs'].size)))


if __name__ == '__main__':
  app.run(main)
