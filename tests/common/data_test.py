"""Tests for common.data: the global-index batch contract, per-process slices, resumable iterators,
and the procedural MarkovLanguage (random access and its exact entropy rate)."""

import numpy as np
import pytest

from common import data


class _Range:
  """Example i is {'i': i, 'v': [i, -i]}: every batch row names the example it came from."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'i': np.int64(i), 'v': np.array([i, -i], np.float32)}


def _take(it, k):
  return [next(it) for _ in range(k)]


def _ids(batches):
  return [b['i'].tolist() for b in batches]


# ---------------------------------------------------------------------------------------------------
# batch_iterator.


def test_unshuffled_batches_follow_global_indices():
  it = data.batch_iterator(_Range(10), global_batch_size=4, prefetch=0)
  batches = _take(it, 3)
  # The stream wraps around the source: global index g reads example g % 10.
  assert _ids(batches) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
  assert batches[0]['v'].shape == (4, 2) and batches[0]['v'].dtype == np.float32
  np.testing.assert_array_equal(batches[1]['v'][:, 1], [-4, -5, -6, -7])


def test_batch_iterator_is_deterministic():
  def run():
    it = data.batch_iterator(_Range(50), global_batch_size=8, shuffle_seed=3)
    return _ids(_take(it, 12))

  assert run() == run()
  other = data.batch_iterator(_Range(50), global_batch_size=8, shuffle_seed=4)
  assert _ids(_take(other, 12)) != run()


@pytest.mark.parametrize('shuffle_seed', [None, 5])
def test_processes_read_disjoint_halves_of_the_global_batch(shuffle_seed):
  # 100 examples, 7 batches of 6: no example repeats, so rows name distinct global indices.
  kw = dict(global_batch_size=6, shuffle_seed=shuffle_seed, prefetch=0)
  whole = _ids(_take(data.batch_iterator(_Range(100), **kw), 7))
  p0 = _ids(_take(data.batch_iterator(_Range(100), process_index=0, process_count=2, **kw), 7))
  p1 = _ids(_take(data.batch_iterator(_Range(100), process_index=1, process_count=2, **kw), 7))
  seen = set()
  for w, a, b in zip(whole, p0, p1, strict=True):
    assert len(a) == len(b) == 3
    assert not set(a) & set(b)
    assert set(a) | set(b) == set(w)
    assert a + b == w  # in order: process 0 holds the first half
    assert not seen & set(w)
    seen |= set(w)


def test_three_processes_concatenate_to_the_global_batch():
  kw = dict(global_batch_size=6, shuffle_seed=0, prefetch=0)
  whole = _ids(_take(data.batch_iterator(_Range(20), **kw), 5))
  parts = [
    _ids(_take(data.batch_iterator(_Range(20), process_index=p, process_count=3, **kw), 5))
    for p in range(3)
  ]
  assert [a + b + c for a, b, c in zip(*parts, strict=True)] == whole


def test_global_batch_not_divisible_by_process_count_raises():
  with pytest.raises(ValueError, match='not divisible by 4 processes'):
    data.batch_iterator(_Range(10), global_batch_size=6, process_index=0, process_count=4)


def test_empty_source_raises():
  with pytest.raises(ValueError, match='empty'):
    data.batch_iterator(_Range(0), global_batch_size=2)


def test_shuffle_is_a_fresh_permutation_every_epoch():
  n, bs = 12, 4
  it = data.batch_iterator(_Range(n), global_batch_size=bs, shuffle_seed=7, num_epochs=3)
  flat = [i for b in _ids(list(it)) for i in b]
  assert len(flat) == 3 * n
  epochs = [flat[e * n : (e + 1) * n] for e in range(3)]
  for ep in epochs:
    assert sorted(ep) == list(range(n))  # every example exactly once per epoch
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
  assert epochs[0] != list(range(n))


def test_shuffling_a_huge_source_is_lazy(monkeypatch):
  real_default_rng = np.random.default_rng

  class _Guarded:
    """A Generator that refuses O(n) permutations of huge n (instead of really allocating them,
    which on an overcommitting machine could invoke the OOM killer)."""

    def __init__(self, *args, **kwargs):
      self._rng = real_default_rng(*args, **kwargs)

    def permutation(self, x, *args, **kwargs):
      if isinstance(x, int | np.integer) and x > 2**24:
        raise MemoryError(f'permutation({x}) would materialise {8 * x / 2**30:.0f} GiB')
      return self._rng.permutation(x, *args, **kwargs)

    def __getattr__(self, name):
      return getattr(self._rng, name)

  monkeypatch.setattr(np.random, 'default_rng', _Guarded)
  it = data.batch_iterator(_Range(2**40), global_batch_size=4, shuffle_seed=0, prefetch=0)
  ids = next(it)['i'].tolist()
  assert len(set(ids)) == 4 and all(0 <= i < 2**40 for i in ids)
  assert ids != [0, 1, 2, 3]


def test_num_epochs_ends_iteration_and_drops_the_remainder():
  it = data.batch_iterator(_Range(10), global_batch_size=4, num_epochs=2, prefetch=0)
  batches = list(it)
  assert _ids(batches) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5], [6, 7, 8, 9]]
  with pytest.raises(StopIteration):
    next(it)


def test_transform_runs_per_example():
  it = data.batch_iterator(
    _Range(8), global_batch_size=4, transform=lambda ex: {'j': ex['i'] * 10}, prefetch=0
  )
  assert next(it)['j'].tolist() == [0, 10, 20, 30]


@pytest.mark.parametrize('process_index', [0, 1])
def test_get_state_set_state_resumes_mid_epoch(process_index):
  def make():
    return data.batch_iterator(
      _Range(13),
      global_batch_size=4,
      shuffle_seed=2,
      num_epochs=3,
      process_index=process_index,
      process_count=2,
    )

  it = make()
  _take(it, 2)  # mid first epoch
  state = it.get_state()
  rest = _ids(list(it))
  assert len(rest) == 3 * 13 // 4 - 2

  resumed = make()
  resumed.set_state(state)
  assert _ids(list(resumed)) == rest

  # A fresh iterator without the state starts from the beginning, so set_state really moved it.
  assert _ids(_take(make(), 1))[0] != rest[0]


def test_state_after_iteration_differs_from_initial_state():
  it = data.batch_iterator(_Range(10), global_batch_size=2)
  initial = it.get_state()
  next(it)
  assert it.get_state() != initial


# ---------------------------------------------------------------------------------------------------
# MarkovLanguage.


def test_markov_example_is_a_pure_function_of_seed_and_index():
  a = data.MarkovLanguage(16, 32, seed=1)
  b = data.MarkovLanguage(16, 32, seed=1)
  c = data.MarkovLanguage(16, 32, seed=2)
  for i in (0, 5, 123456789):
    np.testing.assert_array_equal(a[i]['tokens'], b[i]['tokens'])
  # Order of access does not matter (no iterator state).
  later_first = [b[i]['tokens'] for i in (9, 3, 9)]
  np.testing.assert_array_equal(later_first[0], a[9]['tokens'])
  np.testing.assert_array_equal(later_first[1], a[3]['tokens'])
  np.testing.assert_array_equal(later_first[2], a[9]['tokens'])
  assert not np.array_equal(a[0]['tokens'], a[1]['tokens'])
  assert not np.array_equal(a[0]['tokens'], c[0]['tokens'])


def test_markov_tokens_in_range_and_follow_the_chain():
  lang = data.MarkovLanguage(10, 40, seed=3, branching=3)
  assert len(lang) == 1 << 30
  for i in range(20):
    t = lang[i]['tokens']
    assert t.shape == (41,) and t.dtype == np.int32
    assert t[0] == 0  # BOS
    assert t[1:].min() >= 1 and t[1:].max() <= 9
    ctx = np.concatenate([[0], t])  # (a, b) = (0, 0) before the first token
    for pos in range(40):
      a, b, nxt = ctx[pos], ctx[pos + 1], ctx[pos + 2]
      assert nxt in lang.next_tokens[a, b]


def test_markov_rejects_bad_sizes():
  with pytest.raises(ValueError, match='bad MarkovLanguage'):
    data.MarkovLanguage(2)
  with pytest.raises(ValueError, match='bad MarkovLanguage'):
    data.MarkovLanguage(8, branching=8)


def test_markov_optimal_loss_matches_monte_carlo():
  lang = data.MarkovLanguage(8, 16, seed=4, branching=4, alpha=0.5)
  assert lang.next_probs.shape == (8, 8, 4)
  np.testing.assert_allclose(lang.next_probs.sum(-1), 1.0, rtol=1e-12)
  h = -(lang.next_probs * np.log(lang.next_probs)).sum(-1)  # exact entropy of each context
  n = 1500
  seqs = np.stack([lang[i]['tokens'] for i in range(n)])  # [n, T + 1]
  ctx = np.concatenate([np.zeros((n, 1), np.int32), seqs], axis=1)  # [n, T + 2]
  a, b, nxt = ctx[:, :-2], ctx[:, 1:-1], ctx[:, 2:]
  # (1) the exact conditional entropy along sampled contexts, (2) the true model's NLL of the
  # sampled tokens: both are unbiased estimates of the entropy rate optimal_loss() computes.
  per_seq_h = h[a, b].mean(1)
  k = np.argmax(lang.next_tokens[a, b] == nxt[..., None], axis=-1)
  assert (lang.next_tokens[a, b, k] == nxt).all()
  per_seq_nll = -np.log(lang.next_probs[a, b, k]).mean(1)
  opt = lang.optimal_loss()
  for est in (per_seq_h, per_seq_nll):
    se = est.std(ddof=1) / np.sqrt(n)
    assert abs(est.mean() - opt) < 3 * se, (est.mean(), opt, se)
  assert 0 < opt < np.log(lang.vocab_size - 1)
  assert opt < np.log(4)


def test_markov_optimal_loss_per_position_is_an_average():
  # With seq_len 1 only the BOS context (0, 0) is seen: the loss is that context's entropy.
  lang = data.MarkovLanguage(8, 1, seed=0)
  p = lang.next_probs[0, 0]
  assert lang.optimal_loss() == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)
