"""Checkpoints: the only module that imports Orbax.

One checkpoint holds, under one step directory, everything a run needs to continue exactly:
  state: the train state as a pytree of (sharded) arrays, restored onto an abstract target whose
         leaves carry shardings, so a run can resume on another mesh;
  data:  the grain iterator state (one JSON file per process, grain's own Orbax handler);
  extra: host-side algorithm state (e.g. EBPO's float64 running statistics) as JSON, which
         round-trips float64 exactly;
  meta:  the step and anything informative (config, metrics).
Saves are asynchronous and atomic (Orbax writes a temporary directory and renames it when
complete), keep the newest N, and `close()` waits for the last one (MaxText PR #416: an exit during an
async save left a partial checkpoint). Restoring the latest checkpoint falls back to the previous one
with a warning if the latest cannot be read.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import logging as logging_std
import os
import pathlib
from typing import Any

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp

from common import errors


class _QuietOrbax(logging_std.Filter):
  """Drops Orbax's INFO chatter (dozens of lines per save); its warnings and errors still show."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or '/orbax/' not in record.pathname


logging.get_absl_logger().addFilter(_QuietOrbax())


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint that was asked for and cannot be used (missing, unreadable, incompatible)."""


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  extra: dict | None
  meta: dict | None


def _handlers() -> dict[str, Any]:
  return {
    'state': ocp.StandardCheckpointHandler(),
    'data': grain.checkpoint.CheckpointHandler(),
    'extra': ocp.JsonCheckpointHandler(),
    'meta': ocp.JsonCheckpointHandler(),
  }


def abstract_like(state: Any, shardings: Any | None = None) -> Any:
  """ShapeDtypeStructs (with shardings) describing `state`: the restore target."""
  if shardings is None:
    return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), state
    )
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )


class Checkpointer:
  """Saves and restores train state + data iterator + algorithm state under `directory`."""

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    every_steps: int = 100,
    keep: int = 3,
    async_save: bool = True,
  ):
    self.directory = pathlib.Path(directory).absolute()
    self.every_steps = int(every_steps)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      enable_async_checkpointing=async_save,
      create=True,
      cleanup_tmp_directories=True,
    )
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())

  # -- queries --------------------------------------------------------------------------------------
  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  # -- save -----------------------------------------------------------------------------------------
  def save(
    self,
    step: int,
    state: Any,
    *,
    data_iter: Any = None,
    extra: Mapping | None = None,
    meta: Mapping | None = None,
    wait: bool = False,
  ) -> None:
    """Saves (asynchronously unless `wait`), replacing a step that already exists.

    A step can only exist already when a run redoes it after falling back past an unreadable
    checkpoint, so the old directory is the broken one and must not survive.
    """
    if step in self._mngr.all_steps():
      self._mngr.wait_until_finished()
      self._mngr.delete(step)
    items = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    if extra is not None:
      items['extra'] = ocp.args.JsonSave(dict(extra))
    items['meta'] = ocp.args.JsonSave({'step': int(step), **dict(meta or {})})
    self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
    if wait:
      self._mngr.wait_until_finished()

  # -- restore --------------------------------------------------------------------------------------
  def _restore_step(self, step: int, abstract_state: Any, data_iter: Any) -> Restored:
    present = set(self._mngr.item_metadata(step).keys())
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      if 'data' not in present:
        raise CheckpointError(
          f'checkpoint step {step} in {self.directory} has no data iterator state'
        )
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    for name in ('extra', 'meta'):
      if name in present:
        items[name] = ocp.args.JsonRestore()
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    return Restored(
      step=step,
      state=out['state'],
      extra=out['extra'] if 'extra' in items else None,
      meta=out['meta'] if 'meta' in items else None,
    )

  def restore(
    self, abstract_state: Any, *, data_iter: Any = None, step: int | None = None
  ) -> Restored:
    """Restores `step` (default: the newest readable one) onto `abstract_state`'s shardings.

    `data_iter`, if given, is set to the saved iterator position in place. If the newest checkpoint
    cannot be read (partial or corrupt files), the previous one is used with a warning.
    """
    steps = [step] if step is not None else self.all_steps()[::-1]
    if not steps:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    errors_seen = []
    for s in steps:
      try:
        restored = self._restore_step(s, abstract_state, data_iter)
      except CheckpointError:
        raise
      except Exception as e:  # noqa: BLE001 - any read failure means "try the previous one"
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        errors_seen.append(f'step {s}: {first_line[:300]}')
        logging.warning(
          'checkpoint step %d in %s is unreadable (%s)', s, self.directory, first_line
        )
        continue
      if errors_seen:
        logging.warning('restored the older checkpoint step %d instead', s)
      return restored
    raise CheckpointError(f'no readable checkpoint in {self.directory} ({"; ".join(errors_seen)})')

  # -- lifecycle ------------------------------------------------------------------------------------
  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def latest_checkpoint_dir(path: str | os.PathLike) -> pathlib.Path:
  """Resolves a run's workdir, its checkpoints/ dir, or a step dir to a checkpoints directory."""
  p = pathlib.Path(path)
  if (p / 'checkpoints').is_dir():
    p = p / 'checkpoints'
  if not p.is_dir():
    raise CheckpointError(f'checkpoint path {str(path)!r} does not exist')
  return p


def restore_from(
  path: str | os.PathLike, abstract_state: Any, *, data_iter: Any = None
) -> Restored:
  """Restores the newest checkpoint of another run (config.checkpoint.resume_from/init_from)."""
  directory = latest_checkpoint_dir(path)
  if directory.name.isdigit():  # a step directory
    mngr = Checkpointer(directory.parent, async_save=False)
    step = int(directory.name)
  else:
    mngr, step = Checkpointer(directory, async_save=False), None
  try:
    return mngr.restore(abstract_state, data_iter=data_iter, step=step)
  finally:
    mngr.close()


def restore_params(path: str | os.PathLike, abstract_model_state: Any) -> Any:
  """Only the 'model' subtree of another run's newest checkpoint (config.checkpoint.init_from).

  The optimizer, step and data position of that run are not read, so a fine-tuning run starts its
  own optimizer from scratch on top of the loaded weights.
  """
  directory = latest_checkpoint_dir(path)
  step = None
  if directory.name.isdigit():  # a step directory
    directory, step = directory.parent, int(directory.name)
  mngr = ocp.CheckpointManager(directory, item_handlers={'state': ocp.PyTreeCheckpointHandler()})
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {directory}')
    target = {'model': abstract_model_state}
    restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
      target,
    )
    try:
      out = mngr.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        ),
      )
    except (ValueError, KeyError) as e:
      raise CheckpointError(f'cannot read model parameters from {directory}: {e}') from e
    return out['state']['model']
  finally:
    mngr.close()
