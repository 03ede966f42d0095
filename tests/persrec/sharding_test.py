"""Sharded (8 fake devices, data=2 x fsdp=2 x tensor=2) PerSRec train steps == one device.

In-process and step-level (the default suite's check; train_test.py has the whole-run subprocess
version, marked slow): the same initial parameters, batches and keys through
common.train_loop.make_train_step on both meshes; losses agree to 1e-5 relative and parameters
to 1e-4 after Adam (which amplifies rounding differences; ../shared/docs/stack.md).
"""

from __future__ import annotations

from flax import nnx
import jax
import numpy as np

from common import sharding
from common import train_loop
from experiments.persrec.configs import base
from projects.persrec import input_pipeline
from projects.persrec import losses
from projects.persrec import models
from projects.persrec import train


def _steps(mesh, config, mcfg, batches):
  rules = tuple(tuple(r) for r in config.sharding.rules)
  create = train.create_state_fn(config, mcfg)
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    spec = train_loop.init_state(create, mesh, rules)
    step = train_loop.make_train_step(spec.graphdef, losses.make_loss_fn(config), spec.shardings)
    state, step_losses = spec.state, []
    for i, b in enumerate(batches):
      state, m = step(state, sharding.to_global(b, mesh, rules), train_loop.step_key(0, i, 'train'))
      step_losses.append(float(m['loss']))
    params = jax.device_get(nnx.state(train_loop.model_of(spec.graphdef, state), nnx.Param))
  return step_losses, params


def test_sharded_steps_match_one_device():
  assert jax.device_count() == 8
  config = base.get_config('smoke')
  d = input_pipeline.make_data(config)
  mcfg = models.model_config(config, d)
  assert mcfg.vocab_size % 2 == 0 and config.data.batch_size % 4 == 0
  it = input_pipeline.train_iterator(config, d)
  batches = [next(it) for _ in range(3)]
  one = sharding.make_mesh([('data', 1), ('fsdp', 1), ('tensor', 1)], jax.devices()[:1])
  eight = sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])
  l1, p1 = _steps(one, config, mcfg, batches)
  l8, p8 = _steps(eight, config, mcfg, batches)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert isinstance(mcfg, models.ModelConfig)
