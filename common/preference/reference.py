"""The reference model's log-probs of a preference data set, computed once and cached on disk.

DPO-style losses need log pi_ref(y|x) for every chosen and rejected response. The reference is
frozen, so recomputing them each epoch (or each run of a sweep) doubles the forward passes for
nothing; TRL's `precompute_ref_log_probs` computes them once per run. Here they are also kept
across runs, under `common.cache.cache_dir('preference', 'reference_logps')`:

  ref = reference_logps(ref_model, pairs, batch_size=16)   # Cached(arrays, path, hit)
  ref.arrays['ref_chosen_logps'], ref.arrays['ref_rejected_logps']   # [R] summed, float32
  ref.arrays['ref_chosen_logps_mean'], ...                           # [R] length-normalised

The file's key is a fingerprint of everything that determines its contents: the pairs (every
byte of PAIR_KEYS), the reference model's variables (every byte, with their paths), the model's
class and config, the source of the scoring code and the model's module
(`common.cache.code_fingerprint`), and the numerics (`common.cache.numerics_fingerprint`: JAX
version, backend, device count, XLA flags). Any change gives another key, hence a recomputation;
the key is also stored inside the file and checked on load, and a file that cannot be read or
does not hold what is expected is recomputed (with a warning), so a stale or damaged file is
never served. Files are written atomically (`common.cache.savez`): a process killed mid-write
leaves at most a temporary file that no reader ever opens.

`cached` is the generic part (key -> arrays, compute on a miss) for other per-data-set
quantities a frozen model gives, e.g. FusionRoute's expert log-probs.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import functools
import hashlib
import inspect
import json
import os
import pathlib
from typing import NamedTuple
import zipfile

from absl import logging
from flax import nnx
import jax
import numpy as np

from common import cache
from common import losses as lm_losses
from common import sharding
from common.preference import scoring
from common.rl import rollout

# Bump when the stored layout changes (old files then miss instead of being misread).
_FORMAT = 1
_KEY_FIELD = '__key__'
REF_KEYS = (
  'ref_chosen_logps',
  'ref_rejected_logps',
  'ref_chosen_logps_mean',
  'ref_rejected_logps_mean',
)


class Cached(NamedTuple):
  """arrays: what was loaded or computed; path: the cache file; hit: True if loaded from it."""

  arrays: dict[str, np.ndarray]
  path: pathlib.Path
  hit: bool


fingerprint = cache.tree_fingerprint  # the key of the reference model's parameters


def key_of(parts: Mapping[str, str]) -> str:
  """20 hex digits naming a cache entry from its key parts (order-independent)."""
  return hashlib.sha256(json.dumps(dict(parts), sort_keys=True).encode()).hexdigest()[:20]


def _load(path: pathlib.Path, stored_key: str) -> dict[str, np.ndarray] | None:
  """The arrays of a cache file whose stored key matches; None (with a warning) otherwise."""
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
    logging.warning('reference cache %s is unreadable (%s); recomputing', path, e)
    return None
  found = arrays.pop(_KEY_FIELD, None)
  if found is None or str(found) != stored_key:
    logging.warning('reference cache %s holds another key; recomputing', path)
    return None
  return arrays


def cached(
  name: str,
  key_parts: Mapping[str, str],
  compute: Callable[[], Mapping[str, np.ndarray]],
  *,
  directory: str | os.PathLike | None = None,
  validate: Callable[[Mapping[str, np.ndarray]], bool] | None = None,
) -> Cached:
  """Loads `name`'s arrays for `key_parts` from disk, or computes and stores them (atomically).

  `key_parts` must name everything the arrays depend on (fingerprints of the data, the model, the
  code); the file is `<directory>/<name>-<key_of(key_parts)>.npz` and also stores the parts,
  which must match on load. `validate(arrays)` may reject a loaded file (e.g. a row count that
  does not fit), which is then recomputed like a damaged one.
  """
  root = pathlib.Path(directory) if directory else cache.cache_dir('preference', 'reference_logps')
  root.mkdir(parents=True, exist_ok=True)
  parts = {'format': str(_FORMAT), **dict(key_parts)}
  stored_key = json.dumps(parts, sort_keys=True)
  path = root / f'{name}-{key_of(parts)}.npz'
  if path.exists():
    arrays = _load(path, stored_key)
    if arrays is not None and (validate is None or validate(arrays)):
      return Cached(arrays, path, True)
    if arrays is not None:
      logging.warning('reference cache %s does not fit the data; recomputing', path)
  arrays = {k: np.asarray(v) for k, v in compute().items()}
  if _KEY_FIELD in arrays:
    raise ValueError(f'{_KEY_FIELD!r} is reserved for the cache key')
  cache.savez(path, **{_KEY_FIELD: np.asarray(stored_key)}, **arrays)
  return Cached(arrays, path, False)


# ---------------------------------------------------------------------------------------------------
# Reference log-probs of preference pairs.


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, state, batch):
  return scoring.score_pairs(nnx.merge(graphdef, state), batch)


def model_key_parts(model: nnx.Module) -> dict[str, str]:
  """What determines a model's log-probs besides the data: its variables (every byte), class,
  config, the scoring code and the model's module source, and the numerics."""
  state = nnx.state(model, nnx.Not(nnx.RngState))
  return {
    'params': fingerprint(state),
    'model': f'{type(model).__module__}.{type(model).__qualname__} {getattr(model, "cfg", None)!r}',
    'code': cache.code_fingerprint(
      scoring, rollout.completion_logprobs, lm_losses.token_logprobs, inspect.getmodule(type(model))
    ),
    'numerics': cache.numerics_fingerprint(),
  }


def compute_reference_logps(
  model: nnx.Module,
  pairs: Mapping[str, np.ndarray],
  *,
  batch_size: int,
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> dict[str, np.ndarray]:
  """REF_KEYS arrays [R] for every pair, scored `batch_size` pairs at a time (no cache).

  The last batch is padded with copies of its first pair so every call has one shape (one
  compile). With a mesh, rows are sharded over its batch axes (2 * batch_size rows must divide
  evenly) and gathered back whole on every process.
  """
  n = scoring.check_pairs(pairs)
  graphdef, state = nnx.split(model)
  out = {k: [] for k in REF_KEYS}
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    take = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
    batch = scoring.pair_batch({k: np.asarray(pairs[k])[take] for k in scoring.PAIR_KEYS})
    if mesh is not None:
      batch = sharding.global_rows(batch, mesh, rules)
    chosen, rejected = _score(graphdef, state, batch)
    chosen, rejected = sharding.gather_rows((chosen, rejected))
    keep = slice(0, len(idx))
    out['ref_chosen_logps'].append(np.asarray(chosen.sum)[keep])
    out['ref_rejected_logps'].append(np.asarray(rejected.sum)[keep])
    out['ref_chosen_logps_mean'].append(np.asarray(chosen.mean)[keep])
    out['ref_rejected_logps_mean'].append(np.asarray(rejected.mean)[keep])
  return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def reference_logps(
  model: nnx.Module,
  pairs: Mapping[str, np.ndarray],
  *,
  batch_size: int,
  name: str = 'reference',
  directory: str | os.PathLike | None = None,
  extra: str = '',
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> Cached:
  """The reference model's REF_KEYS log-probs of `pairs` (PAIR_KEYS), from the disk cache when
  the data, the weights, the code and the numerics are all unchanged, else computed and stored.

  `extra` joins the key for anything else the caller knows matters (e.g. a tokenizer version).
  The batch size and mesh are not part of the key: they change no log-prob beyond rounding.
  """
  n = scoring.check_pairs(pairs)
  parts = {
    'data': fingerprint({k: np.asarray(pairs[k]) for k in scoring.PAIR_KEYS}),
    **model_key_parts(model),
    'extra': extra,
  }

  def fits(arrays):
    return all(k in arrays and arrays[k].shape == (n,) for k in REF_KEYS)

  def compute():
    logging.info('scoring %d preference pairs with the reference model (cached once)', n)
    return compute_reference_logps(model, pairs, batch_size=batch_size, mesh=mesh, rules=rules)

  return cached(name, parts, compute, directory=directory, validate=fits)


def with_reference(pairs: Mapping[str, np.ndarray], ref: Cached) -> dict[str, np.ndarray]:
  """The pairs with the reference log-probs as extra columns (what a DPO input pipeline batches)."""
  return {**pairs, **ref.arrays}
