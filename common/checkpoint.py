"""Checkpoints: the only module that imports Orbax.

One checkpoint holds, under one step directory, everything a run needs to continue exactly:
  state: the train state as a pytree of (sharded) arrays, restored onto an abstract target whose
         leaves carry shardings, so a run can resume on another mesh;
  data:  the grain iterator state (one JSON file per process, grain's own Orbax handler);
  extra: host-side algorithm state (e.g. EBPO's float64 running statistics) as JSON, which
         round-trips float64 exactly;
  meta:  the step, the run's last train/eval metrics, and integrity fingerprints of the rest.
Saves are asynchronous and atomic (Orbax writes a temporary directory and renames it when
complete), keep the newest N, and `close()` waits for the last one (MaxText PR #416: an exit during an
async save left a partial checkpoint).

Integrity: an atomic rename protects against a crash mid-save, not against bits that change on disk
later (a flipped bit in a zarr chunk restores silently and surfaces steps later as a NaN blamed on
training). So every save records a fingerprint of each state leaf (`fingerprints`: a position-weighted
sum of the leaf's bit patterns mod 2^32, computed on device, so any single-bit flip changes it and
sharding does not) and a sha256 of the extra and data-iterator states; a restore recomputes them and
treats a mismatch like an unreadable step: it falls back to the previous step with a warning.
"""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging as logging_std
import os
import pathlib
import re
import shutil
from typing import Any

from absl import logging
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from common import errors


class _QuietOrbax(logging_std.Filter):
  """Drops Orbax's INFO chatter (dozens of lines per save); its warnings and errors still show."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or '/orbax/' not in record.pathname


logging.get_absl_logger().addFilter(_QuietOrbax())


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint that was asked for and cannot be used (missing, unreadable, incompatible)."""


class CorruptCheckpoint(RuntimeError):
  """A step whose restored contents do not match the fingerprints recorded when it was saved."""


# ---------------------------------------------------------------------------------------------------
# Integrity fingerprints.


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """sum_i bits(x_i) * (2 i + 1) mod 2^32 over the leaf's elements in row-major order (uint32).

  The weights are odd, so changing any one element by a single bit (2^k, k < 32) changes the sum;
  the positions come from iotas of the leaf's own shape, so no reshape moves sharded data, and
  integer sums mod 2^32 do not depend on the reduction order, so every mesh gives the same value.
  """
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)  # 8 bytes: a trailing [2]
  index = jnp.zeros(bits.shape, jnp.uint32)
  for d, n in enumerate(bits.shape):
    index = index * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d)
  return jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


_fingerprint_leaves = jax.jit(lambda leaves: [_leaf_fingerprint(x) for x in leaves])


def fingerprints(state: Any) -> dict[str, int]:
  """{leaf path: fingerprint} of a pytree of arrays (see `_leaf_fingerprint`)."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  if not flat:
    return {}
  values = jax.device_get(_fingerprint_leaves([x for _, x in flat]))
  return {jax.tree_util.keystr(p): int(v) for (p, _), v in zip(flat, values, strict=True)}


def _sha256_json(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _sha256_data(data_iter: Any) -> str:
  state = data_iter.get_state()
  raw = state if isinstance(state, bytes) else json.dumps(state, sort_keys=True).encode()
  return hashlib.sha256(raw).hexdigest()


def _verify(step: int, restored: Restored, data_iter: Any) -> None:
  """Raises CorruptCheckpoint when what was read differs from what was saved (see module doc)."""
  meta = restored.meta or {}
  saved = meta.get('fingerprints')
  if saved is not None:
    got = fingerprints(restored.state)
    bad = [k for k, v in got.items() if k in saved and saved[k] != v]
    if bad or set(saved) - set(got):
      what = bad[0] if bad else sorted(set(saved) - set(got))[0]
      raise CorruptCheckpoint(f'step {step}: state leaf {what} differs from what was saved')
  if 'extra_sha256' in meta and _sha256_json(restored.extra) != meta['extra_sha256']:
    raise CorruptCheckpoint(f'step {step}: the algorithm state differs from what was saved')
  if (
    data_iter is not None
    and 'data_sha256' in meta
    and _sha256_data(data_iter) != meta['data_sha256']
  ):
    raise CorruptCheckpoint(f'step {step}: the data iterator state differs from what was saved')


_INTEGRITY_KEYS = ('fingerprints', 'extra_sha256', 'data_sha256')


def _public(meta: Mapping) -> dict:
  """The meta a caller saved (step, metrics, ...), without the integrity records."""
  return {k: v for k, v in meta.items() if k not in _INTEGRITY_KEYS}


def _one_line(e: BaseException) -> str:
  """A short reason for a log line: the first line, without TensorStore's JSON spec dumps."""
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  text = re.sub(r'\{.*\}', '{...}', text)
  return text[:200]


def _is_disk_full(e: BaseException) -> bool:
  while e is not None:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if 'No space left on device' in str(e) or 'RESOURCE_EXHAUSTED' in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


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
    if int(keep) < 1:
      raise CheckpointError(f'checkpoint.keep={keep}: at least 1 checkpoint must be kept')
    if int(every_steps) < 0:
      raise CheckpointError(f'checkpoint.every_steps={every_steps} must be >= 0 (0: final only)')
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
      self.wait()
      self._mngr.delete(step)
    meta = {'step': int(step), **dict(meta or {}), 'fingerprints': fingerprints(state)}
    items = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
      meta['data_sha256'] = _sha256_data(data_iter)
    if extra is not None:
      extra = json.loads(json.dumps(dict(extra)))  # what the JSON handler will give back
      items['extra'] = ocp.args.JsonSave(extra)
      meta['extra_sha256'] = _sha256_json(extra)
    items['meta'] = ocp.args.JsonSave(meta)
    with self._disk_errors(step):
      self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
    if wait:
      self.wait()

  @contextlib.contextmanager
  def _disk_errors(self, step: int | None):
    """Turns a failed write (disk full, read-only) into one CheckpointError line and removes the
    partial step directory Orbax leaves behind."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:
      if not (isinstance(e, OSError) or _is_disk_full(e)):
        raise
      self._remove_partial_saves()
      what = f'step {step}' if step is not None else 'a checkpoint'
      reason = 'no space left on device' if _is_disk_full(e) else _one_line(e)
      raise CheckpointError(f'cannot save {what} in {self.directory}: {reason}') from e

  def _remove_partial_saves(self) -> None:
    for tmp in self.directory.glob('*.orbax-checkpoint-tmp*'):
      shutil.rmtree(tmp, ignore_errors=True)

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
    restored = Restored(
      step=step,
      state=out['state'],
      extra=out['extra'] if 'extra' in items else None,
      meta=out['meta'] if 'meta' in items else None,
    )
    _verify(step, restored, data_iter)
    if restored.meta is not None:
      restored.meta = _public(restored.meta)
    return restored

  def read_meta(self, step: int) -> dict | None:
    """The JSON meta item of `step` (no array is read); None when absent or unreadable."""
    try:
      meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return _public(meta['meta'])
    except Exception:  # noqa: BLE001 - an unreadable meta is reported by restore(), not here
      return None

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
        reason = _one_line(e)
        errors_seen.append(f'step {s}: {reason}')
        kind = 'corrupt' if isinstance(e, CorruptCheckpoint) else 'unreadable'
        logging.warning('checkpoint step %d in %s is %s (%s)', s, self.directory, kind, reason)
        continue
      if errors_seen:
        logging.warning('restored the older checkpoint step %d instead', s)
      return restored
    raise CheckpointError(f'no readable checkpoint in {self.directory} ({"; ".join(errors_seen)})')

  # -- lifecycle ------------------------------------------------------------------------------------
  def wait(self) -> None:
    with self._disk_errors(None):
      self._mngr.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
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


def _open_other_run(path: str | os.PathLike) -> tuple[Any, int, pathlib.Path]:
  """(manager, step, directory) of another run's newest (or named) checkpoint, for partial reads:
  the state as a plain PyTree plus the JSON meta (the data item is registered, not read, so Orbax
  does not warn about an unknown item). The caller closes the manager."""
  directory = latest_checkpoint_dir(path)
  step = None
  if directory.name.isdigit():  # a step directory
    directory, step = directory.parent, int(directory.name)
  handlers = {
    'state': ocp.PyTreeCheckpointHandler(),
    'meta': ocp.JsonCheckpointHandler(),
    'data': grain.checkpoint.CheckpointHandler(),
  }
  mngr = ocp.CheckpointManager(directory, item_handlers=handlers)
  step = mngr.latest_step() if step is None else step
  if step is None:
    mngr.close()
    raise CheckpointError(f'no checkpoint in {directory}')
  return mngr, step, directory


def _restore_partial(mngr, step: int, target: Any, what: str, directory: pathlib.Path) -> Any:
  """The `target` subtree (ShapeDtypeStructs with shardings) read from `step`."""
  restore_args = jax.tree.map(
    lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
    target,
  )
  try:
    return mngr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
      ),
    )['state']
  except (ValueError, KeyError) as e:
    raise CheckpointError(f'cannot read {what} from {directory}: {e}') from e


def _saved_fingerprints(mngr, step: int) -> dict[str, int]:
  """The fingerprints recorded at save ({} for a checkpoint without readable meta: unverified)."""
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception:  # noqa: BLE001
    return {}
  return dict(meta.get('fingerprints') or {})


def restore_params(path: str | os.PathLike, abstract_model_state: Any) -> Any:
  """Only the 'model' subtree of another run's newest checkpoint (config.checkpoint.init_from).

  The optimizer, step and data position of that run are not read, so a fine-tuning run starts its
  own optimizer from scratch on top of the loaded weights.
  """
  mngr, step, directory = _open_other_run(path)
  try:
    out = _restore_partial(
      mngr, step, {'model': abstract_model_state}, 'model parameters', directory
    )
    saved = {k: v for k, v in _saved_fingerprints(mngr, step).items() if k.startswith("['model']")}
    got = fingerprints({'model': out['model']})
    bad = [k for k, v in got.items() if k in saved and saved[k] != v]
    if bad:
      raise CheckpointError(f'model parameters in {directory} step {step} are corrupt ({bad[0]})')
    return out['model']
  finally:
    mngr.close()


_KEY_PART = re.compile(r"\['((?:[^'\\]|\\.)*)'\]|\[(\d+)\]|\.(\w+)")


def _key_parts(keystr: str) -> tuple[str, ...]:
  """A jax key string's parts: ['model']['layers'][0].value -> ('model', 'layers', '0', 'value')."""
  return tuple(next(g for g in m.groups() if g is not None) for m in _KEY_PART.finditer(keystr))


def restore_tree(path: str | os.PathLike, prefix: tuple[str, ...] = ('model',)) -> tuple[int, dict]:
  """(step, arrays) of the subtree `prefix` of a run's newest checkpoint, with no model to restore
  onto: the structure comes from the checkpoint's own metadata.

  For code that cannot rebuild the module that was saved (e.g. an exporter reading a paper's
  adapters): the result is nested dicts keyed by the saved names, strings throughout (list
  indices too, nnx variables as a 'value' key), with numpy leaves on the host. Fingerprints are
  verified as in `restore_params`.
  """
  mngr, step, directory = _open_other_run(path)
  try:
    tree = mngr.item_metadata(step)['state']
    tree = getattr(tree, 'tree', tree)
    for key in prefix:
      if not isinstance(tree, Mapping) or key not in tree:
        raise CheckpointError(f'checkpoint step {step} in {directory} has no {"/".join(prefix)}')
      tree = tree[key]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    for key in reversed(prefix):
      target = {key: target}
    out = _restore_partial(mngr, step, target, '/'.join(prefix), directory)
    saved = {_key_parts(k): v for k, v in _saved_fingerprints(mngr, step).items()}
    flat = jax.tree_util.tree_flatten_with_path(out)[0]
    values = jax.device_get(_fingerprint_leaves([x for _, x in flat])) if flat else []
    got = {
      tuple(str(getattr(k, 'key', k)) for k in path): int(v)
      for (path, _), v in zip(flat, values, strict=True)
    }
    bad = [k for k, v in got.items() if k in saved and saved[k] != v]
    if bad:
      raise CheckpointError(
        f'{"/".join(prefix)} in {directory} step {step} is corrupt ({"/".join(bad[0])})'
      )
    for key in prefix:
      out = out[key]
    return step, jax.tree.map(lambda x: np.asarray(jax.device_get(x)), out)
  finally:
    mngr.close()
