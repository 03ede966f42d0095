"""Causal Rewards' data: verified preferences (the task's scorer gives the chosen answer 1, the
rejected 0), the cue on the chosen side with probability train_correlation in training and
independent of the label in the test quads, deterministic items, data-balancing weights that make
the cue independent of the label, and Z's bins for every cue."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from common import config as config_lib
from common.datasets import reasoning_gym as rgd
from experiments.causal_rewards.configs import base
from projects.causal_rewards import input_pipeline as ip


@functools.cache
def data(cue='sycophancy', balance=False):
  c = base.get_config(f'smoke,data.cue={cue},data.num_test=16,data.balance={balance}')
  return ip.make_data(c)


def test_the_question_pool_is_verified_by_the_tasks_scorer():
  pool = ip.question_pool(0)
  assert len(pool) == 200  # every 1-digit a +/- b question
  for q in pool[::17]:
    a, op, b = q['expression'][0], q['expression'][1], q['expression'][2:]
    assert eval(f'{a}{op}{b}') == q['gold']  # noqa: S307 (digits and +/- only)
    assert q['wrong'] and q['gold'] not in q['wrong']


@pytest.mark.parametrize('cue', ip.CUES)
def test_training_pairs_carry_the_cue_on_the_chosen_side_at_the_configured_rate(cue):
  d = data(cue)
  tok = ip.CharTokenizer()
  n = 400
  pairs = [d.pair('train', i, d.train_correlation) for i in range(n)]
  on = np.array([p['cue_on_chosen'] for p in pairs])
  assert abs(on.mean() - 0.9) < 0.05
  for i, p in enumerate(pairs[:20]):
    it = d.draw('train', i)
    c = bool(p['cue_on_chosen'])
    want = [
      ip.render('tiny', cue, it['question']['gold'], c, it['opener'], it['filler']),
      ip.render('tiny', cue, it['wrong'], not c, it['opener'], it['filler']),
    ]
    got = [tok.decode(p['tokens'][j][d.renderer.prompt_len :]) for j in (0, 1)]
    assert got == want
    assert p['has_cue'].tolist() == [int(c), 1 - int(c)]
    if cue != 'length':
      assert p['z'].tolist() == p['has_cue'].tolist()
  # Items are pure functions of (seed, split, index).
  a, b = d.pair('train', 5, 0.9), d.pair('train', 5, 0.9)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_pair_texts_are_verified_by_the_scorer():
  d = data('format')
  for i in range(30):
    it = d.draw('train', i)
    q = it['question']
    row = {'question': q['question'], 'answer': str(q['gold']), 'metadata': '{}'}
    assert rgd.score('chain_sum', str(q['gold']), row, extract=False) == 1.0
    assert rgd.score('chain_sum', str(it['wrong']), row, extract=False) == 0.0


@pytest.mark.parametrize('cue', ip.CUES)
def test_test_quads_decorrelate_the_cue_from_the_label(cue):
  d = data(cue)
  t = d.test
  assert len(t['tokens']) == 4 * 16
  np.testing.assert_array_equal(t['has_cue'].reshape(-1, 4), np.tile([0, 1, 0, 1], (16, 1)))
  tok = ip.CharTokenizer()
  quad = d.quad('test', 0)
  it = d.draw('test', 0)
  resp = [tok.decode(quad['tokens'][j][d.renderer.prompt_len :]) for j in range(4)]
  answers = [it['question']['gold']] * 2 + [it['wrong']] * 2
  for j, ans in enumerate(answers):
    assert resp[j] == ip.render('tiny', cue, ans, bool(j % 2), it['opener'], it['filler'])
  if cue == 'length':
    assert set(np.unique(t['z'])) <= set(range(d.num_bins)) and d.num_bins == 4
    np.testing.assert_array_equal(t['spurious'], t['response_mask'].sum(-1))
    # The cue makes responses longer.
    lens = t['spurious'].reshape(-1, 4)
    assert np.all(lens[:, 1] > lens[:, 0]) and np.all(lens[:, 3] > lens[:, 2])
  else:
    np.testing.assert_array_equal(t['z'], t['has_cue'])


def test_balancing_weights_make_the_cue_independent_of_the_label():
  d = data('sycophancy', True)
  pairs = [d.pair('train', i, d.train_correlation) for i in range(400)]
  w = np.array([p['weight'] for p in pairs])
  on = np.array([p['cue_on_chosen'] for p in pairs])
  np.testing.assert_allclose(w[on == 1], 0.5 / 0.9, rtol=1e-6)
  np.testing.assert_allclose(w[on == 0], 0.5 / 0.1, rtol=1e-6)
  # Weighted, the cue sits on the chosen side half the time (up to sampling noise).
  assert abs((w * on).sum() / w.sum() - 0.5) < 0.1


def test_config_errors_are_one_line():
  for bad in ('data.cue=bold', 'data.train_correlation=1.5', 'model.kind=big'):
    with pytest.raises(config_lib.ConfigError):
      ip.check_config(base.get_config(f'smoke,{bad}'))
  with pytest.raises(config_lib.ConfigError, match='response_len'):
    ip.make_data(base.get_config('smoke,data.cue=length,data.response_len=6'))


class _ChatTokenizer:
  """ChatML-like: stop ids (<|endoftext|> = 2, <|im_end|> = 7); a turn closes with 7."""

  stop_ids = (2, 7)
  pad_id = None

  def apply_chat_template(self, messages, add_generation_prompt):
    return messages[0]['content']

  def encode(self, text, add_bos=False):
    return [10 + ord(c) % 40 for c in text]

  def end_of_turn_id(self):
    return 7


def test_a_pretrained_models_responses_end_with_its_end_of_turn_token(monkeypatch):
  """The reward head reads the last token: a response must end as the model's chat turns do
  (SmolLM2's <|im_end|>), not with its lowest stop id (<|endoftext|>)."""
  from common.models import loader  # noqa: PLC0415

  monkeypatch.setattr(loader, 'load_tokenizer', lambda name: _ChatTokenizer())
  r = ip.make_renderer(base.get_config('smollm2'))
  ids = r.response('The answer is 4.')
  assert ids[-1] == 7 and 2 not in ids
  assert r.pad_id == 7
