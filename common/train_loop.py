"""Thin, reusable pieces of a training loop, and `fit`, the standard loop built from them.

Papers whose loop is "sample a batch, take a gradient step" call `fit` with their model factory, loss
and data; papers with other loops (RL rollouts, streaming memory) reuse the pieces: `abstract_state` /
`init_state` (parameters created directly sharded, via eval_shape + jit out_shardings),
`make_train_step` (one pure jit-ed step with donated state), `restore_or_init` (the resume order of
the architecture doc), `MetricWriter` and the SIGTERM / non-finite guards.

The train state is one nnx graph (`TrainState`: model + optimizer) split once into a graphdef and a
state pytree; steps are pure functions of (state, batch, key), which jit compiles once and which run
without nnx's per-call graph traversal.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import pathlib
import platform
import signal
import subprocess
import sys
import time
from typing import Any
import zlib

from absl import logging
from flax import nnx
import jax
import ml_collections
import numpy as np
import optax

from common import checkpoint as ckpt_lib
from common import config as config_lib
from common import errors
from common import machine
from common import metrics as metrics_lib
from common import sharding


class NonFiniteLoss(errors.UserError, FloatingPointError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainState(nnx.Module):
  """Model and optimizer as one nnx graph, so one split gives one state pytree to jit and save."""

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation):
    self.model = model
    self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)


# ---------------------------------------------------------------------------------------------------
# Randomness: every key is a function of (seed, step, purpose), never of un-checkpointed state.


def step_key(seed: int, step: int, purpose: str) -> jax.Array:
  """The key for `purpose` at `step`; a resumed run draws exactly the same numbers."""
  key = jax.random.fold_in(jax.random.key(seed), step)
  return jax.random.fold_in(key, zlib.crc32(purpose.encode()) & 0x7FFFFFFF)


# ---------------------------------------------------------------------------------------------------
# State creation.


@dataclasses.dataclass
class ShardedState:
  graphdef: nnx.GraphDef
  state: Any  # nnx.State of jax.Arrays (concrete) or ShapeDtypeStructs (abstract)
  shardings: Any  # same structure as `state`, a NamedSharding per leaf


def abstract_state(
  create_fn: Callable[[], nnx.Module], mesh: jax.sharding.Mesh, rules: sharding.Rules
) -> ShardedState:
  """Shapes, dtypes and shardings of `create_fn()`'s state, without allocating anything."""
  captured = {}

  def split():
    with sharding.unsharded():
      captured['graphdef'], state = nnx.split(create_fn())
    return state

  # jax.eval_shape (not nnx.eval_shape, which reads the annotations as mesh axes under a mesh).
  graphdef, state = None, jax.eval_shape(split)
  graphdef = captured['graphdef']
  shardings = sharding.state_shardings(state, mesh, rules)
  abstract = jax.tree.map(
    lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings
  )
  return ShardedState(graphdef, abstract, shardings)


def init_state(
  create_fn: Callable[[], nnx.Module], mesh: jax.sharding.Mesh, rules: sharding.Rules
) -> ShardedState:
  """Creates the state with every parameter initialised directly in its sharded layout."""
  spec = abstract_state(create_fn, mesh, rules)

  def create():
    with sharding.unsharded():
      return nnx.split(create_fn())[1]

  with jax.set_mesh(mesh):
    state = jax.jit(create, out_shardings=spec.shardings)()
  return ShardedState(spec.graphdef, state, spec.shardings)


def make_train_step(
  graphdef: nnx.GraphDef,
  loss_fn: Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]],
  state_shardings: Any,
) -> Callable:
  """A jit-ed step(state, batch, key) -> (state, metrics) that donates the old state.

  `loss_fn(model, batch, key)` returns (scalar loss, dict of scalar metrics); gradients are taken
  with respect to the model's nnx.Param variables and applied by the TrainState's optimizer.
  """

  def step(state, batch, key):
    ts = nnx.merge(graphdef, state)
    (loss, aux), grads = nnx.value_and_grad(lambda m: loss_fn(m, batch, key), has_aux=True)(
      ts.model
    )
    ts.optimizer.update(ts.model, grads)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), **aux}
    return nnx.state(ts), metrics

  return jax.jit(
    step,
    in_shardings=(state_shardings, None, None),
    out_shardings=(state_shardings, None),
    donate_argnums=(0,),
  )


def model_of(graphdef: nnx.GraphDef, state: Any) -> nnx.Module:
  """The model inside a TrainState state (for evaluation and sampling)."""
  return nnx.merge(graphdef, state).model


# ---------------------------------------------------------------------------------------------------
# Config checks that must pass before anything is written.


DTYPES = ('float32', 'bfloat16', 'float16')


def validate(config: ml_collections.ConfigDict) -> None:
  """The infrastructure keys every run shares; a bad one is a one-line ConfigError, raised before
  the workdir is touched (so a typo leaves nothing behind)."""
  t, c = config.train, config.checkpoint
  problems = []
  if t.num_steps < 1:
    problems.append(f'train.num_steps={t.num_steps} must be >= 1')
  if t.log_every < 1:
    problems.append(f'train.log_every={t.log_every} must be >= 1')
  if t.eval_every < 0:
    problems.append(f'train.eval_every={t.eval_every} must be >= 0 (0: no evaluation)')
  if c.keep < 1:
    problems.append(f'checkpoint.keep={c.keep} must be >= 1 (a finished run needs its checkpoint)')
  if c.every_steps < 0:
    problems.append(f'checkpoint.every_steps={c.every_steps} must be >= 0 (0: only the last step)')
  if 'dtype' in config and str(config.dtype) not in DTYPES:
    problems.append(f'dtype={config.dtype!r} is not one of {", ".join(DTYPES)}')
  if problems:
    raise config_lib.ConfigError('; '.join(problems))


# ---------------------------------------------------------------------------------------------------
# Workdir: created, locked against a second run, checked against the config it holds.


class WorkdirError(errors.UserError, OSError):
  """The workdir cannot be used: a file, not writable, or in use by another run."""


def _writable_dir(workdir: pathlib.Path) -> pathlib.Path:
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f'--workdir {workdir} is a file, not a directory')
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f'.write_test.{os.getpid()}'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f'cannot write to --workdir {workdir}: {e.strerror or e}') from e
  return workdir


class WorkdirLock:
  """An exclusive flock on `<workdir>/.lock` for the life of a run (process 0 only).

  Two runs of one command on one workdir would both train and interleave their metrics; the second
  now stops at once. The kernel drops the lock when its process dies, SIGKILL included, so a killed
  run never blocks its own resumption.
  """

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / '.lock'
    self._file = None

  def acquire(self) -> WorkdirLock:
    import fcntl  # noqa: PLC0415 - POSIX only

    f = self.path.open('a+')
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      f.close()
      raise WorkdirError(
        f'--workdir {self.path.parent} is in use by another run ({holder}); wait for it or use '
        'another --workdir'
      ) from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {platform.node()}')
    f.flush()
    self._file = f
    return self

  def release(self) -> None:
    if self._file is not None:
      self._file.close()  # closing the descriptor releases the flock
      self._file = None


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> pathlib.Path:
  """Creates the workdir, refuses a changed config over an existing checkpoint, writes config.json.

  Keys in config.RESUME_MUTABLE (budget, cadence, mesh, sub-run locations) may change between a run
  and its resumption; any other difference means the workdir holds another experiment, and
  overwriting it would lose it.
  """
  workdir = pathlib.Path(workdir)
  if jax.process_index() == 0:
    _writable_dir(workdir)
  saved_path = workdir / 'config.json'
  ckpt_dir = workdir / 'checkpoints'
  has_ckpt = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
  current = config_lib.to_dict(config)
  if saved_path.exists() and has_ckpt:
    saved = config_lib.with_added_keys(json.loads(saved_path.read_text()))
    diff = config_lib.resume_differences(saved, current)
    if diff:
      shown = ', '.join(f'{k} ({_lookup(saved, k)!r} -> {_lookup(current, k)!r})' for k in diff[:8])
      raise config_lib.ConfigError(
        f'workdir {workdir} holds a checkpoint of a different config: {shown}'
        f'{" ..." if len(diff) > 8 else ""}; use a new --workdir or the same config'
      )
  if jax.process_index() == 0:
    metrics_lib.write_json(saved_path, current)
  return workdir


def _lookup(d: Mapping, dotted: str) -> Any:
  for part in dotted.split('.'):
    if not isinstance(d, Mapping) or part not in d:
      return '<absent>'
    d = d[part]
  return d


def restore_or_init(
  config: ml_collections.ConfigDict,
  ckpt: ckpt_lib.Checkpointer,
  spec: ShardedState,
  init: Callable[[], Any],
  *,
  data_iter: Any = None,
) -> tuple[int, Any, dict | None, dict | None]:
  """(start_step, state, extra, meta) in the fixed order: workdir > resume_from > init_from > scratch.

  A requested resume_from / init_from that does not exist is an error, never a silent fresh start.
  init_from copies the model parameters only; the optimizer, step and data start fresh.
  """
  if ckpt.latest_step() is not None:
    r = ckpt.restore(spec.state, data_iter=data_iter)
    metrics_lib.log('resumed from %s at step %d', ckpt.directory, r.step)
    return r.step, r.state, r.extra, r.meta
  if config.checkpoint.resume_from:
    r = ckpt_lib.restore_from(config.checkpoint.resume_from, spec.state, data_iter=data_iter)
    metrics_lib.log('resumed from %s at step %d', config.checkpoint.resume_from, r.step)
    return r.step, r.state, r.extra, r.meta
  state = init()
  if config.checkpoint.init_from:
    params = ckpt_lib.restore_params(config.checkpoint.init_from, spec.state['model'])
    state['model'] = params
    metrics_lib.log('initialised model parameters from %s', config.checkpoint.init_from)
  return 0, state, None, None


# ---------------------------------------------------------------------------------------------------
# Provenance: run.json says what ran, where, from which code, and when.


def _git_state() -> dict[str, Any]:
  root = pathlib.Path(__file__).resolve().parents[1]
  try:
    commit = subprocess.run(
      ['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      ['git', 'status', '--porcelain', '--untracked-files=no'],
      cwd=root,
      capture_output=True,
      text=True,
      timeout=10,
      check=True,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return {'commit': None, 'dirty': None}  # an installed package, not a clone
  return {'commit': commit, 'dirty': bool(dirty)}


def _versions() -> dict[str, str | None]:
  import importlib.metadata as md  # noqa: PLC0415

  out = {'python': platform.python_version()}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'numpy'):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      out[name] = None
  return out


def _now() -> str:
  return datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')


class Provenance:
  """`run.json`: the command line, code (git commit, dirty flag), package versions, devices, and
  one record per start of the run (start/end time, steps covered, how it ended). Timing lives here
  rather than in results.json, so a killed-and-resumed run's results equal an uninterrupted one's.
  """

  def __init__(self, workdir: pathlib.Path, mesh: jax.sharding.Mesh):
    self.path = workdir / 'run.json'
    self.enabled = jax.process_index() == 0
    self._t0 = time.perf_counter()
    if not self.enabled:
      return
    old = json.loads(self.path.read_text()) if self.path.exists() else {}
    starts = old.get('starts', [])
    for s in starts:
      if 'end' not in s:
        s['status'] = 'killed'  # the process that wrote it never reached close()
    device = jax.devices()[0]
    self.record = {
      'argv': list(sys.argv),
      'git': _git_state(),
      'versions': _versions(),
      'host': platform.node(),
      'cpu': machine.cpu(),
      'devices': {
        'platform': device.platform,
        'kind': device.device_kind,
        'count': jax.device_count(),
        'processes': jax.process_count(),
        'mesh': {k: int(v) for k, v in mesh.shape.items()},
      },
      'starts': [*starts, {'start': _now(), 'status': 'running'}],
    }
    self._write()

  def _write(self) -> None:
    starts = self.record['starts']
    self.record['wall_time_sec'] = sum(s.get('wall_time_sec', 0.0) for s in starts)
    self.record['status'] = starts[-1]['status']
    metrics_lib.write_json(self.path, self.record)

  def update(self, **fields: Any) -> None:
    """Sets fields of this start's record (e.g. start_step)."""
    if self.enabled:
      self.record['starts'][-1].update(fields)
      self._write()

  def end(self, status: str, step: int | None) -> None:
    if self.enabled:
      self.record['starts'][-1].update(
        end=_now(), end_step=step, status=status, wall_time_sec=time.perf_counter() - self._t0
      )
      self._write()


# ---------------------------------------------------------------------------------------------------
# Signals and fault injection.


class Preempted(Exception):
  """SIGTERM or Ctrl-C arrived; a checkpoint at the current step was written before raising."""

  def __init__(self, message: str, signum: int = signal.SIGTERM):
    super().__init__(message)
    self.signum = signum


class StopSignals:
  """Turns SIGTERM and the first Ctrl-C (SIGINT) into a flag the loop polls between steps (saving
  mid-step would be unsafe); a second Ctrl-C interrupts at once, as users expect."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: int | None = None

  def _handler(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.received is not None:
      raise KeyboardInterrupt
    self.received = signum
    if signum == signal.SIGINT:
      metrics_lib.log('Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again: now)')

  @contextlib.contextmanager
  def installed(self) -> Iterator[StopSignals]:
    previous = {}
    try:
      for s in self.SIGNALS:
        previous[s] = signal.signal(s, self._handler)
    except ValueError:  # not the main thread: leave signals alone
      pass
    try:
      yield self
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)


def _any_process(flag: bool) -> bool:
  """True on every process when it is True on any (a SIGTERM may reach only some hosts)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return bool(multihost_utils.process_allgather(np.int32(flag)).any())


# ---------------------------------------------------------------------------------------------------
# The run object.


@dataclasses.dataclass
class FitResult:
  step: int
  state: Any  # None when the run had already finished (nothing is restored then)
  graphdef: nnx.GraphDef | None
  train: dict
  eval: dict

  @classmethod
  def of_finished(cls, run: Run) -> FitResult:
    """The result of a run that had already finished (its results.json; no state)."""
    return cls(run.results['step'], None, None, run.results['train'], run.results['eval'])


class Run:
  """One run's infrastructure, built once and shared by every loop (supervised `fit`, the RL loop,
  a paper's own): config checks, mesh and sharding rules, the workdir (locked, config.json,
  run.json), the checkpointer, the metric writer, SIGTERM / Ctrl-C, the non-finite stop, fault
  injection and results.json.

      with train_loop.Run(config, workdir) as run:
        if run.finished:
          return run.results
        ...  # build data and model with run.mesh / run.rules
        return train_loop.fit(run, create_state=..., loss_fn=..., train_iter=...)

  Order of the checks: the config's infrastructure keys, the mesh (against the devices), `checks`
  (callables of (config, mesh, rules) for a loop's or paper's own keys), then the workdir; so bad
  input leaves no workdir behind. A finished run (results.json for
  train.num_steps) is detected here, before any model is built or traced.
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    checks: Sequence[Callable[[ml_collections.ConfigDict, jax.sharding.Mesh, Any], None]] = (),
  ):
    validate(config)
    self.config = config
    self.rules: sharding.Rules = sharding.rules_of(config)
    self.mesh = mesh or sharding.make_mesh(config_lib.mesh_spec(config))
    for check in checks:  # the loop's / paper's own keys, e.g. common.rl.loop.check_config
      check(config, self.mesh, self.rules)
    self.num_steps = int(config.train.num_steps)
    self._lock = None
    self._closed = False
    self.writer: metrics_lib.MetricWriter | None = None
    self.checkpointer: ckpt_lib.Checkpointer | None = None
    self.provenance: Provenance | None = None
    self.signals = StopSignals()
    self._signals_ctx = None
    self.last_saved: int | None = None
    self.step: int | None = None
    workdir = pathlib.Path(workdir)
    if jax.process_index() == 0:
      _writable_dir(workdir)
      self._lock = WorkdirLock(workdir).acquire()
    try:
      self.workdir = prepare_workdir(config, workdir)
      self.results = self._finished_results()
      self.checkpointer = ckpt_lib.Checkpointer(
        self.workdir / 'checkpoints',
        every_steps=config.checkpoint.every_steps,
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
      )
      self.provenance = Provenance(self.workdir, self.mesh)
    except BaseException:
      self.close('failed')
      raise
    if self.results is not None:
      metrics_lib.log(
        'run already finished at step %d (%s); nothing to do',
        self.results.get('step', self.num_steps),
        self.workdir / 'results.json',
      )

  # -- lifecycle ------------------------------------------------------------------------------------
  @property
  def finished(self) -> bool:
    return self.results is not None

  def _finished_results(self) -> dict | None:
    path = self.workdir / 'results.json'
    if not path.exists():
      return None
    results = json.loads(path.read_text())
    return results if results.get('step', -1) >= self.num_steps else None

  def __enter__(self) -> Run:
    return self

  def __exit__(self, kind, exc, tb) -> None:
    if exc is None:
      status = 'finished' if self.finished else 'stopped'
    elif isinstance(exc, Preempted):
      status = 'interrupted' if exc.signum == signal.SIGINT else 'preempted'
    elif isinstance(exc, KeyboardInterrupt):
      status = 'interrupted'
    else:
      status = f'failed: {type(exc).__name__}'
    self.close(status)

  def close(self, status: str = 'stopped') -> None:
    """Waits for the last checkpoint, closes the writer, records the end in run.json, unlocks."""
    if self._closed:
      return
    self._closed = True
    try:
      if self.checkpointer is not None:
        self.checkpointer.close()
    finally:
      if self.writer is not None:
        self.writer.close()
      if self._signals_ctx is not None:
        self._signals_ctx.__exit__(None, None, None)
      if self.provenance is not None:
        self.provenance.end(status, self.step)
      if self._lock is not None:
        self._lock.release()

  # -- the loop's services --------------------------------------------------------------------------
  def restore_or_init(
    self, spec: ShardedState, init: Callable[[], Any], *, data_iter: Any = None
  ) -> tuple[int, Any, dict | None, dict]:
    """(start, state, extra, meta): the resume order, then the writer opened at `start`.

    `meta` holds the restored checkpoint's last train/eval metrics ({} on a fresh start), so a run
    stopped after its last checkpoint but before results.json completes with the right results.
    """
    with jax.set_mesh(self.mesh), sharding.axis_rules(self.rules):
      start, state, extra, meta = restore_or_init(
        self.config, self.checkpointer, spec, init, data_iter=data_iter
      )
    self.last_saved = self.checkpointer.latest_step()
    self.step = start
    # From here on a stop request ends with a checkpoint; before it (data preparation, model
    # building) Ctrl-C simply interrupts, since there is nothing new to save.
    self._signals_ctx = self.signals.installed()
    self._signals_ctx.__enter__()
    self.writer = metrics_lib.MetricWriter(self.workdir, resume_step=start)
    self.provenance.update(start_step=start)
    return start, state, extra, dict(meta or {})

  def should_log(self, step: int) -> bool:
    return step % self.config.train.log_every == 0 or step == self.num_steps

  def should_eval(self, step: int) -> bool:
    every = self.config.train.eval_every
    return every > 0 and (step % every == 0 or step == self.num_steps)

  def should_save(self, step: int) -> bool:
    return self.checkpointer.should_save(step) or step == self.num_steps

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    self.writer.write(step, split, metrics)

  def check_finite(self, step: int, loss: float) -> None:
    """Stops with NonFiniteLoss (and never checkpoints the diverged state)."""
    if not math.isfinite(loss):
      last = (
        f'last good checkpoint is step {self.last_saved}'
        if self.last_saved is not None
        else 'no checkpoint was saved before it'
      )
      raise NonFiniteLoss(f'loss is {loss} at step {step}; stopped, {last}')

  def save(self, step: int, state: Any, *, wait: bool = False, **kwargs: Any) -> None:
    """Checkpoints `step` unless it is already saved (kwargs: data_iter, extra, meta)."""
    if step != self.last_saved:
      self.checkpointer.save(step, state, wait=wait, **kwargs)
      self.last_saved = step
    elif wait:
      self.checkpointer.wait()

  def end_step(self, step: int, save: Callable[[], None]) -> None:
    """After a step's logging, evaluation and checkpointing: fault injection, then a stop request
    (SIGTERM / Ctrl-C on any process) is answered with `save()` + Preempted."""
    self.step = step
    debug = self.config.debug
    if step == debug.kill_after_step:
      self.checkpointer.wait()  # make the kill land between checkpoints, deterministically
      logging.warning('debug.kill_after_step=%d: SIGKILL', step)
      os.kill(os.getpid(), signal.SIGKILL)
    if step == debug.sigterm_after_step:
      os.kill(os.getpid(), signal.SIGTERM)
    if step == debug.get('sigint_after_step', -1):
      os.kill(os.getpid(), signal.SIGINT)
    if _any_process(self.signals.received is not None):
      signum = self.signals.received or signal.SIGTERM
      save()
      self.checkpointer.wait()
      self.writer.flush()
      name = 'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'
      raise Preempted(
        f'{name}: saved a checkpoint at step {step} in {self.checkpointer.directory}; run the '
        'same command to resume',
        signum,
      )

  def finish(self, train: Mapping[str, Any], eval_: Mapping[str, Any]) -> dict[str, Any]:
    """Waits for the last checkpoint and writes results.json (final metrics only: no timing)."""
    self.checkpointer.wait()
    results = {'step': self.num_steps, 'train': dict(train), 'eval': dict(eval_)}
    if jax.process_index() == 0:
      metrics_lib.write_json(self.workdir / 'results.json', results)
    self.writer.flush()
    self.results = json.loads(json.dumps(results, default=metrics_lib._scalar))  # noqa: SLF001
    self.step = self.num_steps
    return self.results

  def log_progress(self, progress: metrics_lib.Progress, step: int, shown: Mapping[str, Any]):
    metrics_lib.log(
      '%s', metrics_lib.Progress.line(step, self.num_steps, shown, progress.update(step))
    )

  def evaluate(self, step: int, fn: Callable[[], Mapping[str, Any]]) -> dict:
    """Runs an evaluation, announced (it can take minutes) and timed, and writes its metrics."""
    metrics_lib.log('step %d: evaluating', step)
    t0 = time.perf_counter()
    out = dict(fn())
    self.write(step, 'eval', out)
    shown = {k: round(float(v), 5) for k, v in out.items()}
    metrics_lib.log('step %d eval %s (%.1f s)', step, shown, time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------------------------------------
# The standard loop.


def lr_at(learning_rate: float | Callable[[int], Any], step: int) -> float:
  """The rate the update of (1-based) `step` used."""
  return float(learning_rate(step - 1) if callable(learning_rate) else learning_rate)


def _mean_metrics(history: list[tuple[int, dict]]) -> dict:
  keys = history[-1][1].keys()
  return {k: sum(float(m[k]) for _, m in history) / len(history) for k in keys}


def fit(
  run: Run,
  *,
  create_state: Callable[[], TrainState],
  loss_fn: Callable,
  train_iter: Any,
  eval_fn: Callable[[nnx.Module, int], Mapping[str, float]] | None = None,
  initial_state: Callable[[ShardedState], Any] | None = None,
  on_end: Callable[[nnx.Module, int], None] | None = None,
  learning_rate: float | Callable[[int], Any] | None = None,
) -> FitResult:
  """Trains `create_state()` on `train_iter` with `loss_fn` for config.train.num_steps steps.

  train_iter: a grain DatasetIterator of process-local batches (checkpointed with the state).
  eval_fn(model, step): evaluation metrics, run every config.train.eval_every steps and at the end
    (and at step 0 on a fresh start when config.train.eval_at_start: the initial model's metrics).
  initial_state(spec): the state to start from when there is nothing to resume, laid out as
    `spec.shardings` (e.g. pretrained weights placed into a model with fresh adapters); default: a
    from-scratch `init_state(create_state)`. `config.checkpoint.init_from` still applies on top.
  on_end(model, step): runs once after the last step, before results.json (e.g. exporting adapters),
    so a run stopped in between does it again when resumed.
  learning_rate: the optimizer's rate or schedule (common.optim.learning_rate), logged as `lr`: the
    rate of the window's last update (optax counts updates from 0, so step s used schedule(s - 1)).
  """
  if run.finished:
    return FitResult.of_finished(run)
  config, mesh, rules = run.config, run.mesh, run.rules
  spec = abstract_state(create_state, mesh, rules)
  metrics_lib.log(
    'mesh %s; %d model parameters, logical -> physical sharding:\n%s',
    dict(mesh.shape),
    count_params(spec.state['model']),
    sharding.describe(spec.state['model'], mesh, rules),
  )

  def init():
    if initial_state is not None:
      return initial_state(spec)
    return init_state(create_state, mesh, rules).state

  start, state, _, meta = run.restore_or_init(spec, init, data_iter=train_iter)
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    train_step = make_train_step(spec.graphdef, loss_fn, spec.shardings)
    progress = metrics_lib.Progress(start, run.num_steps)
    history: list[tuple[int, dict]] = []
    last_train: dict = dict(meta.get('train', {}))
    last_eval: dict = dict(meta.get('eval', {}))
    if eval_fn is not None and start == 0 and config.train.get('eval_at_start', False):
      last_eval = run.evaluate(0, lambda: eval_fn(model_of(spec.graphdef, state), 0))

    def check(items):
      for step, m in items:
        run.check_finite(step, float(m['loss']))

    def save(step):
      nonlocal history
      history = jax.device_get(history)
      check(history)  # never checkpoint a diverged state
      run.save(step, state, data_iter=train_iter, meta={'train': last_train, 'eval': last_eval})

    metrics_lib.log('steps %d-%d: the first one compiles the train step', start + 1, run.num_steps)
    for step in range(start + 1, run.num_steps + 1):
      batch = sharding.to_global(next(train_iter), mesh, rules)
      state, m = train_step(state, batch, step_key(config.seed, step, 'train'))
      if step == start + 1:
        progress.compiled(start)  # compiled on this call; it may still be running
      history.append((step, m))
      if run.should_log(step):
        history = jax.device_get(history)
        check(history)
        last_train = _mean_metrics(history)
        if learning_rate is not None:
          last_train['lr'] = lr_at(learning_rate, step)
        run.write(step, 'train', last_train)
        run.log_progress(progress, step, last_train)
        history = []
      if eval_fn is not None and run.should_eval(step):
        last_eval = run.evaluate(
          step, functools.partial(eval_fn, model_of(spec.graphdef, state), step)
        )
      if run.should_save(step):
        save(step)
      run.end_step(step, lambda step=step: save(step))

    if on_end is not None:
      on_end(model_of(spec.graphdef, state), run.num_steps)
    results = run.finish(last_train, last_eval)
  return FitResult(run.num_steps, state, spec.graphdef, results['train'], results['eval'])


def count_params(state: Any) -> int:
  """Number of scalars in a (concrete or abstract) state."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
