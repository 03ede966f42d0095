"""In-process tests of `train_loop.fit` with a tiny regression model: NaN stop, resume_from,
init_from, and a finished run being a no-op. (tests/lm_pretrain/train_test.py covers the launcher
end to end in subprocesses.)"""

from __future__ import annotations

import json

from flax import nnx
import jax
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
  with train_loop.Run(config, workdir, mesh=mesh) as run:
    return train_loop.fit(
      run,
      create_state=lambda: train_loop.TrainState(Linear(nnx.Rngs(0)), optax.sgd(lr)),
      loss_fn=loss_fn,
      train_iter=data.batch_iterator(source, global_batch_size=4),
      eval_fn=eval_fn,
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
    with train_loop.Run(cfg, tmp_path, mesh=mesh) as r:
      return train_loop.fit(
        r,
        create_state=lambda: train_loop.TrainState(Linear(nnx.Rngs(0)), optax.sgd(0.0)),
        loss_fn=loss_fn,
        train_iter=data.batch_iterator(Regression(), global_batch_size=4),
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


# ---------------------------------------------------------------------------------------------------
# The run skeleton's reliability: each test below failed before train_loop.Run.


def test_stopped_after_the_last_step_completes_with_the_real_results(tmp_path):
  """SIGTERM right after the last step (checkpoint saved, results.json not yet written): the
  re-run restores that checkpoint and writes the uninterrupted run's results, not empty ones."""
  done = fit(make_config(), tmp_path / 'full', Regression(), eval_fn=_kernel_norm)
  with pytest.raises(train_loop.Preempted, match='step 20'):
    fit(make_config(**{'debug.sigterm_after_step': 20}), tmp_path / 'cut', Regression())
  assert not (tmp_path / 'cut' / 'results.json').exists()
  again = fit(make_config(), tmp_path / 'cut', Regression(), eval_fn=_kernel_norm)
  assert again.train == done.train and again.train
  assert json.loads((tmp_path / 'cut' / 'results.json').read_text())['train'] == done.train


def test_results_json_is_reproducible_and_timing_lives_in_run_json(tmp_path):
  fit(make_config(), tmp_path / 'a', Regression())
  with pytest.raises(train_loop.Preempted):
    fit(make_config(**{'debug.sigterm_after_step': 7}), tmp_path / 'b', Regression())
  fit(make_config(), tmp_path / 'b', Regression())
  a, b = ((tmp_path / d / 'results.json').read_text() for d in 'ab')
  assert a == b and 'wall_time' not in a
  prov = json.loads((tmp_path / 'b' / 'run.json').read_text())
  assert [s['status'] for s in prov['starts']] == ['preempted', 'finished']
  assert [(s['start_step'], s['end_step']) for s in prov['starts']] == [(0, 7), (7, 20)]
  assert prov['status'] == 'finished' and prov['wall_time_sec'] > 0
  assert prov['versions']['jax'] and prov['devices']['count'] >= 1 and 'commit' in prov['git']


def test_a_second_run_on_a_locked_workdir_stops_at_once(tmp_path):
  mesh = _one_device()
  with (
    train_loop.Run(make_config(), tmp_path, mesh=mesh),
    pytest.raises(train_loop.WorkdirError, match='in use by another run'),
  ):
    train_loop.Run(make_config(), tmp_path, mesh=mesh)
  with train_loop.Run(make_config(), tmp_path, mesh=mesh):  # released on exit
    pass


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'checkpoint.keep': 0}, 'checkpoint.keep=0 must be >= 1'),
    ({'train.num_steps': 0}, 'train.num_steps=0 must be >= 1'),
    ({'train.log_every': 0}, 'train.log_every=0 must be >= 1'),
    ({'train.eval_every': -1}, 'train.eval_every=-1 must be >= 0'),
    ({'dtype': 'float17'}, "dtype='float17' is not one of"),
  ],
)
def test_bad_infrastructure_keys_stop_before_the_workdir_exists(tmp_path, overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    train_loop.Run(make_config(**overrides), tmp_path / 'w', mesh=_one_device())
  assert not (tmp_path / 'w').exists()


def test_eval_every_zero_means_no_evaluation(tmp_path):
  result = fit(make_config(**{'train.eval_every': 0}), tmp_path, Regression(), eval_fn=_kernel_norm)
  assert result.eval == {} and _evals(tmp_path) == []


def test_workdir_that_is_a_file_or_not_writable_is_one_error(tmp_path):
  (tmp_path / 'f').write_text('')
  with pytest.raises(train_loop.WorkdirError, match='is a file'):
    train_loop.Run(make_config(), tmp_path / 'f', mesh=_one_device())
  mnt = tmp_path / 'ro'
  mnt.mkdir()
  import subprocess  # noqa: PLC0415

  if subprocess.run(
    ['mount', '-t', 'tmpfs', '-o', 'ro', 'tmpfs', str(mnt)], check=False
  ).returncode:
    pytest.skip('cannot mount a read-only tmpfs here')
  try:
    with pytest.raises(train_loop.WorkdirError, match='cannot write to --workdir .*Read-only'):
      train_loop.Run(make_config(), mnt / 'run', mesh=_one_device())
  finally:
    subprocess.run(['umount', '-l', str(mnt)], check=False)


def test_nan_before_any_checkpoint_says_so(tmp_path):
  with pytest.raises(train_loop.NonFiniteLoss, match='at step 2; stopped, no checkpoint was saved'):
    fit(make_config(), tmp_path, Regression(nan_from=4))


class Wide(nnx.Module):
  """Linear plus a large frozen-by-sgd-zero-grad vector, so the checkpoint holds a real data file
  (small arrays sit inline in Orbax's checksummed index, where damage is already a read error)."""

  def __init__(self, rngs):
    self.linear = Linear(rngs)
    self.pad = nnx.Param(jax.random.normal(rngs.params(), (100_000,)))

  def __call__(self, x):
    return self.linear(x)


def _wide_fit(config, workdir):
  with train_loop.Run(config, workdir, mesh=_one_device()) as run:
    return train_loop.fit(
      run,
      create_state=lambda: train_loop.TrainState(Wide(nnx.Rngs(0)), optax.sgd(0.05)),
      loss_fn=loss_fn,
      train_iter=data.batch_iterator(Regression(), global_batch_size=4),
    )


def test_damaged_latest_checkpoint_of_a_finished_run_is_not_resumed(tmp_path, caplog):
  """8 bytes overwritten in the latest step: continuing the run (more steps) falls back to the
  previous step with a warning instead of training on from silently wrong weights."""
  import logging  # noqa: PLC0415

  _wide_fit(make_config(), tmp_path)
  step_dir = tmp_path / 'checkpoints' / '20'
  big = max((p for p in step_dir.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  raw = bytearray(big.read_bytes())
  raw[len(raw) // 2 : len(raw) // 2 + 8] = b'\xff' * 8
  big.write_bytes(bytes(raw))
  with caplog.at_level(logging.WARNING):
    _wide_fit(make_config(**{'train.num_steps': 25}), tmp_path)
  text = '\n'.join(r.getMessage() for r in caplog.records)
  assert 'checkpoint step 20' in text and 'restored the older checkpoint step 15' in text
  assert '{"' not in text  # no TensorStore spec dump in the warning


@pytest.fixture
def tiny_disk(tmp_path):
  import subprocess  # noqa: PLC0415

  mnt = tmp_path / 'disk'
  mnt.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=192k', 'tmpfs', str(mnt)]).returncode:
    pytest.skip('cannot mount a tmpfs here')
  yield mnt
  subprocess.run(['umount', '-l', str(mnt)], check=False)


def test_disk_full_is_one_error_and_leaves_no_partial_checkpoint(tiny_disk):
  from common import checkpoint  # noqa: PLC0415

  with pytest.raises(checkpoint.CheckpointError, match='no space left on device'):
    _wide_fit(make_config(**{'checkpoint.async_save': True}), tiny_disk / 'run')
  assert not list((tiny_disk / 'run' / 'checkpoints').glob('*tmp*'))


def _one_device():
  import jax  # noqa: PLC0415

  from common import sharding  # noqa: PLC0415

  return sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])


def test_the_learning_rate_is_logged_at_each_window(tmp_path):
  import optax  # noqa: PLC0415

  schedule = optax.linear_schedule(0.1, 0.0, 20)
  with train_loop.Run(make_config(), tmp_path, mesh=_one_device()) as run:
    train_loop.fit(
      run,
      create_state=lambda: train_loop.TrainState(Linear(nnx.Rngs(0)), optax.sgd(schedule)),
      loss_fn=loss_fn,
      train_iter=data.batch_iterator(Regression(), global_batch_size=4),
      learning_rate=schedule,
    )
  rows = [json.loads(x) for x in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  lrs = [(r['step'], r['lr']) for r in rows if r['split'] == 'train']
  assert lrs == [(10, pytest.approx(0.1 * 11 / 20)), (20, pytest.approx(0.1 * 1 / 20))]
