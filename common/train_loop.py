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
import contextlib
import dataclasses
import math
import os
import pathlib
import signal
import time
from typing import Any
import zlib

from absl import logging
from flax import nnx
import jax
import ml_collections
import optax

from common import checkpoint as ckpt_lib
from common import config as config_lib
from common import errors
from common import metrics as metrics_lib
from common import sharding


class NonFiniteLoss(errors.UserError, FloatingPointError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint at the current step was written before raising."""


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
    with nnx.use_eager_sharding(False):
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
    with nnx.use_eager_sharding(False):
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
# Workdir and resume.


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> pathlib.Path:
  """Creates the workdir, refuses a changed config over an existing checkpoint, writes config.json.

  Keys in config.RESUME_MUTABLE (budget, cadence, mesh) may change between a run and its resumption;
  any other difference means the workdir holds another experiment, and overwriting it would lose it.
  """
  workdir = pathlib.Path(workdir)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
  saved_path = workdir / 'config.json'
  ckpt_dir = workdir / 'checkpoints'
  has_ckpt = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
  current = config_lib.to_dict(config)
  if saved_path.exists() and has_ckpt:
    import json  # noqa: PLC0415

    saved = json.loads(saved_path.read_text())
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
) -> tuple[int, Any, dict | None]:
  """(start_step, state, extra) in the fixed order: workdir > resume_from > init_from > scratch.

  A requested resume_from / init_from that does not exist is an error, never a silent fresh start.
  init_from copies the model parameters only; the optimizer, step and data start fresh.
  """
  if ckpt.latest_step() is not None:
    r = ckpt.restore(spec.state, data_iter=data_iter)
    metrics_lib.log('resumed from %s at step %d', ckpt.directory, r.step)
    return r.step, r.state, r.extra
  if config.checkpoint.resume_from:
    r = ckpt_lib.restore_from(config.checkpoint.resume_from, spec.state, data_iter=data_iter)
    metrics_lib.log('resumed from %s at step %d', config.checkpoint.resume_from, r.step)
    return r.step, r.state, r.extra
  state = init()
  if config.checkpoint.init_from:
    params = ckpt_lib.restore_params(config.checkpoint.init_from, spec.state['model'])
    state['model'] = params
    metrics_lib.log('initialised model parameters from %s', config.checkpoint.init_from)
  return 0, state, None


# ---------------------------------------------------------------------------------------------------
# Signals and fault injection.


class SigtermFlag:
  """Turns SIGTERM into a flag the loop polls between steps (saving mid-step would be unsafe)."""

  def __init__(self):
    self.received = False

  def _handler(self, signum, frame):
    del signum, frame
    self.received = True

  @contextlib.contextmanager
  def installed(self) -> Iterator[SigtermFlag]:
    try:
      previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread: leave signals alone
      yield self
      return
    try:
      yield self
    finally:
      signal.signal(signal.SIGTERM, previous)


def _inject_faults(
  config: ml_collections.ConfigDict, step: int, ckpt: ckpt_lib.Checkpointer
) -> None:
  if step == config.debug.kill_after_step:
    ckpt.wait()  # make the kill land between checkpoints, deterministically
    logging.warning('debug.kill_after_step=%d: SIGKILL', step)
    os.kill(os.getpid(), signal.SIGKILL)
  if step == config.debug.sigterm_after_step:
    os.kill(os.getpid(), signal.SIGTERM)


# ---------------------------------------------------------------------------------------------------
# The standard loop.


@dataclasses.dataclass
class FitResult:
  step: int
  state: Any
  graphdef: nnx.GraphDef
  train: dict
  eval: dict


def _check_finite(history: list[tuple[int, dict]], last_ckpt: int | None) -> None:
  for step, m in history:
    loss = float(m['loss'])
    if not math.isfinite(loss):
      raise NonFiniteLoss(
        f'loss is {loss} at step {step}; stopped, last good checkpoint is step {last_ckpt}'
      )


def _mean_metrics(history: list[tuple[int, dict]]) -> dict:
  keys = history[-1][1].keys()
  return {k: sum(float(m[k]) for _, m in history) / len(history) for k in keys}


def fit(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  create_state: Callable[[], TrainState],
  loss_fn: Callable,
  train_iter: Any,
  eval_fn: Callable[[nnx.Module, int], Mapping[str, float]] | None = None,
  mesh: jax.sharding.Mesh | None = None,
  initial_state: Callable[[ShardedState], Any] | None = None,
) -> FitResult:
  """Trains `create_state()` on `train_iter` with `loss_fn` for config.train.num_steps steps.

  train_iter: a grain DatasetIterator of process-local batches (checkpointed with the state).
  eval_fn(model, step): evaluation metrics, run every config.train.eval_every steps and at the end
    (and at step 0 on a fresh start when config.train.eval_at_start: the initial model's metrics).
  initial_state(spec): the state to start from when there is nothing to resume, laid out as
    `spec.shardings` (e.g. pretrained weights placed into a model with fresh adapters); default: a
    from-scratch `init_state(create_state)`. `config.checkpoint.init_from` still applies on top.
  Writes config.json, metrics.jsonl, TensorBoard events, checkpoints/ and results.json.
  """
  workdir = prepare_workdir(config, workdir)
  rules = tuple(tuple(r) for r in config.sharding.rules)
  mesh = mesh or sharding.make_mesh(config_lib.mesh_spec(config))
  num_steps = config.train.num_steps
  spec = abstract_state(create_state, mesh, rules)
  metrics_lib.log(
    'mesh %s; %d model parameters, logical -> physical sharding:\n%s',
    dict(mesh.shape),
    count_params(spec.state['model']),
    sharding.describe(spec.state['model'], mesh, rules),
  )
  ckpt = ckpt_lib.Checkpointer(
    workdir / 'checkpoints',
    every_steps=config.checkpoint.every_steps,
    keep=config.checkpoint.keep,
    async_save=config.checkpoint.async_save,
  )
  sigterm = SigtermFlag()
  try:
    with jax.set_mesh(mesh), sharding.axis_rules(rules), sigterm.installed():
      start, state, _ = restore_or_init(
        config,
        ckpt,
        spec,
        (lambda: initial_state(spec))
        if initial_state is not None
        else (lambda: init_state(create_state, mesh, rules).state),
        data_iter=train_iter,
      )
      writer = metrics_lib.MetricWriter(workdir, resume_step=start)
      try:
        return _loop(
          config,
          workdir,
          spec,
          state,
          start,
          num_steps,
          loss_fn,
          train_iter,
          eval_fn,
          mesh,
          rules,
          ckpt,
          writer,
          sigterm,
        )
      finally:
        writer.close()
  finally:
    ckpt.close()


def _loop(
  config,
  workdir,
  spec,
  state,
  start,
  num_steps,
  loss_fn,
  train_iter,
  eval_fn,
  mesh,
  rules,
  ckpt,
  writer,
  sigterm,
) -> FitResult:
  results_path = pathlib.Path(workdir) / 'results.json'
  if start >= num_steps and results_path.exists():
    metrics_lib.log('run already finished at step %d (%s); nothing to do', start, results_path)
    import json  # noqa: PLC0415

    done = json.loads(results_path.read_text())
    return FitResult(start, state, spec.graphdef, done.get('train', {}), done.get('eval', {}))

  train_step = make_train_step(spec.graphdef, loss_fn, spec.shardings)
  progress = metrics_lib.Progress(start, num_steps)
  history: list[tuple[int, dict]] = []
  last_train: dict = {}
  last_eval: dict = {}
  last_ckpt = ckpt.latest_step()
  t0 = time.perf_counter()
  if eval_fn is not None and start == 0 and config.train.get('eval_at_start', False):
    last_eval = dict(eval_fn(model_of(spec.graphdef, state), 0))
    writer.write(0, 'eval', last_eval)
    metrics_lib.log('step 0 eval %s', {k: round(float(v), 5) for k, v in last_eval.items()})

  def save(step, wait=False):
    nonlocal last_ckpt
    _check_finite(history, last_ckpt)  # never checkpoint a diverged state
    if step == last_ckpt:
      if wait:
        ckpt.wait()
      return
    ckpt.save(step, state, data_iter=train_iter, meta={'train': last_train}, wait=wait)
    last_ckpt = step

  for step in range(start + 1, num_steps + 1):
    batch = sharding.to_global(next(train_iter), mesh, rules)
    state, m = train_step(state, batch, step_key(config.seed, step, 'train'))
    history.append((step, m))

    if step % config.train.log_every == 0 or step == num_steps:
      history = jax.device_get(history)
      _check_finite(history, last_ckpt)
      last_train = _mean_metrics(history)
      writer.write(step, 'train', last_train)
      metrics_lib.log(
        '%s', metrics_lib.Progress.line(step, num_steps, last_train, progress.update(step))
      )
      history = []
    if eval_fn is not None and (step % config.train.eval_every == 0 or step == num_steps):
      last_eval = dict(eval_fn(model_of(spec.graphdef, state), step))
      writer.write(step, 'eval', last_eval)
      metrics_lib.log(
        'step %d eval %s', step, {k: round(float(v), 5) for k, v in last_eval.items()}
      )
    if ckpt.should_save(step) or step == num_steps:
      history = jax.device_get(history)
      save(step)
    _inject_faults(config, step, ckpt)
    if sigterm.received:
      history = jax.device_get(history)
      save(step, wait=True)
      writer.flush()
      raise Preempted(f'SIGTERM: saved a checkpoint at step {step} in {ckpt.directory}')

  ckpt.wait()
  results = {
    'step': num_steps,
    'train': last_train,
    'eval': last_eval,
    'wall_time_sec': time.perf_counter() - t0,
  }
  if jax.process_index() == 0:
    metrics_lib.write_json(results_path, results)
  writer.flush()
  return FitResult(num_steps, state, spec.graphdef, last_train, last_eval)


def count_params(state: Any) -> int:
  """Number of scalars in a (concrete or abstract) state."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
