"""projects/smore/train.py: equal-budget plans, a smoke run, SIGTERM + resume, sharded == 1 device."""

import dataclasses
import json

from flax import nnx
import jax
import numpy as np
import optax
import pytest

from common import export
from common import metrics
from common import sharding
from common import testing
from common import train_loop
from common.adapters import core
from common.models import decoder
from common.models import hf
from common.models import spec
from experiments.smore.configs import base
from projects.smore import input_pipeline
from projects.smore import train

PRESETS = ('lora', 'mixlora', 'hydralora', 'smore22', 'smore44')
# SmolLM2-135M's shapes (common/models/families.py), so the plan needs no fetched weights.
SMOLLM2 = decoder.DecoderConfig(
  vocab_size=49152,
  d_model=576,
  num_layers=30,
  num_heads=9,
  num_kv_heads=3,
  head_dim=64,
  mlp_dim=1536,
)
SHORT = (
  'train.num_steps=8',
  'train.log_every=1',
  'train.eval_every=4',
  'checkpoint.every_steps=4',
  'data.eval_examples=64',
  'data.eval_batch_size=32',
  'checkpoint.async_save=False',
)


@pytest.mark.parametrize('variant', base.VARIANTS)
def test_every_variant_meets_the_budget_within_two_percent(variant):
  config = base.get_config(variant)
  dcfg = SMOLLM2 if variant.startswith('smollm2') else train.base_model(config, abstract=True)[0]
  presets = PRESETS if variant == 'smoke' else (config.adapter.preset,)
  for preset in presets:
    a = base.get_config(f'{variant},adapter.preset={preset}').adapter
    shapes = train.target_shapes(dcfg, a)
    assert len(shapes) == 3 * dcfg.num_layers
    p = train.plan(a, shapes)
    assert p['rel_diff'] <= 0.02
    assert p['budget'] == sum(a.budget_rank * (i + o) for i, o in shapes.values())


@pytest.mark.parametrize('preset', PRESETS)
def test_plan_counts_equal_the_real_leaf_counts(preset):
  """The closed forms the plan uses equal the adapters' real leaves (SmolLM2 shapes, 2 layers)."""
  a = base.get_config(f'smollm2_{preset}').adapter
  dcfg = dataclasses.replace(SMOLLM2, num_layers=2)
  p = train.plan(a, train.target_shapes(dcfg, a))

  def build():
    model = decoder.Decoder(dcfg, rngs=nnx.Rngs(0))
    train.add_adapters(model, a, p, 0, 'float32')
    return model

  with sharding.unsharded():
    abstract = nnx.eval_shape(build)
  assert core.count_trainable(nnx.state(abstract, core.AdapterParam)) == p['count']


def test_an_unmeetable_budget_and_a_bad_pattern_are_clear_errors():
  a = base.get_config('smoke,adapter.preset=smore44,adapter.budget_rank=4').adapter
  dcfg = train.base_model(base.get_config('smoke'), abstract=True)[0]
  with pytest.raises(core.AdapterError, match='cannot meet the budget'):
    train.plan(a, train.target_shapes(dcfg, a))
  bad = base.get_config(r'smoke,adapter.pattern=layers/\d+/ffn/.*').adapter
  with pytest.raises(core.AdapterError, match='matches no linear layer'):
    train.target_shapes(dcfg, bad)


def test_token_tasks_rows_follow_the_task_maps():
  src = input_pipeline.TokenTasks(seed=0, split='train', items=4)
  ex = src[17]
  seq = np.concatenate([ex['inputs'], ex['targets'][-1:]])
  t = int(ex['task'])
  assert seq[0] == input_pipeline.FIRST_TASK_TOKEN + t
  x, y = seq[1::3], seq[2::3]
  np.testing.assert_array_equal(y, input_pipeline.apply_task(t, x))
  np.testing.assert_array_equal(ex['targets'][ex['loss_mask'] > 0], y)  # loss on the y's only
  assert x.min() >= 1 and x.max() <= input_pipeline.MOD
  test = input_pipeline.TokenTasks(seed=0, split='test', items=4)
  assert not np.array_equal(test[17]['inputs'], ex['inputs'])  # disjoint streams
  np.testing.assert_array_equal(src[17]['inputs'], ex['inputs'])  # random access, deterministic


def _metrics(workdir):
  return metrics.read_jsonl(workdir / 'metrics.jsonl')  # without the wall-clock stamps


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('ref')
  config = base.get_config(','.join(('smoke', 'adapter.preset=mixlora', *SHORT)))
  result = train.train_and_evaluate(config, str(workdir))
  return workdir, result


def test_smoke_run_writes_outputs_and_adapter_checkpoint(reference):
  workdir, result = reference
  for name in ('config.json', 'metrics.jsonl', 'results.json', 'adapter_plan.json'):
    assert (workdir / name).is_file()
  plan = json.loads((workdir / 'adapter_plan.json').read_text())
  assert plan['real_count'] == plan['count'] and plan['rel_diff'] <= 0.02
  rows = _metrics(workdir)
  train_rows = [r for r in rows if r['split'] == 'train']
  assert [r['step'] for r in train_rows] == list(range(1, 9))
  assert all(r['balance'] > 0 for r in train_rows)  # MixLoRA's switch gate adds its loss
  assert 0.0 <= result.eval['accuracy'] <= 1.0 and 'acc_scale7' in result.eval
  # The adapters alone, loadable onto a freshly adapted base.
  config = base.get_config(','.join(('smoke', 'adapter.preset=mixlora', *SHORT)))
  dcfg, build, _ = train.base_model(config)
  p = train.plan(config.adapter, train.target_shapes(dcfg, config.adapter))
  with sharding.unsharded():
    model = build()
    train.add_adapters(model, config.adapter, p, seed=123, dtype='float32')
  assert core.load_adapters(workdir / 'adapters', model) == 8
  trained = train_loop.model_of(result.graphdef, result.state)
  testing.assert_trees_close(core.adapter_state(model), core.adapter_state(trained), rtol=0)


def test_smoke_run_exports_base_and_mixture_adapters_separately(reference, tmp_path):
  workdir, result = reference
  assert spec.read(workdir).adapters['kind'] == 'mixture'  # MixLoRA routes by token: no merge
  done = export.export(workdir, out=tmp_path)
  assert done.adapters == 'separate' and 'adapters.safetensors' in done.files
  trained = train_loop.model_of(result.graphdef, result.state)
  from safetensors import numpy as st_numpy  # noqa: PLC0415

  arrays = st_numpy.load_file(str(tmp_path / 'adapters.safetensors'))
  for path, layer in core.adapted(trained).items():
    for leaf, var in nnx.to_flat_state(nnx.state(layer.adapter, core.AdapterParam)):
      name = f'{path}/{"/".join(map(str, leaf))}'
      np.testing.assert_array_equal(arrays[name], np.asarray(var.get_value()))
  base, _, _ = hf.load(tmp_path)  # the frozen tiny LM, bitwise
  x = np.arange(12, dtype=np.int32)[None] % base.cfg.vocab_size
  np.testing.assert_array_equal(
    np.asarray(base(x)), np.asarray(spec.build(base.cfg, spec.decoder_params(trained))(x))
  )


def test_sigterm_then_resume_reproduces_the_run(reference, tmp_path):
  ref_dir, ref = reference
  arg = ','.join(('smoke', 'adapter.preset=mixlora', *SHORT))
  with pytest.raises(train_loop.Preempted):
    train.train_and_evaluate(base.get_config(arg + ',debug.sigterm_after_step=6'), str(tmp_path))
  resumed = train.train_and_evaluate(base.get_config(arg), str(tmp_path))
  assert _metrics(tmp_path) == _metrics(ref_dir)
  testing.assert_trees_equal(
    core.adapter_state(train_loop.model_of(resumed.graphdef, resumed.state)),
    core.adapter_state(train_loop.model_of(ref.graphdef, ref.state)),
  )


def _sharded_losses(mesh, preset):
  config = base.get_config(f'smoke,adapter.preset={preset}')
  a = config.adapter
  dcfg = train.base_model(config, abstract=True)[0]
  p = train.plan(a, train.target_shapes(dcfg, a))
  tx = optax.adam(1e-2)

  def create():
    model = decoder.Decoder(dcfg, rngs=nnx.Rngs(0))
    train.add_adapters(model, a, p, 0, 'float32')
    return train_loop.TrainState(model, tx)

  rules = sharding.DEFAULT_RULES
  spec = train_loop.abstract_state(create, mesh, rules)
  state = train_loop.init_state(create, mesh, rules).state
  step = train_loop.make_train_step(spec.graphdef, train.loss_fn, spec.shardings)
  src = input_pipeline.TokenTasks(seed=0, split='train', items=4)
  keys = ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')
  out = []
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    for i in range(3):
      rows = [src[i * 8 + j] for j in range(8)]
      batch = {k: np.stack([r[k] for r in rows]) for k in keys}
      state, m = step(state, sharding.to_global(batch, mesh, rules), jax.random.key(i))
      out.append((float(m['loss']), float(m['balance'])))
  return out, core.adapter_state(train_loop.model_of(spec.graphdef, state))


@pytest.mark.parametrize('preset', ['smore44'])
def test_sharded_finetuning_equals_one_device(preset):
  mesh8 = sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])
  mesh1 = sharding.make_mesh([('data', -1)], devices=jax.devices()[:1])
  l8, a8 = _sharded_losses(mesh8, preset)
  l1, a1 = _sharded_losses(mesh1, preset)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  # Adam divides each gradient by its own running RMS, so a rounding difference in a near-zero
  # gradient becomes a visible fraction of one lr-sized step: compare params at 1e-2 * lr.
  testing.assert_trees_close(a8, a1, rtol=1e-4, atol=1e-4)
