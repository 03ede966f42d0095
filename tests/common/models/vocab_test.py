"""extend_vocab on tiny synthetic models: ids, rows, re-padding, sharding, unchanged old logits."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import sharding
from common.models import loader
from common.models import vocab
from tests.common.models import synthetic_gguf as syn

TOKENS = np.array([[5, 17, 200, 3, 99, 260, 42, 7]], np.int32)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('vocab')
  for spec in (syn.LLAMA, syn.QWEN2):
    syn.write(root / f'{spec.arch}.gguf', spec)
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('MONOREPO_CACHE_DIR', str(root / 'cache'))
    yield root


def _load(files, arch, mesh=None):
  return loader.load_pretrained(files / f'{arch}.gguf', mesh=mesh)


@jax.jit
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def _logits(model, tokens=TOKENS):
  return np.asarray(_forward(*nnx.split(model), jnp.asarray(tokens)))


def test_new_tokens_fill_the_padding_with_mean_rows(files):
  model, cfg, tok = _load(files, 'llama')
  before = _logits(model)
  ids = vocab.extend_vocab(model, tok, ['<a>', '<b>', '<a>'])
  assert ids == [cfg.vocab_size, cfg.vocab_size + 1, cfg.vocab_size]
  assert model.cfg.vocab_size == cfg.vocab_size + 2 and model.cfg.padded_vocab == cfg.padded_vocab
  table = np.asarray(model.embed.embedding.get_value())
  assert table.shape == (cfg.padded_vocab, cfg.d_model)
  np.testing.assert_allclose(table[ids[0]], table[: cfg.vocab_size].mean(0), rtol=1e-5, atol=1e-7)
  after = _logits(model)
  np.testing.assert_allclose(after[..., : cfg.vocab_size], before[..., : cfg.vocab_size], atol=1e-5)
  # Tied head + mean init: the new token's logit is the mean of the old ones.
  np.testing.assert_allclose(
    after[..., ids[0]], before[..., : cfg.vocab_size].mean(-1), rtol=1e-4, atol=1e-4
  )
  assert after[..., cfg.vocab_size + 2 :].max() < -1e8  # still-unused padding stays masked
  assert tok.encode('x<b>') == [tok.token_to_id('x'), ids[1]]
  assert vocab.extend_vocab(model, tok, ['<b>']) == [ids[1]]  # known token: nothing changes
  assert model.cfg.vocab_size == cfg.vocab_size + 2


def test_repad_untied_model_with_normal_init(files):
  model, cfg, tok = _load(files, 'qwen2')
  before = _logits(model)
  new = [f'<item_{i}>' for i in range(cfg.padded_vocab - cfg.vocab_size + 5)]
  ids = vocab.extend_vocab(model, tok, new, init='normal', seed=3)
  assert ids == list(range(cfg.vocab_size, cfg.vocab_size + len(new)))
  assert model.cfg.padded_vocab == cfg.padded_vocab + 128
  emb, head = (
    np.asarray(model.embed.embedding.get_value()),
    np.asarray(model.lm_head.kernel.get_value()),
  )
  assert emb.shape == (cfg.padded_vocab + 128, cfg.d_model)
  assert head.shape == (cfg.d_model, cfg.padded_vocab + 128)
  assert not emb[ids[-1] + 1 :].any() and not head[:, ids[-1] + 1 :].any()
  rows = emb[ids]
  assert np.abs(rows - rows.mean(0)).max() > 0  # 'normal' rows differ from one another
  np.testing.assert_allclose(rows.std(0).mean(), emb[: cfg.vocab_size].std(0).mean(), rtol=0.2)
  after = _logits(model)
  assert after.shape[-1] == cfg.padded_vocab + 128
  np.testing.assert_allclose(after[..., : cfg.vocab_size], before[..., : cfg.vocab_size], atol=1e-5)
  assert np.isfinite(after[..., ids]).all() and after[..., ids].max() > -1e8
  with pytest.raises(ValueError, match='init'):
    vocab.extend_vocab(model, tok, ['<z>'], init='zeros')


def test_repadded_arrays_keep_their_sharding(files):
  mesh = sharding.make_mesh((('data', 2), ('fsdp', 2), ('tensor', 2)))
  model, cfg, tok = _load(files, 'qwen2', mesh=mesh)
  old = np.asarray(model.embed.embedding.get_value())
  vocab.extend_vocab(model, tok, [f'<t{i}>' for i in range(cfg.padded_vocab - cfg.vocab_size + 1)])
  emb, head = model.embed.embedding.get_value(), model.lm_head.kernel.get_value()
  assert emb.sharding.mesh == mesh and head.sharding.mesh == mesh
  assert emb.sharding.spec == jax.sharding.PartitionSpec('tensor', 'fsdp')
  assert head.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  np.testing.assert_array_equal(np.asarray(emb)[: cfg.vocab_size], old[: cfg.vocab_size])
