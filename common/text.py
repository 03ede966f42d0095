"""String measures the papers share (FuseChat's token alignment, OmniOPD's chunk similarity)."""

from __future__ import annotations


def edit_distance(a: str, b: str) -> int:
  """Levenshtein distance (insert, delete, substitute at cost 1), one row of the table at a time."""
  if a == b:
    return 0
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]
