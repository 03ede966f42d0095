"""A seeded procedural source of long user histories where old history matters (spec §6(e)).

Each user u (example index i; everything drawn from numpy's generator seeded with (seed, i), so
example i is a pure function of (config, i): random access, nothing on disk, any process count):

  * items 1..num_items fall into `num_categories` equal categories (a seeded permutation), with
    Zipf(`zipf`) popularity inside each category;
  * long-term interest: `min_long_term`..`max_long_term` categories (1-2) and
    `favourites_per_category` (2) favourite items in each,
    drawn by popularity. They dominate OLD history: each item of the old phase (all but the last
    `late_len` items) is a favourite with probability `p_old`, uniformly among the favourites;
  * drifting short-term interest: sessions of geometric length (mean `session_len`); each session
    has one category, never a long-term one, which moves to the next category with probability 1/2
    or jumps to a random one; a non-favourite item is a popular item of the session's category;
  * the LATE phase (last `late_len` >= R items) shows favourites only rarely (`p_late`);
  * the held-out next item is a favourite with probability `rho` (the long-term interest coming
    back), else an item of the current session.

So a model that reads only the last R <= late_len items can find the session but (mostly) not the
favourites, while one that reads the old history can: the gap between recent-only and full-history
models measures the value of long history, and the fraction of that gap PerSRec's k tokens recover
is the paper's claim. Timestamps: minutes within a session, about a day between sessions.

Training examples are users' whole sequences (history + next item) with a next-item target at every
position; the final target follows the `rho` rule, unlike in-history positions, so it is weighted
by `final_target_weight` in training (see input_pipeline.train_window).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Held-out users start far beyond any training index, so the two never overlap.
EVAL_OFFSET = 1 << 40
TEST_OFFSET = 1 << 41


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  num_items: int = 2000
  num_categories: int = 20
  history_len: int = 512
  late_len: int = 128
  min_long_term: int = 1
  max_long_term: int = 2
  favourites_per_category: int = 2
  p_old: float = 0.5
  p_late: float = 0.02
  rho: float = 0.3
  session_len: float = 24.0
  zipf: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.num_items % self.num_categories:
      raise ValueError(
        f'num_items {self.num_items} not divisible by {self.num_categories} categories'
      )
    if not 0 <= self.late_len <= self.history_len:
      raise ValueError(f'late_len {self.late_len} outside [0, history_len={self.history_len}]')
    size = self.num_items // self.num_categories
    if self.favourites_per_category > size:
      raise ValueError('favourites_per_category exceeds the category size')
    if self.max_long_term >= self.num_categories or self.min_long_term > self.max_long_term:
      raise ValueError('need min_long_term <= max_long_term < num_categories')


class LongHistories:
  """Random-access users: example i -> {'items', 'timestamps' [L], 'target', 'target_ts',
  'favourite_target', 'user'} (int32; 'user' is 0: synthetic users are never seen twice)."""

  def __init__(self, cfg: SyntheticConfig, offset: int = 0, num_users: int = 1 << 40):
    self.cfg, self.offset, self.num_users = cfg, offset, num_users
    rng = np.random.default_rng([cfg.seed, 0xCA7])
    size = cfg.num_items // cfg.num_categories
    # category c holds items members[c] (popularity order: members[c][0] is the most popular).
    self.members = (rng.permutation(cfg.num_items) + 1).reshape(cfg.num_categories, size)
    w = 1.0 / np.arange(1, size + 1) ** cfg.zipf
    self.popularity = w / w.sum()
    self._cdf = np.cumsum(self.popularity)

  def __len__(self) -> int:
    return self.num_users

  def _popular(self, rng, categories: np.ndarray) -> np.ndarray:
    """One popularity-weighted item from each given category."""
    rank = np.minimum(np.searchsorted(self._cdf, rng.random(categories.shape)), len(self._cdf) - 1)
    return self.members[categories, rank]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self.num_users:
      raise IndexError(f'user {index} out of range [0, {self.num_users})')
    cfg = self.cfg
    rng = np.random.default_rng([cfg.seed, self.offset + index])
    n = cfg.history_len + 1  # history + the held-out next item
    num_lt = int(rng.integers(cfg.min_long_term, cfg.max_long_term + 1))
    long_term = rng.choice(cfg.num_categories, num_lt, replace=False)
    size = self.members.shape[1]
    favourites = np.concatenate(
      [
        self.members[
          c, rng.choice(size, cfg.favourites_per_category, replace=False, p=self.popularity)
        ]
        for c in long_term
      ]
    )
    # Sessions and their drifting categories (never a long-term one).
    starts = rng.random(n) < 1.0 / cfg.session_len
    starts[0] = True
    session = np.cumsum(starts) - 1
    others = np.setdiff1d(np.arange(cfg.num_categories), long_term)
    cats = np.empty(session[-1] + 1, np.int64)
    cats[0] = rng.choice(others)
    drift, jump = rng.random(len(cats)), rng.choice(others, len(cats))
    for s in range(1, len(cats)):
      nxt = (cats[s - 1] + 1) % cfg.num_categories
      cats[s] = nxt if drift[s] < 0.5 and nxt not in long_term else jump[s]
    session_items = self._popular(rng, cats[session])
    # Favourites: often in the old phase, rarely in the late phase, with rate rho as the target.
    t = np.arange(n)
    p_fav = np.where(t < cfg.history_len - cfg.late_len, cfg.p_old, cfg.p_late)
    p_fav[-1] = cfg.rho
    is_fav = rng.random(n) < p_fav
    seq = np.where(is_fav, favourites[rng.integers(len(favourites), size=n)], session_items)
    gaps = np.where(starts, rng.exponential(86400.0, n), rng.exponential(300.0, n))
    ts = np.cumsum(gaps).astype(np.int64)
    ts -= ts[0]
    return {
      'items': seq[:-1].astype(np.int32),
      'timestamps': ts[:-1].astype(np.int32),
      'target': np.int32(seq[-1]),
      'target_ts': np.int32(ts[-1]),
      'favourite_target': np.bool_(is_fav[-1]),
      'user': np.int32(0),
    }
