"""Training-step time and memory of LoRA, MixLoRA and S'MoRE adapters at an equal budget.

    python -m benchmarks.adapters                       # the shared tiny LM (no weights needed)
    python -m benchmarks.adapters --model=smollm2       # SmolLM2-135M (python -m common.assets fetch smollm2)
    python -m benchmarks.adapters --model=smollm2 --layers=4   # its first 4 of 30 layers, see below

For each preset the equal-budget plan of experiments/smore/configs/base.py (smoke for the tiny LM,
smollm2_* for SmolLM2) is built on the same frozen base, and one jit-compiled train step
(common.train_loop.make_train_step, AdamW on the adapters only, donated state) is timed: warm-up
steps, then `--steps` timed steps; each preset's steps are interleaved with LoRA's so that load
changes hit both. Printed per preset: trainable parameters, median step time and range, the median
of per-pair ratios to LoRA (the issue's goal: S'MoRE <= 1.3x LoRA), and the compiled step's
temporary memory from XLA's memory analysis.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import statistics
import sys
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import numpy as np

from common import optim
from common import sharding
from common import train_loop
from common.models import decoder
from projects.smore import input_pipeline
from projects.smore import train

FLAGS = flags.FLAGS
CONFIG_FILE = pathlib.Path(__file__).resolve().parents[1] / 'experiments/smore/configs/base.py'


def _get_config(arg: str):
  """The experiment config by file path, as `--config=...` loads it (benchmarks import no
  experiments/ module)."""
  spec = importlib.util.spec_from_file_location('smore_config', CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


flags.DEFINE_enum('model', 'tiny', ['tiny', 'smollm2'], 'base model')
flags.DEFINE_integer('steps', 10, 'timed steps per preset')
flags.DEFINE_integer('warmup', 2, 'untimed steps per preset')
flags.DEFINE_list('presets', ['lora', 'mixlora', 'smore22', 'smore44'], 'presets to time')
flags.DEFINE_integer('layers', 0, 'SmolLM2 only: keep this many layers (random weights); 0 = all')


_BASE: dict = {}


def _setup(preset: str):
  arg = 'smoke' if FLAGS.model == 'tiny' else f'smollm2_{preset}'
  config = _get_config(f'{arg},adapter.preset={preset}')
  dcfg, build, tok = train.base_model(config)
  _, build_abstract, _ = train.base_model(config, abstract=True)
  if FLAGS.layers:
    if FLAGS.model != 'smollm2':
      raise app.UsageError('--layers applies to --model=smollm2 only')
    dcfg = dataclasses.replace(dcfg, num_layers=FLAGS.layers)

    def build_abstract():
      return decoder.Decoder(dcfg, rngs=nnx.Rngs(0))

    build = build_abstract
  a = config.adapter
  plan = train.plan(a, train.target_shapes(dcfg, a))
  # The experiment's optimizer (projects/smore/train.py): clip + AdamW, schedule, flattened.
  tx = optim.make_optimizer(config.optimizer, config.train.num_steps, flatten=True)
  rules = sharding.DEFAULT_RULES
  mesh = sharding.make_mesh([('data', -1)], devices=jax.devices()[:1])
  if 'model' not in _BASE:  # load (or train, for the tiny LM) the frozen base once, eagerly
    with sharding.unsharded():
      _BASE['model'] = build()

  def create(real: bool = False):
    with sharding.unsharded():
      model = nnx.clone(_BASE['model']) if real else build_abstract()
      train.add_adapters(model, a, plan, 0, 'float32')
      return train_loop.TrainState(model, tx)

  spec = train_loop.abstract_state(create, mesh, rules)
  # Copies (the step donates its state; the shared base's buffers must survive for the next preset).
  state = jax.tree.map(
    lambda x, sh: jax.device_put(x, sh, may_alias=False),
    nnx.state(create(real=True)),
    spec.shardings,
  )
  step = train_loop.make_train_step(spec.graphdef, train.loss_fn, spec.shardings)
  if FLAGS.model == 'tiny':
    src = input_pipeline.TokenTasks(seed=0, split='train', items=config.data.triples)
    rows = [src[i] for i in range(config.data.batch_size)]
  elif FLAGS.layers:
    rng = np.random.default_rng(0)
    b, t = config.data.batch_size, config.data.seq_len
    tokens = rng.integers(1, dcfg.vocab_size, (b, t + 1)).astype(np.int32)
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    row = {
      'inputs': tokens[:, :-1],
      'targets': tokens[:, 1:],
      'loss_mask': (positions >= t // 2).astype(np.int32),
      'segment_ids': np.ones((b, t), np.int32),
      'positions': positions,
    }
    rows = [{k: v[i] for k, v in row.items()} for i in range(b)]
  else:
    d = input_pipeline.make_data(config, tok)
    rows = [d.train[i] for i in range(config.data.batch_size)]
  keys = ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')
  batch = sharding.to_global({k: np.stack([r[k] for r in rows]) for k in keys}, mesh, rules)
  key = jax.random.key(0)
  # Time the executable compiled here: calling `step` would compile it a second time
  # (lower().compile() does not fill jit's dispatch cache; SmolLM2's step takes minutes).
  compiled = step.lower(state, batch, key).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, 'temp_size_in_bytes', float('nan')) if mem is not None else float('nan')
  return {
    'state': state,
    'step': compiled,
    'batch': batch,
    'key': key,
    'count': plan['count'],
    'temp_mib': temp / 2**20,
    'mesh': mesh,
  }


def _time(s) -> tuple[float, float]:
  """(wall, CPU) seconds of one step; CPU time (all threads of this process) is the steadier
  measure on a machine shared with other jobs."""
  with jax.set_mesh(s['mesh']):
    c0, t0 = time.process_time(), time.perf_counter()
    s['state'], m = s['step'](s['state'], s['batch'], s['key'])
    jax.block_until_ready(m['loss'])
  return time.perf_counter() - t0, time.process_time() - c0


def main(argv):
  del argv
  setups = {p: _setup(p) for p in dict.fromkeys(['lora', *FLAGS.presets])}
  for s in setups.values():
    for _ in range(FLAGS.warmup):
      _time(s)
  wall = {p: [] for p in setups}
  cpu = {p: [] for p in setups}
  for _ in range(FLAGS.steps):
    for p, s in setups.items():
      t_lora = _time(setups['lora'])
      t = _time(s) if p != 'lora' else t_lora
      for i, out in enumerate((wall, cpu)):
        out[p].append((t[i], t[i] / t_lora[i]))
  load = np.round(np_load(), 1)
  layers = f' layers={FLAGS.layers} (random weights and tokens)' if FLAGS.layers else ''
  print(
    f'model={FLAGS.model}{layers} steps={FLAGS.steps} (each paired with a LoRA step) devices=1 {load=}'
  )
  print(
    '| preset | trainable | wall s/step (median, range) | wall / LoRA (median of paired ratios, '
    'range) | CPU s/step | CPU / LoRA | compiled temp MiB |'
  )
  print('|---|---|---|---|---|---|---|')

  def cell(pairs, fmt):
    t = [x[0] for x in pairs]
    r = [x[1] for x in pairs]
    return (
      f'{statistics.median(t):{fmt}} ({min(t):{fmt}}-{max(t):{fmt}}) | '
      f'{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})'
    )

  for p, s in setups.items():
    print(
      f'| {p} | {s["count"]:,} | {cell(wall[p], ".4f")} | {cell(cpu[p], ".4f")} '
      f'| {s["temp_mib"]:.1f} |'
    )
  sys.stdout.flush()


def np_load():
  try:
    import os  # noqa: PLC0415

    return os.getloadavg()
  except OSError:
    return (float('nan'),) * 3


if __name__ == '__main__':
  app.run(main)
