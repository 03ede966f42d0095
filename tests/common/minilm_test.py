"""The JAX BERT encoder of common/minilm.py.

Default suite (no asset): a tiny random BERT written as a HF-style safetensors directory is loaded
and compared with a numpy forward written from the BERT paper's equations (post-LN, exact GELU,
mean pooling over real tokens, L2 norm), plus padding invariance and loader errors.
real_model: the real all-MiniLM-L6-v2 against transformers' BertModel + sentence-transformers'
pooling (mean over the attention mask, then normalise), to 1e-5 absolute per coordinate; measured
2026-11-22: max |diff| 3.0e-7, cosines 1.0000 on five sentences (one empty, one truncated at 256).
"""

import json
import math

from flax import nnx
import jax
import numpy as np
import pytest

from common import minilm

TINY = dict(
  model_type='bert',
  hidden_act='gelu',
  vocab_size=50,
  hidden_size=16,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=24,
  max_position_embeddings=32,
  type_vocab_size=2,
  layer_norm_eps=1e-12,
)


def _tiny_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  d, f = cfg['hidden_size'], cfg['intermediate_size']

  def r(*shape):
    return rng.normal(0.0, 0.3, shape).astype(np.float32)

  w = {
    'embeddings.word_embeddings.weight': r(cfg['vocab_size'], d),
    'embeddings.position_embeddings.weight': r(cfg['max_position_embeddings'], d),
    'embeddings.token_type_embeddings.weight': r(2, d),
    'embeddings.LayerNorm.weight': 1 + r(d),
    'embeddings.LayerNorm.bias': r(d),
    'embeddings.position_ids': np.arange(cfg['max_position_embeddings'])[None],
    'pooler.dense.weight': r(d, d),
    'pooler.dense.bias': r(d),
  }
  for i in range(cfg['num_hidden_layers']):
    p = f'encoder.layer.{i}.'
    for name, (o, n) in {
      'attention.self.query': (d, d),
      'attention.self.key': (d, d),
      'attention.self.value': (d, d),
      'attention.output.dense': (d, d),
      'intermediate.dense': (f, d),
      'output.dense': (d, f),
    }.items():
      w[p + name + '.weight'], w[p + name + '.bias'] = r(o, n), r(o)
    for name in ('attention.output.LayerNorm', 'output.LayerNorm'):
      w[p + name + '.weight'], w[p + name + '.bias'] = 1 + r(d), r(d)
  return w


def _write(tmp_path, weights, cfg=TINY):
  from safetensors.numpy import save_file

  (tmp_path / 'config.json').write_text(json.dumps(cfg))
  save_file(weights, str(tmp_path / 'model.safetensors'))
  return tmp_path


def _np_reference(w: dict, cfg: dict, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """BERT forward + mean pooling + L2 norm in float64 numpy, HF tensor names and layouts."""
  eps, h = cfg['layer_norm_eps'], cfg['num_attention_heads']

  def ln(x, g, b):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b

  def lin(x, name):
    return x @ w[name + '.weight'].T.astype(np.float64) + w[name + '.bias']

  gelu = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))
  b, t = ids.shape
  x = w['embeddings.word_embeddings.weight'][ids].astype(np.float64)
  x = (
    x
    + w['embeddings.position_embeddings.weight'][:t]
    + w['embeddings.token_type_embeddings.weight'][0]
  )
  x = ln(x, w['embeddings.LayerNorm.weight'], w['embeddings.LayerNorm.bias'])
  d = x.shape[-1]
  for i in range(cfg['num_hidden_layers']):
    p = f'encoder.layer.{i}.'

    def heads(y):
      return y.reshape(b, t, h, d // h).transpose(0, 2, 1, 3)

    q, k, v = (heads(lin(x, p + f'attention.self.{n}')) for n in ('query', 'key', 'value'))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // h) + np.where(mask, 0.0, -1e9)[:, None, None]
    a = np.exp(s - s.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    ctx = (a @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    x = ln(x + lin(ctx, p + 'attention.output.dense'), *_norm(w, p + 'attention.output.LayerNorm'))
    y = lin(gelu(lin(x, p + 'intermediate.dense')), p + 'output.dense')
    x = ln(x + y, *_norm(w, p + 'output.LayerNorm'))
  m = mask[..., None].astype(np.float64)
  pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1)
  return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-6)


def _norm(w, name):
  return w[name + '.weight'], w[name + '.bias']


def test_loaded_encoder_matches_numpy_bert(tmp_path):
  w = _tiny_weights(TINY)
  model = minilm.load_encoder(_write(tmp_path, w))
  rng = np.random.default_rng(1)
  ids = rng.integers(0, TINY['vocab_size'], (3, 9)).astype(np.int32)
  mask = np.array([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7], np.int32)
  got = np.asarray(minilm.sentence_embedding(model, ids, mask))
  want = _np_reference(w, TINY, ids, mask)
  np.testing.assert_allclose(got, want, atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_embedding_invariant_to_padding_and_batch(tmp_path):
  model = minilm.load_encoder(_write(tmp_path, _tiny_weights(TINY)))
  ids = np.array([[3, 7, 9, 11]], np.int32)
  alone = np.asarray(minilm.sentence_embedding(model, ids, np.ones_like(ids)))
  padded = np.concatenate([ids, np.zeros((1, 6), np.int32)], 1)
  pmask = (np.arange(10) < 4)[None].astype(np.int32)
  other = np.array([[5] * 10], np.int32)
  batch = np.concatenate([other, padded])
  bmask = np.concatenate([np.ones((1, 10), np.int32), pmask])
  in_batch = np.asarray(minilm.sentence_embedding(model, batch, bmask))[1:]
  np.testing.assert_allclose(in_batch, alone, atol=1e-5)


def test_empty_row_embeds_to_zero_not_nan(tmp_path):
  model = minilm.load_encoder(_write(tmp_path, _tiny_weights(TINY)))
  ids = np.zeros((2, 4), np.int32)
  mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], np.int32)
  out = np.asarray(minilm.sentence_embedding(model, ids, mask))
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[1], 0.0)


def test_loader_refuses_missing_and_unused_tensors(tmp_path):
  w = _tiny_weights(TINY)
  missing = dict(w)
  del missing['encoder.layer.1.output.dense.bias']
  with pytest.raises(ValueError, match='missing'):
    minilm.load_encoder(_write(tmp_path, missing))
  extra = dict(w, **{'encoder.layer.2.output.dense.bias': np.zeros(16, np.float32)})
  with pytest.raises(ValueError, match='unused'):
    minilm.load_encoder(_write(tmp_path, extra))
  with pytest.raises(ValueError, match='exact GELU'):
    minilm.BertConfig.from_hf(_write(tmp_path, w, dict(TINY, hidden_act='relu')) / 'config.json')


def test_too_long_input_is_an_error(tmp_path):
  model = minilm.load_encoder(_write(tmp_path, _tiny_weights(TINY)))
  ids = np.zeros((1, TINY['max_position_embeddings'] + 1), np.int32)
  with pytest.raises(ValueError, match='exceeds'):
    model(ids, np.ones_like(ids))


@pytest.mark.real_model
def test_real_minilm_matches_transformers():
  from common import assets

  if not assets.is_fetched(minilm.ASSET):
    pytest.skip(f'minilm is not fetched: python -m common.assets fetch {minilm.ASSET}')
  torch = pytest.importorskip('torch', reason='pip install -r requirements-reference.txt')
  transformers = pytest.importorskip('transformers')
  texts = [
    'A man is playing a guitar.',
    'Someone plays an instrument.',
    'The stock market fell sharply today.',
    '',
    'Hello ' * 300,  # truncated at 256 tokens by both
  ]
  ours = minilm.MiniLM()
  got = ours.embed(texts, batch_size=4)
  d = str(ours.directory)
  tok = transformers.AutoTokenizer.from_pretrained(d)
  hf = transformers.AutoModel.from_pretrained(d).eval()
  b = tok(texts, padding=True, truncation=True, max_length=minilm.MAX_SEQ_LEN, return_tensors='pt')
  ids, _ = ours.encode(texts)
  for i in range(len(texts)):
    n = int(b['attention_mask'][i].sum())
    assert ids[i, :n].tolist() == b['input_ids'][i, :n].tolist()
  with torch.no_grad():
    h = hf(**b).last_hidden_state
  m = b['attention_mask'].unsqueeze(-1).float()
  ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1).numpy()
  print('max |diff|', np.abs(got - ref).max())
  np.testing.assert_allclose(got, ref, atol=1e-5)
  assert got[0] @ got[1] > got[0] @ got[2] + 0.3  # a paraphrase beats an unrelated sentence


def test_parameter_count_matches_bert_formula(tmp_path):
  model = minilm.load_encoder(_write(tmp_path, _tiny_weights(TINY)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  d, f, v, p = 16, 24, 50, 32
  per_layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
  assert n == v * d + p * d + 2 * d + 2 * d + 2 * per_layer
