"""projects.blockpruner.models: blocks and masks, parameter accounting, and the cached-prefix
evaluation (`layer_inputs` + `nll_from`) against a full forward of the decoder."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.models import decoder
from common.models import perplexity
from projects.blockpruner import models
from tests.blockpruner import util


def test_search_spaces_and_masks():
  assert models.all_blocks(2) == [(0, 'mha'), (1, 'mha'), (0, 'mlp'), (1, 'mlp')]
  assert models.all_blocks(2, 'mlp') == [(0, 'mlp'), (1, 'mlp')]
  with pytest.raises(ValueError, match='block_type'):
    models.all_blocks(2, 'attn')
  removed = [(3, 'mlp'), (0, 'mha'), (3, 'mha')]
  mask = models.mask_of(removed, 4)
  assert mask.shape == (4, 2) and mask.sum() == 5
  assert not mask[3].any() and not mask[0, 0] and mask[0, 1]
  assert sorted(models.removed_of(mask)) == sorted(removed)
  assert models.describe(removed) == 'mlp3 mha0 mha3' and models.describe([]) == '(none)'


@pytest.mark.parametrize('cfg', [util.CFG, util.GEMMA3], ids=['llama', 'gemma3'])
def test_block_params_are_what_removal_removes(cfg):
  model = util.build(cfg)
  sizes = models.block_params(model)
  assert len(sizes) == 2 * cfg.num_layers
  mlp = 3 * cfg.d_model * cfg.mlp_dim + cfg.d_model * (2 if cfg.post_norms else 1)
  assert sizes[(1, 'mlp')] == mlp
  removed = [(0, 'mha'), (2, 'mlp'), (3, 'mha'), (3, 'mlp')]
  small = models.remove(model, removed)
  assert models.num_params(model) - models.num_params(small) == sum(sizes[b] for b in removed)
  # Embedding + final norm + every block: nothing is counted twice or left out.
  rest = models.num_params(model) - sum(sizes.values())
  assert rest == cfg.padded_vocab * cfg.d_model + cfg.d_model


@pytest.mark.parametrize('cfg', [util.CFG, util.GEMMA3], ids=['llama', 'gemma3'])
def test_nll_from_a_cached_prefix_equals_the_full_forward(cfg):
  """The residual stream entering layer j under a mask, run from j with a mask that differs only at
  layers >= j, gives the full forward's NLL under that mask."""
  model = util.build(cfg)
  w = util.sample_windows(model, 3, 10)
  tokens, targets, tmask = w.tokens[:, :-1], w.tokens[:, 1:], w.mask[:, 1:]
  base = models.mask_of([(0, 'mlp')], cfg.num_layers)
  cand = models.mask_of([(0, 'mlp'), (2, 'mha')], cfg.num_layers)
  streams = nnx.jit(models.layer_inputs)(model, tokens, jnp.asarray(base))
  assert streams.shape == (cfg.num_layers + 1, 3, 10, cfg.d_model)
  want, count = perplexity.token_nll(model, jnp.asarray(w.tokens), w.mask, block_mask=cand)
  run = nnx.jit(models.nll_from)
  for start in (0, 1, 2):  # any layer at or before the first change
    got, n = run(model, streams[start], jnp.int32(start), jnp.asarray(cand), targets, tmask)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    np.testing.assert_array_equal(n, count)
  # The last stream through the final norm and head is the masked model's output.
  logits = model.logits_from_hidden(model.final_norm(streams[-1]))
  np.testing.assert_allclose(logits, model(tokens, block_mask=base), rtol=1e-5, atol=2e-5)


def test_remove_equals_the_mask_on_real_shapes():
  model = util.build(util.GEMMA3)
  removed = [(1, 'mha'), (2, 'mlp'), (2, 'mha')]
  small = models.remove(model, removed)
  assert isinstance(small, decoder.Decoder)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 7)), jnp.int32)
  mask = models.mask_of(removed, 4)
  np.testing.assert_allclose(
    small(tokens), model(tokens, block_mask=jnp.asarray(mask)), rtol=1e-5, atol=2e-5
  )
  assert jax.tree.leaves(nnx.state(small.layers[2], nnx.Param)) == []
