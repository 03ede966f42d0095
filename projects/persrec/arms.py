"""The compared models ("arms") as settings of config.model; no JAX imports (configs load it).

full       the base model over the last P + R items (one causal pass, no tokens)
recent     the base model over the last R items only (old_len = 0)
persrec    k learnt tokens between old and recent items, segment blocking, one segment
multiseg   the same with `num_segments` old segments, each followed by its own tokens
mean_pool  ablation: one token per segment = mean of its item embeddings, attending no item
noblock    ablation: learnt tokens without segment blocking (recent items see old items directly)
per_user   ablation: shared tokens plus a per-user learnt offset (MovieLens: users recur)

`config.arm` is an ordinary key. `derive(config)` (the last step of every PerSRec config file)
makes the model keys an arm decides (`DERIVED`) follow it: each holds a lazy reference computed
from `config.arm` and the file's P, k and multiseg's m, so `--config.arm=recent` and
`file.py:arm=recent` give the same config, whichever way the arm is set. A derived key set
explicitly (`--config.model.old_len=64`) keeps its value whatever the arm; `check` then refuses a
model that does not implement the arm, naming the key.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
import functools
from typing import Any

import ml_collections

ARMS = ('full', 'recent', 'persrec', 'multiseg', 'mean_pool', 'noblock', 'per_user')
# The config.model keys an arm sets.
DERIVED = ('old_len', 'num_segments', 'tokens_per_segment', 'blocking', 'token_mode')


def settings(arm: str, *, old_len: int, tokens: int, segments: int = 4) -> dict[str, Any]:
  """config.model fields for `arm`, given the full model's P, the tokens k and multiseg's m."""
  if arm not in ARMS:
    raise ValueError(f'unknown arm {arm!r}; use one of {ARMS}')
  base = {'old_len': old_len, 'num_segments': 1, 'tokens_per_segment': tokens, 'blocking': True}
  if arm == 'full':
    return {**base, 'token_mode': 'none'}
  if arm == 'recent':
    return {**base, 'token_mode': 'none', 'old_len': 0}
  if arm == 'persrec':
    return {**base, 'token_mode': 'learned'}
  if arm == 'multiseg':
    per = max(1, tokens // segments)
    return {**base, 'token_mode': 'learned', 'num_segments': segments, 'tokens_per_segment': per}
  if arm == 'mean_pool':
    return {**base, 'token_mode': 'mean_pool', 'tokens_per_segment': 1}
  if arm == 'noblock':
    return {**base, 'token_mode': 'learned', 'blocking': False}
  return {**base, 'token_mode': 'per_user'}


# FieldReference's `op` argument (ml_collections): `get()` returns `op.fn(value, *op.args)` with the
# args dereferenced, and setting the reference to a value (an override) drops the op. The arm's
# reference travels in `args`, so the deep copies ml_collections makes of a config keep the link.
_Op = collections.namedtuple('_Op', ['fn', 'args'])


def _derived_value(_, arm: str, key: str, old_len: int, tokens: int, segments: int) -> Any:
  """One key of `settings`; an unknown arm gets the persrec values (`check` names the arm)."""
  arm = arm if arm in ARMS else 'persrec'
  return settings(arm, old_len=old_len, tokens=tokens, segments=segments)[key]


def derive(config: ml_collections.ConfigDict, *, segments: int = 4) -> None:
  """Makes config.model's `DERIVED` keys follow config.arm (call before `finalize`).

  The file's config.model.old_len (P) and tokens_per_segment (k) at this point are the full
  model's; `segments` is multiseg's m. Afterwards `config.arm = 'recent'` sets old_len to 0 and
  token_mode to 'none', and so on for every arm, until a derived key is set explicitly.
  """
  arm = config.get_ref('arm')
  model = config.model
  fixed = functools.partial(
    _derived_value,
    old_len=int(model.old_len),
    tokens=int(model.tokens_per_segment),
    segments=int(segments),
  )
  for key in DERIVED:
    kind = type(model[key])
    model[key] = ml_collections.FieldReference(kind(), field_type=kind, op=_Op(fixed, (arm, key)))


# What config.model must satisfy for each arm: (key, test, what the test asks).
_POSITIVE = ('old_len', lambda v: v > 0, '> 0')
_BLOCKING = ('blocking', lambda v: bool(v), '= True')


def _mode(name: str):
  return ('token_mode', lambda v: v == name, f'= {name!r}')


_REQUIRES = {
  'full': (_mode('none'), _POSITIVE),
  'recent': (_mode('none'), ('old_len', lambda v: v == 0, '= 0')),
  'persrec': (_mode('learned'), ('num_segments', lambda v: v == 1, '= 1'), _BLOCKING, _POSITIVE),
  'multiseg': (_mode('learned'), ('num_segments', lambda v: v > 1, '> 1'), _BLOCKING, _POSITIVE),
  'mean_pool': (_mode('mean_pool'), _BLOCKING, _POSITIVE),
  'noblock': (_mode('learned'), ('blocking', lambda v: not v, '= False'), _POSITIVE),
  'per_user': (_mode('per_user'), _BLOCKING, _POSITIVE),
}


def check(arm: str, model: Mapping[str, Any]) -> str | None:
  """A one-line reason when config.model does not implement `arm` (an explicit override of a
  derived key that contradicts the arm), naming the keys; None when it does."""
  if arm not in _REQUIRES:
    return f'unknown arm {arm!r}; use one of {ARMS}'
  bad = [(key, what) for key, test, what in _REQUIRES[arm] if not test(model[key])]
  if not bad:
    return None
  wanted = ', '.join(f'model.{key} {what}' for key, what in bad)
  got = ', '.join(f'model.{key}={model[key]!r}' for key, _ in bad)
  return (
    f'config conflict: arm={arm!r} needs {wanted}, but the config sets {got}; '
    'drop that override (the arm sets it) or choose the arm that matches'
  )
