"""The compared models ("arms") as settings of config.model; no JAX imports (configs load it).

full       the base model over the last P + R items (one causal pass, no tokens)
recent     the base model over the last R items only (old_len = 0)
persrec    k learnt tokens between old and recent items, segment blocking, one segment
multiseg   the same with `num_segments` old segments, each followed by its own tokens
mean_pool  ablation: one token per segment = mean of its item embeddings, attending no item
noblock    ablation: learnt tokens without segment blocking (recent items see old items directly)
per_user   ablation: shared tokens plus a per-user learnt offset (MovieLens: users recur)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ARMS = ('full', 'recent', 'persrec', 'multiseg', 'mean_pool', 'noblock', 'per_user')


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


def check(arm: str, model: Mapping[str, Any]) -> str | None:
  """A one-line reason when config.model does not implement `arm` (e.g. a later override broke it)."""
  mode, old, segs, block = (
    model['token_mode'],
    model['old_len'],
    model['num_segments'],
    model['blocking'],
  )
  ok = {
    'full': mode == 'none' and old > 0,
    'recent': mode == 'none' and old == 0,
    'persrec': mode == 'learned' and segs == 1 and block and old > 0,
    'multiseg': mode == 'learned' and segs > 1 and block and old > 0,
    'mean_pool': mode == 'mean_pool' and block and old > 0,
    'noblock': mode == 'learned' and not block and old > 0,
    'per_user': mode == 'per_user' and block and old > 0,
  }.get(arm)
  if ok is None:
    return f'unknown arm {arm!r}; use one of {ARMS}'
  if not ok:
    return (
      f'arm={arm!r} does not match model (token_mode={mode!r}, old_len={old}, '
      f'num_segments={segs}, blocking={block}); set the arm with the config arg (file.py:arm=NAME)'
    )
  return None
