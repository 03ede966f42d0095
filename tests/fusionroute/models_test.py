"""FusionRoute's decoding maths (Eq. 1) and decode loop against independent references."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import sharding
from common.adapters import core as adapters_core
from common.models import decoder
from projects.fusionroute import input_pipeline as ip
from projects.fusionroute import models
from tests.fusionroute import conftest


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _sharpen_head(model: models.FusionRoute, seed: int = 0, scale: float = 3.0):
  """A routing head whose argmax changes from token to token (random init is nearly flat)."""
  k = model.router.head.kernel
  k[...] = scale * jax.random.normal(jax.random.key(seed), k[...].shape)


def _rand(key, *shape):
  return 3.0 * jax.random.normal(jax.random.key(key), shape)


def test_logit_addition_is_the_normalised_product_of_the_two_distributions():
  b, v, n = 4, 11, 3
  router, routing, experts = _rand(0, b, v), _rand(1, b, n), _rand(2, n, b, v)
  logp, selected = models.fuse(router, routing, experts, models.fusionroute(b, n))
  sel = np.argmax(np.asarray(routing), -1)
  np.testing.assert_array_equal(np.asarray(selected), sel)
  p_r = np.exp(_log_softmax(router))
  p_e = np.exp(_log_softmax(np.asarray(experts)[sel, np.arange(b)]))
  product = p_r * p_e / (p_r * p_e).sum(-1, keepdims=True)
  np.testing.assert_allclose(np.exp(np.asarray(logp)), product, rtol=1e-5, atol=1e-7)


def test_a_uniform_router_gives_the_selected_expert():
  b, v, n = 3, 9, 2
  routing, experts = _rand(1, b, n), _rand(2, n, b, v)
  logp, selected = models.fuse(jnp.zeros((b, v)), routing, experts, models.fusionroute(b, n))
  want = _log_softmax(np.asarray(experts)[np.asarray(selected), np.arange(b)])
  np.testing.assert_allclose(np.asarray(logp), want, atol=1e-5)


def test_a_router_equal_to_the_expert_squares_and_sharpens_it():
  b, v, n = 2, 7, 1
  experts = _rand(2, n, b, v)
  logp, _ = models.fuse(experts[0], jnp.zeros((b, n)), experts, models.fusionroute(b, n))
  p = np.exp(_log_softmax(experts[0]))
  np.testing.assert_allclose(np.exp(np.asarray(logp)), p**2 / (p**2).sum(-1, keepdims=True), 1e-5)


def test_uniform_logit_averaging_is_the_normalised_geometric_mean():
  b, v, n = 3, 8, 3
  experts = _rand(2, n, b, v)
  logp, _ = models.fuse(_rand(0, b, v), _rand(1, b, n), experts, models.uniform(b, n))
  want = _log_softmax(_log_softmax(np.asarray(experts)).mean(0))
  np.testing.assert_allclose(np.asarray(logp), want, atol=1e-5)


def test_routing_only_equals_fusionroute_with_zeroed_router_logits():
  b, v, n = 5, 10, 3
  routing, experts = _rand(1, b, n), _rand(2, n, b, v)
  a, _ = models.fuse(_rand(0, b, v), routing, experts, models.routing_only(b, n))
  z, _ = models.fuse(jnp.zeros((b, v)), routing, experts, models.fusionroute(b, n))
  np.testing.assert_allclose(np.asarray(a), np.asarray(z), atol=1e-6)


def test_oracle_and_single_expert_mixings_pick_that_expert():
  b, v, n = 3, 6, 3
  experts = _rand(2, n, b, v)
  domains = np.array([2, 0, 1])
  logp, _ = models.fuse(_rand(0, b, v), _rand(1, b, n), experts, models.oracle(domains, n))
  want = _log_softmax(np.asarray(experts)[domains, np.arange(b)])
  np.testing.assert_allclose(np.asarray(logp), want, atol=1e-5)
  logp, _ = models.fuse(_rand(0, b, v), _rand(1, b, n), experts, models.single_expert(b, n, 1))
  np.testing.assert_allclose(np.asarray(logp), _log_softmax(np.asarray(experts)[1]), atol=1e-5)


def test_deferral_switches_between_the_router_lm_and_the_routed_expert():
  b, v, n = 6, 8, 3
  router, routing, experts = _rand(0, b, v), _rand(1, b, n), _rand(2, n, b, v)
  threshold = 0.8
  logp, selected = models.fuse(router, routing, experts, models.deferral(b, n, threshold))
  w = np.exp(_log_softmax(routing))
  confident = w.max(-1) >= threshold
  assert confident.any() and not confident.all()  # both branches are exercised
  sel = np.asarray(selected)
  want = np.where(
    confident[:, None], _log_softmax(np.asarray(experts)[sel, np.arange(b)]), _log_softmax(router)
  )
  np.testing.assert_allclose(np.asarray(logp), want, atol=1e-5)
  with pytest.raises(ValueError, match='threshold'):
    models.deferral(b, n, 0.0)


def _prompts():
  return [ip.prompt_ids(ip.problem(d, 0, 'eval', i)) for i in range(3) for d in range(3)]


def _gen(model, mix_fn, **kw):
  prompts = _prompts()
  return models.generate(
    model, prompts, mix_fn(len(prompts), model.num_experts), max_new_tokens=6, eos_id=ip.EOS, **kw
  )


def test_permuting_the_experts_with_the_head_rows_changes_nothing():
  model = conftest.make_model(n=3)
  _sharpen_head(model)
  perm = [2, 0, 1]
  permuted = conftest.make_model(n=3, expert_seeds=[1 + p for p in perm])
  nnx.update(permuted.router, nnx.state(model.router))
  permuted.router.head.kernel[...] = model.router.head.kernel[...][:, jnp.asarray(perm)]
  a, b = _gen(model, models.fusionroute), _gen(permuted, models.fusionroute)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)
  valid = np.asarray(a.experts) >= 0
  np.testing.assert_array_equal(
    np.asarray(perm)[np.asarray(b.experts)][valid], np.asarray(a.experts)[valid]
  )


def test_cached_decoding_equals_recomputing_from_scratch():
  """Every model's KV cache stays in step with the generated tokens: the cached loop's tokens,
  log-probs and routed experts equal a cache-free forward over prompt + generated tokens."""
  model = conftest.make_model(n=3)
  _sharpen_head(model)
  for mix_fn in (models.fusionroute, models.routing_only, models.uniform):
    gen = _gen(model, mix_fn)
    tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
    assert (np.asarray(gen.experts) >= 0).sum() == lengths.sum()
    for row, prompt in enumerate(_prompts()):
      seq = np.asarray(prompt + list(tokens[row, : lengths[row]]), np.int32)[None]
      mix = mix_fn(1, model.num_experts)
      logp, sel = models.sequence_logprobs(model, seq, np.ones_like(seq), mix)
      logp, sel = np.asarray(logp)[0], np.asarray(sel)[0]
      first = len(prompt) - 1  # the position that predicts the first generated token
      for t in range(lengths[row]):
        pos = first + t
        assert int(np.argmax(logp[pos])) == tokens[row, t]  # greedy picks the same token
        np.testing.assert_allclose(logp[pos, tokens[row, t]], gen.logprobs[row, t], atol=1e-4)
        assert sel[pos] == gen.experts[row, t]


def test_greedy_decoding_is_deterministic_and_sampling_reproducible():
  model = conftest.make_model(n=2)
  a, b = _gen(model, models.fusionroute), _gen(model, models.fusionroute)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  s1 = _gen(model, models.fusionroute, temperature=1.0, key=jax.random.key(3))
  s2 = _gen(model, models.fusionroute, temperature=1.0, key=jax.random.key(3))
  s3 = _gen(model, models.fusionroute, temperature=1.0, key=jax.random.key(4))
  np.testing.assert_array_equal(np.asarray(s1.tokens), np.asarray(s2.tokens))
  assert not np.array_equal(np.asarray(s1.tokens), np.asarray(s3.tokens))
  with pytest.raises(ValueError, match='needs a key'):
    _gen(model, models.fusionroute, temperature=1.0)


def test_finished_rows_emit_padding_and_stop_at_eos():
  model = conftest.make_model(n=2)
  # Make EOS the router LM's certain choice: every row ends after one token.
  emb = model.router.lm.embed.embedding
  emb[...] = emb[...].at[ip.EOS].set(50.0 * emb[...].mean(0) + 50.0)
  gen = _gen(model, models.router_lm)
  tokens = np.asarray(gen.tokens)
  if np.asarray(gen.done).all():
    assert (tokens[:, 0] == ip.EOS).all() and (tokens[:, 1:] == ip.PAD).all()
    assert (np.asarray(gen.lengths) == 1).all()


def test_experts_are_frozen_and_get_no_gradient(model):
  assert all(
    isinstance(v, adapters_core.Frozen)
    for e in model.experts
    for _, v in nnx.iter_graph(e)
    if isinstance(v, nnx.Variable)
  )
  params = nnx.state(model, nnx.Param)
  paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert paths and all("'router'" in p for p in paths)


def test_experts_with_another_vocabulary_are_a_one_line_error():
  with sharding.unsharded():
    lm = decoder.Decoder(conftest.decoder_config(), rngs=nnx.Rngs(0))
    router = models.Router(lm, 2, rngs=nnx.Rngs(1))
    experts = [
      decoder.Decoder(conftest.decoder_config(), rngs=nnx.Rngs(2)),
      decoder.Decoder(conftest.decoder_config(vocab_size=300), rngs=nnx.Rngs(3)),
    ]
    with pytest.raises(models.VocabularyMismatch) as e:
      models.FusionRoute(router, experts)
  msg = str(e.value)
  assert '\n' not in msg and '300' in msg and str(ip.VOCAB_SIZE) in msg
