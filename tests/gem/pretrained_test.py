"""GEM on a pretrained LM (projects/gem/pretrained.py + train.py's model.pretrained path).

Default suite: a synthetic llama GGUF (tests/common/models/synthetic_gguf.py) stands in for the real
model; the state fit would start from must have exactly the abstract spec's structure and shapes,
hold the GGUF's weights in the old rows, mean-initialised special rows, and leave the base model's
logits over the old vocabulary unchanged. real_model: the `smollm2` config itself is built (data,
tokenizer, QA rows, initial state) without training.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from common import sharding
from common import train_loop
from experiments.gem.configs import base
from projects.gem import input_pipeline
from projects.gem import losses
from projects.gem import models
from projects.gem import pretrained
from projects.gem import train
from tests.common.models import synthetic_gguf as syn


def _spec_and_state(config, vocab_size):
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  rules = tuple(tuple(r) for r in config.sharding.rules)
  spec = train_loop.abstract_state(train.create_state_fn(config, vocab_size), mesh, rules)
  with jax.set_mesh(mesh):
    state = train.initial_state_fn(config)(spec)
  return spec, state


def _check_against_spec(spec, state):
  want = jax.tree.map(lambda x: (x.shape, x.dtype), spec.state)
  got = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert jax.tree.leaves(got) == jax.tree.leaves(want)


def test_pretrained_initial_state_matches_spec_and_base_weights(tmp_path, monkeypatch):
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path / 'cache'))
  from common.models import loader

  gguf = tmp_path / 'llama.gguf'
  syn.write(gguf, syn.LLAMA)
  config = base.get_config('smoke,gem.num_special=2')
  with config.unlocked():
    config.model = ml_collections.ConfigDict(dict(pretrained=str(gguf)))
  tok = input_pipeline.tokenizer(config)
  base_lm, base_cfg, _ = loader.load_pretrained(gguf)
  assert tok.get_vocab_size() == base_cfg.vocab_size + 2
  assert input_pipeline.special_ids(tok, 2) == (base_cfg.vocab_size, base_cfg.vocab_size + 1)
  assert models.model_config(config, tok.get_vocab_size()).d_model == base_cfg.d_model
  with pytest.raises(ValueError, match='below'):
    pretrained.decoder_config(str(gguf), base_cfg.vocab_size - 1, 'float32')

  spec, state = _spec_and_state(config, tok.get_vocab_size())
  _check_against_spec(spec, state)
  model = train_loop.model_of(spec.graphdef, state)
  emb = np.asarray(model.lm.embed.embedding[...])
  old = np.asarray(base_lm.embed.embedding[...])[: base_cfg.vocab_size]
  np.testing.assert_array_equal(emb[: base_cfg.vocab_size], old)
  for i in (0, 1):  # mean init of each special row
    np.testing.assert_allclose(emb[base_cfg.vocab_size + i], old.mean(0), rtol=1e-5, atol=1e-6)

  tokens = jnp.asarray(np.random.default_rng(0).integers(0, base_cfg.vocab_size, size=(2, 6)))
  before = np.asarray(nnx.jit(lambda m, t: m(t))(base_lm, tokens))[..., : base_cfg.vocab_size]
  roles = jnp.full(tokens.shape, models.PREFIX)
  after = np.asarray(nnx.jit(lambda m, t, r: m.logits(t, r))(model, tokens, roles))
  np.testing.assert_allclose(after[..., : base_cfg.vocab_size], before, atol=1e-5)


def test_adapter_speaks_the_tokenizers_api(tmp_path, monkeypatch):
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path / 'cache'))
  gguf = tmp_path / 'llama.gguf'
  syn.write(gguf, syn.LLAMA)
  tok = pretrained.tokenizer(str(gguf), 1)
  (enc,) = tok.encode_batch(['the word'])
  assert enc.ids == tok.encode('the word').ids and len(enc.ids) > 0
  assert tok.decode(enc.ids) == 'the word'
  sid = tok.token_to_id(models.special_token_names(1)[0])
  assert sid == tok.get_vocab_size() - 1
  assert tok.encode(models.special_token_names(1)[0]).ids == [sid]


@pytest.mark.real_model
def test_smollm2_config_builds():
  """The smollm2 config end to end up to the first step: data, tokenizer, QA rows, initial state."""
  from common import assets

  if not assets.is_fetched('smollm2'):
    pytest.skip('smollm2 is not fetched: python -m common.assets fetch smollm2')
  config = base.get_config('smollm2')
  d = input_pipeline.Data(config)
  assert d.vocab_size == 49152 + config.gem.num_special
  assert d.specials == (49152,)
  assert len(d.qa_rows) == config.eval.qa_items and len(d.ppl_rows) == config.eval.ppl_texts
  assert losses.phases(config) == (0, 100, 200)
  assert losses.schedule_alphas(config) == (0.0, 1.0)
  spec, state = _spec_and_state(config, d.vocab_size)
  _check_against_spec(spec, state)
  n = sum(x.size for x in jax.tree.leaves(state['model']))
  assert 134_000_000 < n < 136_000_000, n  # SmolLM2-135M + one row + the log-scale
