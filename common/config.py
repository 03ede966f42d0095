"""Experiment configs: shared infrastructure defaults, variant parsing, overrides and resume checks.

Every `experiments/<p>/configs/<file>.py` defines `get_config(arg=None)` and starts from
`base_config()`, which holds only infrastructure knobs (seed, mesh, sharding rules, dtypes,
checkpointing, loop cadence, debug fault injection). Paper hyperparameters live in the paper's own
config file. The `arg` after the colon in `--config=file.py:smoke,seed=3` selects a variant and sets
keys (big_vision's convention): `parse_arg` splits it and `finalize` applies the overrides with the
existing value's type and locks the config, so a typo is an error, never a silent new key.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
import json
from typing import Any

import ml_collections

from common import errors
from common import sharding


class ConfigError(errors.UserError, ValueError):
  """A config that cannot be used: unknown key, bad value, unknown variant, changed on resume."""


# Keys that may differ between a checkpointed run and its resumption (cadence, budget, layout).
RESUME_MUTABLE = (
  'train.num_steps',
  'train.log_every',
  'train.eval_every',
  'train.eval_at_start',
  'eval.*',  # what is measured, never what is trained
  'checkpoint.*',
  'mesh.*',
  'sharding.*',
  'debug.*',
  'data.num_workers',
  '*.workdir',  # where a sub-run lives (Q-RM's shared reward model), not what it trains: runs move
)


# Keys added after runs were checkpointed without them, with the value that reproduces what those
# runs did: a saved config that lacks one reads as that value, so an older run resumes when the
# key is set to it (and the resume check names the key otherwise) instead of being refused as
# another experiment. A key's section must exist in the saved config.
ADDED_KEYS = {
  'rl.trim_multiple': 0,  # the RL update over the whole padded batch (common.rl.loop)
}


def with_added_keys(saved: Mapping) -> dict:
  """A copy of a saved config dict with each absent ADDED_KEYS entry set to its legacy value."""
  out = to_dict(saved)  # a fresh copy (a JSON round trip)
  for dotted, legacy in ADDED_KEYS.items():
    *parents, leaf = dotted.split('.')
    node = out
    for part in parents:
      node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf not in node:
      node[leaf] = legacy
  return out


def base_config() -> ml_collections.ConfigDict:
  """Infrastructure defaults shared by every experiment."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Mesh axis sizes; -1 takes the remaining devices. The product must equal jax.device_count().
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = tuple(sharding.DEFAULT_RULES)
  c.dtype = 'float32'  # compute dtype; parameters are always float32
  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 100
  c.train.log_every = 10
  c.train.eval_every = 50
  c.train.eval_at_start = False  # also evaluate the initial state (step 0), e.g. a pretrained base
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 50
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  c.checkpoint.resume_from = ''  # another run's checkpoint dir: full state (step, optimizer, data)
  c.checkpoint.init_from = ''  # another run's checkpoint dir: model parameters only
  # Fault injection for tests: hard-kill (SIGKILL), SIGTERM or Ctrl-C (SIGINT) the process right
  # after this step.
  c.debug = ml_collections.ConfigDict()
  c.debug.kill_after_step = -1
  c.debug.sigterm_after_step = -1
  c.debug.sigint_after_step = -1
  return c


def parse_arg(arg: str | None, variants: Iterable[str] = ('smoke',)) -> tuple[str, dict[str, str]]:
  """Splits 'smoke,seed=3,train.num_steps=10' into ('smoke', {'seed': '3', ...}).

  At most one bare word (the variant) is allowed, and it must be one of `variants`.
  """
  variants = tuple(variants)
  variant, overrides = '', {}
  for part in (arg or '').split(','):
    part = part.strip()
    if not part:
      continue
    if '=' in part:
      key, value = part.split('=', 1)
      overrides[key.strip()] = value.strip()
    elif part not in variants:
      raise ConfigError(f'unknown config variant {part!r}; known variants: {", ".join(variants)}')
    elif variant:
      raise ConfigError(f'two config variants given: {variant!r} and {part!r}')
    else:
      variant = part
  return variant, overrides


def _coerce(key: str, old: Any, text: str) -> Any:
  """Parses an override string with the type of the value it replaces."""
  try:
    if isinstance(old, bool):
      if text.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(text)
      return text.lower() in ('true', '1')
    if isinstance(old, int):
      return int(text)
    if isinstance(old, float):
      return float(text)
    if isinstance(old, str):
      return text
    try:
      return json.loads(text)
    except ValueError:
      if old is None:  # an unset optional key: a bare word is a string
        return text
      raise
  except ValueError as e:
    raise ConfigError(f'config key {key!r} expects {type(old).__name__}, got {text!r}') from e


def set_key(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets a dotted key that must already exist; strings are parsed with the existing type."""
  *parents, leaf = key.split('.')
  node = config
  for i, name in enumerate(parents):
    if name not in node:
      raise ConfigError(f'unknown config key {".".join(parents[: i + 1])!r} (in override {key!r})')
    node = node[name]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ConfigError(f'unknown config key {key!r}')
  if isinstance(value, str):
    value = _coerce(key, node[leaf], value)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config key {key!r}: {e}') from e


def finalize(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> Any:
  """Applies `overrides` (dotted keys) and locks the config against new keys."""
  for key, value in overrides.items():
    set_key(config, key, value)
  config.lock()
  return config


def to_dict(config: ml_collections.ConfigDict | Mapping) -> dict:
  """A JSON-ready plain dict (tuples become lists), used for config.json and resume checks."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  return json.loads(json.dumps(config, default=list, sort_keys=True))


def flatten(d: Mapping, prefix: str = '') -> dict[str, Any]:
  """{'a.b': value} of a nested mapping, in its order."""
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def _mutable(key: str, allow: Iterable[str]) -> bool:
  """Whether `key` matches an allow-list entry: exact, 'section.*' (a prefix) or '*.leaf' (a suffix)."""
  return any(
    key == a
    or (a.endswith('.*') and key.startswith(a[:-1]))
    or (a.startswith('*.') and key.endswith(a[1:]))
    for a in allow
  )


def resume_differences(
  saved: Mapping, current: Mapping, allow: Iterable[str] = RESUME_MUTABLE
) -> list[str]:
  """Dotted keys whose values differ between two config dicts, ignoring the allow-list; a key of
  ADDED_KEYS absent from `saved` compares as its legacy value."""
  a, b = flatten(with_added_keys(saved)), flatten(to_dict(current))
  keys = sorted(set(a) | set(b))
  return [
    k for k in keys if a.get(k, '<absent>') != b.get(k, '<absent>') and not _mutable(k, allow)
  ]


def mesh_spec(config: ml_collections.ConfigDict) -> list[tuple[str, int]]:
  """The config's mesh as [(axis, size)] in canonical axis order."""
  return [(name, int(config.mesh[name])) for name in sharding.MESH_AXES if name in config.mesh]


def load(spec: str) -> ml_collections.ConfigDict:
  """The config named like --config: 'experiments/<p>/configs/<file>.py[:variant,key=value]'."""
  import importlib.util  # noqa: PLC0415
  import pathlib  # noqa: PLC0415

  path, _, arg = spec.partition(':')
  if not pathlib.Path(path).is_file():
    raise ConfigError(f'config file {path} does not exist')
  module_spec = importlib.util.spec_from_file_location(f'_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
