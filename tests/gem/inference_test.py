"""projects.gem.inference: batched embedding == one at a time == models.embed; search; generation."""

from flax import nnx
import numpy as np

from common import sharding
from common.models import decoder
from projects.gem import inference
from projects.gem import input_pipeline
from projects.gem import models

CFG = decoder.DecoderConfig(
  vocab_size=60, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
LAYOUT = input_pipeline.Layout(seq_len=12, special_ids=(58,), pad_id=0)


def _model():
  with sharding.unsharded():
    return models.GemModel(decoder.Decoder(CFG, rngs=nnx.Rngs(0)))


def test_embeddings_do_not_depend_on_batch_mates_and_match_embed():
  model = _model()
  rng = np.random.default_rng(0)
  texts = [rng.integers(1, 50, size=n) for n in (0, 3, 11, 20, 5)]
  together = inference.embed_token_lists(model, texts, LAYOUT, batch_size=4)
  assert together.shape == (5, CFG.d_model)
  for i, t in enumerate(texts):
    alone = inference.embed_token_lists(model, [t], LAYOUT, batch_size=4)[0]
    np.testing.assert_allclose(alone, together[i], rtol=1e-5, atol=1e-6)
  row = input_pipeline.end_appended(texts[2], LAYOUT)
  direct = models.embed(
    model, row['tokens'][None], row['roles'][None], row['special_positions'][None]
  )
  np.testing.assert_allclose(np.asarray(direct)[0], together[2], rtol=1e-5, atol=1e-6)
  assert inference.embed_token_lists(model, [], LAYOUT).shape == (0, CFG.d_model)


def test_nearest_finds_itself_first():
  x = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
  idx, cos = inference.nearest(x, x, k=2)
  assert idx[:, 0].tolist() == list(range(5))
  np.testing.assert_allclose(cos[:, 0], 1.0, rtol=1e-5)
  assert (cos[:, 1] <= cos[:, 0]).all()


def test_greedy_generation_matches_argmax_of_the_plain_lm():
  model = _model()
  prompt = np.array([5, 6, 7])
  (out,) = inference.greedy_continuations(model, [prompt], max_new_tokens=3, pad_id=0)
  assert len(out) == 3
  seq = list(prompt)
  for tok in out:
    logits = np.asarray(nnx.jit(lambda m, t: m.lm(t))(model, np.asarray([seq])))[0, -1]
    assert tok == int(np.argmax(logits[: CFG.vocab_size]))
    seq.append(tok)
