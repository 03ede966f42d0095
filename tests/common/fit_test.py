"""In-process tests of `train_loop.fit` with a tiny regression model: NaN stop, resume_from,
init_from, and a finished run being a no-op. (tests/lm_pretrain/train_test.py covers the launcher
end to end in subprocesses.)"""

from __future__ import annotations

import json

from flax import nnx
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import config as config_lib
from common import data
from common import train_loop


class Regression:
  """Example i: x ~ N(0, 1)^4 from (seed, i), y = x . w; y is NaN from `nan_from` on."""

  def __init__(self, nan_from: int | None = None):
    self.nan_from = nan_from

  def __len__(self):
    return 10_000

  def __getitem__(self, i):
    x = np.random.default_rng([7, i]).normal(size=4).astype(np.float32)
    y = np.float32(x @ np.array([1.0, -2.0, 0.5, 3.0]))
    if self.nan_from is not None and i >= self.nan_from:
      y = np.float32('nan')
    return {'x': x, 'y': y}


class Linear(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.Linear(
      4, 1, kernel_init=nnx.with_partitioning(nnx.initializers.zeros, ('embed', None)), rngs=rngs
    )

  def __call__(self, x):
    return self.proj(x)[..., 0]


def loss_fn(model, batch, key):
  del key
  loss = jnp.mean((model(batch['x']) - batch['y']) ** 2)
  return loss, {}


def make_config(**overrides):
  c = config_lib.base_config()
  c.mesh.data = 1
  c.train.update(num_steps=20, log_every=10, eval_every=100)
  c.checkpoint.update(every_steps=5, async_save=False)
  return config_lib.finalize(c, overrides)


def fit(config, workdir, source, lr=0.05, eval_fn=None):
  import jax  # noqa: PLC0415

  from common import sharding  # noqa: PLC0415

  mesh = sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])
  return train_loop.fit(
    config,
    workdir,
    create_state=lambda: train_loop.TrainState(Linear(nnx.Rngs(0)), optax.sgd(lr)),
    loss_fn=loss_fn,
    train_iter=data.batch_iterator(source, global_batch_size=4),
    eval_fn=eval_fn,
    mesh=mesh,
  )


def checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  # Example 44 is the first NaN: batch 11 (examples 44..47) is read by step 12 (steps count from 1).
  with pytest.raises(train_loop.NonFiniteLoss, match='at step 12.*last good checkpoint is step 10'):
    fit(make_config(), tmp_path, Regression(nan_from=44))
  assert checkpoint_steps(tmp_path) == [5, 10]
  assert not (tmp_path / 'results.json').exists()


def test_training_learns_and_rerun_is_noop(tmp_path):
  result = fit(make_config(), tmp_path, Regression())
  assert result.train['loss'] < 0.5
  again = fit(make_config(), tmp_path, Regression())
  assert again.train == result.train
  assert checkpoint_steps(tmp_path) == [10, 15, 20]


def test_resume_from_continues_another_run(tmp_path):
  fit(make_config(), tmp_path / 'a', Regression())
  longer = make_config(**{'train.num_steps': 30, 'checkpoint.resume_from': str(tmp_path / 'a')})
  fit(longer, tmp_path / 'b', Regression())
  rows = [json.loads(line) for line in (tmp_path / 'b' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [30]  # started at step 20, not from scratch


def test_missing_resume_from_is_an_error(tmp_path):
  from common import checkpoint  # noqa: PLC0415

  cfg = make_config(**{'checkpoint.resume_from': str(tmp_path / 'nope')})
  with pytest.raises(checkpoint.CheckpointError, match='does not exist'):
    fit(cfg, tmp_path / 'b', Regression())


def test_init_from_loads_parameters_only(tmp_path):
  first = fit(make_config(), tmp_path / 'a', Regression())
  cfg = make_config(**{'train.num_steps': 10, 'checkpoint.init_from': str(tmp_path / 'a')})
  second = fit(cfg, tmp_path / 'b', Regression(), lr=0.0)  # lr 0: parameters stay as loaded
  np.testing.assert_allclose(second.train['loss'], first.train['loss'], rtol=0.5)
  assert second.train['loss'] < 0.5  # from scratch (zeros) the loss would be ~14


def test_initial_state_starts_from_the_given_weights_and_resume_ignores_it(tmp_path):
  import jax  # noqa: PLC0415

  from common import sharding  # noqa: PLC0415

  true_w = np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)
  calls = []

  def exact():
    model = Linear(nnx.Rngs(0))
    model.proj.kernel[...] = jnp.asarray(true_w)
    return train_loop.TrainState(model, optax.sgd(0.0))

  def initial_state(spec):
    calls.append(1)
    made = train_loop.init_state(exact, mesh, ())
    assert jax.tree.structure(made.state) == jax.tree.structure(spec.state)
    return made.state

  mesh = sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])

  def run(cfg):
    return train_loop.fit(
      cfg,
      tmp_path,
      create_state=lambda: train_loop.TrainState(Linear(nnx.Rngs(0)), optax.sgd(0.0)),
      loss_fn=loss_fn,
      train_iter=data.batch_iterator(Regression(), global_batch_size=4),
      mesh=mesh,
      initial_state=initial_state,
    )

  result = run(make_config(**{'train.num_steps': 10}))
  assert result.train['loss'] < 1e-10  # lr 0 from the exact weights; from zeros it would be ~14
  assert calls == [1]
  run(make_config(**{'train.num_steps': 15}))  # resumes from step 10's checkpoint
  assert calls == [1]


def _kernel_norm(model, step):
  del step
  return {'kernel_norm': float(jnp.linalg.norm(model.proj.kernel[...]))}


def _evals(workdir):
  rows = [json.loads(x) for x in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [(r['step'], r['kernel_norm']) for r in rows if r['split'] == 'eval']


def test_eval_at_start_evaluates_the_initial_state_once(tmp_path):
  # Off by default: the first eval is at eval_every / the end.
  fit(make_config(**{'train.num_steps': 10}), tmp_path / 'off', Regression(), eval_fn=_kernel_norm)
  assert [s for s, _ in _evals(tmp_path / 'off')] == [10]
  cfg = make_config(**{'train.num_steps': 10, 'train.eval_at_start': True})
  fit(cfg, tmp_path / 'on', Regression(), eval_fn=_kernel_norm)
  evals = _evals(tmp_path / 'on')
  assert [s for s, _ in evals] == [0, 10]
  assert evals[0][1] == 0.0 and evals[1][1] > 0.1  # zero-initialised kernel, then trained
  # Resuming past step 0 keeps the step-0 row and does not evaluate step 0 again.
  fit(
    make_config(**{'train.num_steps': 15, 'train.eval_at_start': True}),
    tmp_path / 'on',
    Regression(),
    eval_fn=_kernel_norm,
  )
  assert [s for s, _ in _evals(tmp_path / 'on')] == [0, 10, 15]
