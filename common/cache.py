"""The monorepo's cache outside the repo: where derived artefacts live, how they are keyed and written.

Trained fixtures (common.models.tiny_lm, EBPO's warm policy), converted model weights, built TFDS data
sets, trained tokenizers and the persistent compilation cache all live under `cache_dir()`. A cached
artefact is keyed by what produced it (`code_fingerprint`: the source of the code that computes it;
`numerics_fingerprint`: the JAX version, backend, device count and XLA flags, which change the trained
bits) and written atomically (`atomic_path`, `write_text`, `savez`), so a reader (another process
starting at the same time) never sees half a file. A pytree of arrays goes into an .npz and back by
`tree_to_arrays` and `arrays_to_tree`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
import contextlib
import hashlib
import inspect
import json
import os
import pathlib
from typing import Any

from flax import nnx
import jax
import numpy as np


def cache_dir(*parts: str) -> pathlib.Path:
  """$MONOREPO_CACHE_DIR, else ${XDG_CACHE_HOME:-~/.cache}/meta-jax-monorepo (outside the repo)."""
  root = os.environ.get('MONOREPO_CACHE_DIR') or (
    pathlib.Path(os.environ.get('XDG_CACHE_HOME', pathlib.Path.home() / '.cache'))
    / 'meta-jax-monorepo'
  )
  path = pathlib.Path(root, *parts)
  path.mkdir(parents=True, exist_ok=True)
  return path


def code_fingerprint(*objects: Any) -> str:
  """16 hex digits of the sha256 of the objects' source (modules, classes, functions), in order.

  Keys a cached artefact by the code that computes it: an edit to that code gives a new key (a
  recomputation), an edit elsewhere does not.
  """
  src = ''.join(inspect.getsource(o) for o in objects)
  return hashlib.sha256(src.encode()).hexdigest()[:16]


def numerics_fingerprint(*, devices: bool = True) -> str:
  """What changes trained bits besides the code: JAX's version, backend, device count and XLA flags.

  XLA compiles differently for 1 and 8 (fake) devices and per flag set and version (measured: the
  tiny LM's weights differ by 4.8e-7 between a 1-device and an 8-device process; the RL warm-up's
  by up to 0.39 between a run and the test suite's `--xla_backend_optimization_level=0`). Keying
  on these keeps a cached model bitwise what this process would train, so a run's results do not
  depend on which process filled the cache.

  devices=False leaves out the device count (and the flag that fakes it): for a fixture that a
  sharded run and its 1-device reference must share (trained on one device, then placed on any
  mesh), so an invariant comparing them starts both from the same bits.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if devices:
    return json.dumps([jax.__version__, jax.default_backend(), jax.device_count(), flags])
  flags = ' '.join(
    f for f in flags.split() if not f.startswith('--xla_force_host_platform_device_count')
  )
  return json.dumps([jax.__version__, jax.default_backend(), flags])


def _host(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  if jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(jax.device_get(x))


def tree_fingerprint(tree: Any) -> str:
  """32 hex digits of the sha256 of a pytree of arrays: each leaf's path, dtype, shape and bytes.

  Keys what was computed from a model or data (a cache file, an in-process memo). Works on nested
  dicts, nnx.State and numpy or (sharded) JAX arrays, PRNG keys by their key data; equal trees give
  equal fingerprints on any mesh. A leaf spread over several processes is gathered (a collective:
  every process must call). A 135M-parameter model hashes in about a second.
  """
  h = hashlib.sha256()
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  h.update(str(treedef.num_leaves).encode())
  for path, leaf in leaves:
    arr = np.ascontiguousarray(_host(leaf))
    h.update(f'{jax.tree_util.keystr(path)}|{arr.dtype.name}{arr.dtype.str}|{arr.shape}|'.encode())
    h.update(arr.reshape(-1).view(np.uint8))
  return h.hexdigest()[:32]


def tree_to_arrays(tree: Any, prefix: str = '') -> dict[str, np.ndarray]:
  """{prefix + jax.tree_util.keystr(path): np.asarray(leaf)} of a pytree (e.g. a pure parameter
  dict): the flat form an .npz holds (`savez`, `load_or_compute`), read back by `arrays_to_tree`.

  The keys are jax's own key strings ("['layers'][0]['w']"), so files written by the modules that
  flattened this way by hand before still load; `prefix` lets several trees share one file.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {f'{prefix}{jax.tree_util.keystr(p)}': np.asarray(v) for p, v in leaves}


def arrays_to_tree(
  flat: Mapping[str, Any],
  template: Any,
  prefix: str = '',
  leaf_fn: Callable[[Any, Any], Any] | None = None,
  *,
  what: str = 'the arrays',
) -> Any:
  """`template`'s structure with each leaf read from `flat` (`tree_to_arrays`'s form) by its key.

  A leaf is the stored array itself, or `leaf_fn(array, template_leaf)` (to cast to the
  template's dtype, or place it with the template's sharding). Every key is checked before any
  leaf is built, so a file of another structure fails with one line naming the missing keys
  ("{what} lack [...] (n missing)", a ValueError) instead of a bare KeyError halfway through.
  """
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(template)[0]]
  missing = [k for k in (f'{prefix}{jax.tree_util.keystr(p)}' for p in paths) if k not in flat]
  if missing:
    raise ValueError(f'{what} lack {missing[:3]} ({len(missing)} missing)')

  def leaf(path, t):
    array = flat[f'{prefix}{jax.tree_util.keystr(path)}']
    return array if leaf_fn is None else leaf_fn(array, t)

  return jax.tree_util.tree_map_with_path(leaf, template)


def fully_addressable(tree: Any) -> bool:
  """Whether every leaf is all in this process (an in-process memo keys only such trees)."""
  return all(getattr(x, 'is_fully_addressable', True) for x in jax.tree_util.tree_leaves(tree))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """A temporary path next to `path` to write to; renamed onto `path` when the block succeeds.

  The temporary name is unique per process and keeps the suffix (np.save/np.savez would otherwise
  append one), so concurrent writers never share it; on an error it is removed and `path` is left
  as it was.
  """
  path = pathlib.Path(path)
  tmp = path.with_name(f'.{path.stem}.{os.getpid()}.tmp{path.suffix}')
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` atomically."""
  with atomic_path(path) as tmp:
    tmp.write_text(text)


def savez(path: str | os.PathLike, **arrays: Any) -> None:
  """np.savez(path, **arrays), atomically; `path` should end in .npz (np.load reads it back)."""
  with atomic_path(path) as tmp, open(tmp, 'wb') as f:
    np.savez(f, **arrays)


def load_or_compute(
  path: str | os.PathLike, compute: Callable[[], Mapping[str, Any]]
) -> dict[str, np.ndarray]:
  """The named arrays cached at `path` (.npz); on a miss, `compute()`'s, saved there first (`savez`).

  The shape of every "train once per machine, then load" fixture: `path` carries the key (what the
  arrays depend on), `compute` trains and flattens, and only a complete file is ever read.
  """
  path = pathlib.Path(path)
  if path.is_file():
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  arrays = {k: np.asarray(v) for k, v in compute().items()}
  savez(path, **arrays)
  return arrays


def fixture_step(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`nnx.jit(fn)` for a cached fixture's training step, compiled at XLA:CPU's default optimisation
  whatever this process's XLA flags say.

  `fn(model, optimizer, *batch)` updates its two graph nodes in place and returns the loss, as
  under `nnx.jit`. Why not `nnx.jit`: the test suite compiles at `--xla_backend_optimization_level=0`
  (its hundreds of small programs compile faster), which runs a fixture's hundreds of training
  steps about 1.5x slower, and a cold cache (a fresh CI machine) trains every fixture once;
  `jax.jit` takes per-computation compiler options, `nnx.jit` does not. Under a run's flags these
  options are XLA's defaults and the step trains the bits `nnx.jit` trains (bitwise: a small
  decoder in tests/common/cache_test.py; the tiny RL warm-up's 1000 steps and SmolLM2's 40-step
  warm-up, measured once), so no run's results move; under the suite's flags its bits are its
  own, kept apart by the fixtures' keys (each names this function's source and the numerics).
  """
  options = {'xla_backend_optimization_level': 3, 'xla_llvm_disable_expensive_passes': False}

  def pure(graphdef, state, *batch):
    model, optimizer = nnx.merge(graphdef, state)
    loss = fn(model, optimizer, *batch)
    return nnx.state((model, optimizer)), loss

  compiled = jax.jit(pure, static_argnums=0, compiler_options=options)

  def step(model, optimizer, *batch):
    graphdef, state = nnx.split((model, optimizer))
    new_state, loss = compiled(graphdef, state, *batch)
    nnx.update((model, optimizer), new_state)
    return loss

  return step
