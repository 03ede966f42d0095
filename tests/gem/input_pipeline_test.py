"""GEM examples: insertion, loss-mask counts, mixed-batch fraction, edge cases, determinism."""

import numpy as np
import pytest

from projects.gem import input_pipeline as ip
from projects.gem import models

SPECIALS = (90, 91)


def _layout(**kw):
  return ip.Layout(**{'seq_len': 16, 'special_ids': SPECIALS, 'pad_id': 0, **kw})


def test_insert_specials_layout():
  seq, roles = ip.insert_specials(np.array([5, 6, 7]), 1, SPECIALS)
  assert seq.tolist() == [5, 90, 91, 6, 7]
  assert roles.tolist() == [models.PREFIX, models.SPECIAL, models.SPECIAL, models.SUFFIX] + [3]
  with pytest.raises(ValueError, match='split'):
    ip.insert_specials(np.array([5]), 2, SPECIALS)


@pytest.mark.parametrize('n', [2, 5, 10])
def test_loss_mask_holds_out_special_targets_and_counts(n):
  layout = _layout(p_plain=0.0)  # always insert
  text = np.arange(1, n + 1)
  for index in range(20):
    ex = ip.ntp_example(text, ip.example_rng(0, index, 1), layout)
    assert ex['inserted'] == 1
    targets, mask = ex['targets'], ex['loss_mask'] > 0
    assert not np.isin(targets[mask], SPECIALS).any()
    assert mask.sum() == n - 1  # same as the plain text: every text token but the first
    # The last special predicts the first suffix token, and that target is kept.
    last_special = np.flatnonzero(ex['roles'] == models.SPECIAL)[-1]
    assert mask[last_special] and ex['roles'][last_special + 1] == models.SUFFIX
    # Inputs and targets are one sequence shifted by one.
    np.testing.assert_array_equal(ex['inputs'][1:], ex['targets'][:-1])
  plain = ip.ntp_example(text, ip.example_rng(0, 0, 1), _layout(p_plain=1.0))
  assert plain['inserted'] == 0 and plain['loss_mask'].sum() == n - 1
  assert (plain['roles'][:n] == models.PREFIX).all() and (plain['roles'][n:] == models.PAD).all()


def test_mixed_batch_fraction():
  layout = _layout(p_plain=0.8)
  n = 4000
  frac = np.mean(
    [ip.ntp_example(np.arange(1, 9), ip.example_rng(1, i, 1), layout)['inserted'] for i in range(n)]
  )
  sigma = np.sqrt(0.2 * 0.8 / n)
  assert abs(frac - 0.2) < 4 * sigma, frac


def test_split_points_cover_the_text_uniformly():
  layout = _layout(p_plain=0.0)
  splits = [
    int(
      np.flatnonzero(
        ip.ntp_example(np.arange(1, 7), ip.example_rng(2, i, 1), layout)['roles'] == models.SPECIAL
      )[0]
    )
    for i in range(600)
  ]
  counts = np.bincount(splits, minlength=6)
  assert counts[0] == 0 and counts[1:6].min() > 80  # split in [1, 5]: prefix and suffix non-empty


def test_edge_cases_empty_short_overlong():
  layout = _layout(p_plain=0.0)
  empty = ip.ntp_example(np.array([], np.int32), ip.example_rng(0, 0, 1), layout)
  assert empty['valid'] == 0 and empty['loss_mask'].sum() == 0 and empty['inserted'] == 0
  one = ip.ntp_example(np.array([7]), ip.example_rng(0, 0, 1), layout)
  assert one['too_short'] == 1 and one['inserted'] == 0 and one['loss_mask'].sum() == 0
  long_text = np.arange(1, 40)
  ex = ip.ntp_example(long_text, ip.example_rng(0, 0, 1), layout)
  assert ex['truncated'] == 1 and ex['inserted'] == 1
  assert (ex['roles'] != models.PAD).sum() == 16  # every input slot is used
  assert ex['loss_mask'].sum() == 16 + 1 - 2 - 1  # 15 text tokens fit, first is no target
  cl = ip.cl_example(long_text, ip.example_rng(0, 0, 2), layout)
  assert cl['anchor'][14:].tolist() == list(SPECIALS)
  assert cl['special_positions'].tolist() == [14, 15]
  e = ip.cl_example(np.array([], np.int32), ip.example_rng(0, 0, 2), layout)
  assert e['anchor'][:2].tolist() == list(SPECIALS) and e['positive'][:2].tolist() == list(SPECIALS)


def test_token_dropout_keeps_order_and_one_token():
  rng = np.random.default_rng(0)
  out = ip.token_dropout(np.arange(100), 0.2, rng)
  assert 60 < out.size < 95 and (np.diff(out) > 0).all()
  assert ip.token_dropout(np.array([3]), 0.99, rng).tolist() == [3]


def test_stream_is_deterministic_and_carries_alpha():
  texts = [np.arange(1, n) for n in (5, 9, 12)]
  s = ip.TextStream(texts, _layout(), seed=3, alpha_of=lambda g: float(g >= 4))
  t = ip.TextStream(texts, _layout(), seed=3, alpha_of=lambda g: float(g >= 4))
  for g in (0, 3, 4, 7, 100):
    a, b = s[g], t[g]
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
    assert a['alpha'] == float(g >= 4)
  # One epoch reads every text once.
  firsts = {int(s[g]['anchor'][0]) for g in range(3)}
  assert firsts == {1}
  lengths = sorted(int((s[g]['anchor_roles'] == models.PREFIX).sum()) for g in range(3))
  assert lengths == [4, 8, 11]


def test_layout_errors():
  with pytest.raises(ValueError, match='at least one'):
    ip.Layout(seq_len=8, special_ids=(), pad_id=0)
  with pytest.raises(ValueError, match='no room'):
    ip.Layout(seq_len=3, special_ids=(1, 2), pad_id=0)
  with pytest.raises(ValueError, match='p_plain'):
    ip.Layout(seq_len=8, special_ids=(1,), pad_id=0, p_plain=1.5)
