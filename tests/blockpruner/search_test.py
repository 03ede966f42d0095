"""projects.blockpruner.search: the greedy step's argmin, the zero-block case, the baselines' orders
(ShortGPT's block influence against a numpy reference) and resuming a search from its state."""

from __future__ import annotations

from flax import nnx
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from common.models import perplexity
from projects.blockpruner import losses
from projects.blockpruner import models
from projects.blockpruner import search
from tests.blockpruner import util


class FakeScorer:
  """A scorer whose candidate losses are a fixed function of the blocks removed."""

  def __init__(self, cost):
    self.cost = cost
    self.calls = []

  def candidate_losses(self, mask, candidates):
    self.calls.append((mask.copy(), [list(c) for c in candidates]))
    base = models.removed_of(mask)
    return np.asarray([self.cost([*base, *c]) for c in candidates], np.float64)

  def loss(self, mask):
    return self.cost(models.removed_of(mask))


def test_greedy_step_takes_the_argmin_first_on_ties_never_nan():
  costs = {(1, 'mha'): 2.0, (0, 'mlp'): 1.5, (1, 'mlp'): 1.5, (0, 'mha'): float('nan')}
  scorer = FakeScorer(lambda removed: sum(costs[tuple(b)] for b in removed))
  pruner = search.BlockPruner(2, 'mix')
  step = pruner.step([], scorer)
  # (0, mlp) and (1, mlp) tie at 1.5: the first in the paper's order (MHA by layer, then MLP) wins.
  assert step.blocks == [(0, 'mlp')] and step.loss == 1.5 and step.candidates == 4
  step = pruner.step([(0, 'mlp')], scorer)
  assert step.blocks == [(1, 'mlp')] and step.candidates == 3
  mask, cands = scorer.calls[-1]
  assert not mask[0, 1] and [(0, 'mlp')] not in cands  # removed blocks are not candidates
  assert search.argmin_first([np.nan, 3.0, 1.0, 1.0]) == 2
  only_mha = search.BlockPruner(2, 'mha').step([], scorer)
  assert only_mha.blocks == [(1, 'mha')] and only_mha.candidates == 2
  layer = search.LayerPerplexity(2).step([], scorer)  # whole layers: 0 -> nan, 1 -> 3.5
  assert layer.blocks == [(1, 'mha'), (1, 'mlp')]


@pytest.fixture(scope='module')
def case():
  """A random 4-layer model, 16 calibration rows of 12 tokens sampled from it, and its scorer."""
  model = util.build()
  w = util.sample_windows(model, 16, 12)
  return model, w, losses.CalibrationScorer(model, w, batch_size=8)


def _brute_force(model, w, removed):
  """Calibration NLL by a full forward with the blocks skipped, through the shared perplexity
  function (no cached prefix; the structural removal equals it, tests/common/models)."""
  mask = jnp.asarray(models.mask_of(removed, model.cfg.num_layers))
  return perplexity.evaluate(model, w, batch_size=16, model_kwargs={'block_mask': mask})['loss']


def test_greedy_step_picks_the_argmin_perplexity_block(case):
  model, w, scorer = case
  removed = [(2, 'mlp')]
  step = search.BlockPruner(4, 'mix').step(removed, scorer)
  space = [b for b in models.all_blocks(4) if b not in removed]
  want = [_brute_force(model, w, [*removed, b]) for b in space]
  assert step.blocks == [space[int(np.argmin(want))]]
  np.testing.assert_allclose(step.loss, min(want), rtol=1e-5)
  # The chosen removal is strictly better than the runner-up here (not a tie broken by order).
  assert sorted(want)[1] - sorted(want)[0] > 1e-4


def test_a_zero_weight_block_is_removed_first_and_leaves_perplexity_unchanged(case):
  model = case[0]
  for block in [(1, 'mha'), (2, 'mlp')]:
    zeroed = util.zero_block(model, *block)
    w = util.sample_windows(zeroed, 16, 12, seed=1)  # the zeroed model's own text
    dense = _brute_force(zeroed, w, [])
    scorer = losses.CalibrationScorer(zeroed, w, batch_size=8)
    np.testing.assert_allclose(scorer.loss(models.mask_of([], 4)), dense, rtol=1e-6)
    step = search.BlockPruner(4, 'mix').step([], scorer)
    assert step.blocks == [block]
    np.testing.assert_allclose(step.loss, dense, rtol=1e-6)
    # Every other removal raises the calibration perplexity (the text is the model's own).
    others = [b for b in models.all_blocks(4) if b != block]
    assert min(scorer.candidate_losses(models.mask_of([], 4), [[b] for b in others])) > dense


def test_prefix_cache_changes_no_choice(case):
  model, w, scorer = case
  plain = losses.CalibrationScorer(model, w, batch_size=16, prefix_cache=False)
  mask = models.mask_of([(0, 'mha')], 4)
  cands = [[b] for b in models.all_blocks(4)[1:]] + [[(3, 'mha'), (3, 'mlp')]]
  np.testing.assert_allclose(
    scorer.candidate_losses(mask, cands), plain.candidate_losses(mask, cands), rtol=1e-5
  )
  with pytest.raises(ValueError, match='multiple'):
    losses.CalibrationScorer(model, w, batch_size=5)


def test_block_influence_matches_numpy_and_orders_shortgpt(case):
  model, w, scorer = case
  streams = np.asarray(
    nnx.jit(models.layer_inputs)(model, w.tokens[:, :-1], jnp.ones((4, 2), bool)), np.float64
  )
  a, b = streams[:-1], streams[1:]
  cos = (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
  want = 1.0 - cos.mean(axis=(1, 2))  # every calibration token is real here
  got = search.block_influence(scorer, models.mask_of([], 4))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  method = search.BlockInfluence(4)
  removed = []
  for _ in range(4):
    removed += method.step(removed, scorer).blocks
  order = [removed[i][0] for i in range(0, 8, 2)]
  assert order == list(np.argsort(want, kind='stable'))
  with pytest.raises(ValueError, match='nothing left'):
    method.step(removed, scorer)


@pytest.mark.parametrize('name', search.METHODS)
def test_a_restored_search_continues_from_the_blocks_already_removed(case, name):
  """What the run checkpoints (the removal order and the method's JSON state) is enough: a fresh
  method object restored after k steps takes the uninterrupted search's next steps."""
  _, _, scorer = case
  config = ml_collections.ConfigDict({'prune': {'method': name, 'block_type': 'mix'}, 'seed': 3})
  steps = 3
  full = search.from_config(config, 4)
  removed, losses_ = [], []
  for _ in range(steps):
    s = full.step(removed, scorer)
    removed += s.blocks
    losses_.append(s.loss)
  for k in (1, 2):
    first = search.from_config(config, 4)
    done = []
    for _ in range(k):
      done += first.step(done, scorer).blocks
    state = first.state()
    resumed = search.from_config(config, 4)
    resumed.restore(state)
    again = []
    for _ in range(steps - k):
      s = resumed.step(done, scorer)
      done += s.blocks
      again.append(s.loss)
    assert done == removed
    assert again == losses_[k:]


def test_random_blocks_depend_on_the_seed_only():
  a = search.RandomBlocks(6, 'mix', seed=0).order
  assert a == search.RandomBlocks(6, 'mix', seed=0).order
  assert a != search.RandomBlocks(6, 'mix', seed=1).order
  assert sorted(a) == sorted(models.all_blocks(6))
  assert set(search.RandomBlocks(6, 'mha', seed=0).order) == set(models.all_blocks(6, 'mha'))
