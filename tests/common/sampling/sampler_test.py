"""Tests for common.sampling.sampler on `tiny_lm` (a small decoder trained on a Markov language).

Every property is checked against an independent reference: the plain full forward pass of the
decoder on the finished sequences (logprobs, entropies, greedy argmax, temperatures), each row run
alone (ragged batches), K tiled copies of a prompt (forking), a first run without stops (stop
sequences), numpy (top-k / top-p) and the unsharded run (8 fake devices). XLA compiles dominate on
2 CPU cores (several seconds per sampler program), so the tests share a few static configurations:
batch 4, prompts bucketed to 16 tokens, 10 new tokens.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import sharding
from common import testing
from common.models import tiny_lm
from common.sampling import sampler
from common.sampling import schedules

N, BUCKET = 10, 16
LENGTHS = (5, 9, 2, 13)


@pytest.fixture(scope='module')
def lm():
  return tiny_lm.tiny_lm()


@pytest.fixture(scope='module')
def prompts(lm):
  return [list(lm.language[100 + i]['tokens'][:n]) for i, n in enumerate(LENGTHS)]


KEYS = sampler.row_keys(jax.random.key(0), np.arange(4))
SAMPLE = sampler.SamplingConfig(max_new_tokens=N, temperature=1.0)
GREEDY = sampler.SamplingConfig(max_new_tokens=N, temperature=0.0)


def _generate(model, prompts, config=SAMPLE, key=KEYS, mask=None, **kw):
  return sampler.generate(model, prompts, mask, config=config, key=key, prompt_bucket=BUCKET, **kw)


@nnx.jit
def _full_logprobs(model, tokens):
  return jax.nn.log_softmax(model(tokens), axis=-1)


def _reference(model, prompts, gen):
  """Full-forward log-probs [B, N, V] at the generated positions (rows right-padded to 26)."""
  tokens = np.zeros((len(prompts), BUCKET + N), np.int32)
  for i, p in enumerate(prompts):
    seq = list(p) + list(np.asarray(gen.tokens[i, : int(gen.lengths[i])]))
    tokens[i, : len(seq)] = seq
  logp = np.asarray(_full_logprobs(model, jnp.asarray(tokens)))
  return np.stack([logp[i, len(p) - 1 : len(p) - 1 + N] for i, p in enumerate(prompts)])


def _pick(logp, tokens):
  return np.take_along_axis(logp, np.asarray(tokens)[..., None], axis=-1)[..., 0]


def _close(a, b, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


def test_logprobs_and_entropies_match_full_forward(lm, prompts):
  gen = _generate(lm.model, prompts)
  assert gen.tokens.shape == (4, N) and gen.tokens.dtype == jnp.int32
  np.testing.assert_array_equal(gen.lengths, N)
  assert not np.any(gen.done)
  ref = _reference(lm.model, prompts, gen)
  _close(gen.logprobs, _pick(ref, gen.tokens))
  _close(gen.model_entropies, -(np.exp(ref) * ref).sum(-1), atol=1e-4)
  # At temperature 1 without truncation the sampling distribution is the model's.
  _close(gen.sample_logprobs, gen.logprobs)
  _close(gen.entropies, gen.model_entropies)
  assert np.all(np.asarray(gen.tokens) < lm.config.vocab_size)


def test_ragged_batch_matches_each_row_alone(lm, prompts):
  left = _generate(lm.model, prompts)
  tokens, mask = sampler.pad_prompts(prompts, side='right')
  right = _generate(lm.model, tokens, mask=mask)
  np.testing.assert_array_equal(right.tokens, left.tokens)
  _close(right.logprobs, left.logprobs)
  for i, p in enumerate(prompts):
    alone = _generate(lm.model, [p], key=KEYS[i : i + 1])
    np.testing.assert_array_equal(alone.tokens[0], left.tokens[i])
    _close(alone.logprobs[0], left.logprobs[i])


def test_greedy_is_deterministic_argmax(lm, prompts):
  a = _generate(lm.model, prompts, GREEDY, key=None)
  # The timed path (ahead-of-time compiled phases, what benchmarks/decode.py uses) samples the same.
  timings = {}
  b = _generate(lm.model, prompts, GREEDY, key=None, timings=timings)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  phases = {'compile_s', 'prefill_s', 'prefill_cpu_s', 'decode_s', 'decode_cpu_s'}
  assert set(timings) == phases and all(v >= 0 for v in timings.values()), timings
  ref = _reference(lm.model, prompts, a)
  np.testing.assert_array_equal(a.tokens, ref.argmax(-1))
  _close(a.logprobs, ref.max(-1))
  np.testing.assert_array_equal(a.sample_logprobs, 0.0)
  np.testing.assert_array_equal(a.entropies, 0.0)


@pytest.mark.parametrize('rows', [4, 1])
def test_decode_loop_updates_the_donated_cache_in_place(lm, prompts, monkeypatch, rows):
  # The decode loop donates the KV cache and writes one slot per step; if XLA had to copy a layer's
  # keys or values instead (a lost donation, an update it cannot do in place, or a dot on the
  # freshly written cache, which XLA:CPU feeds from a duplicate of the update), every step would
  # move the whole cache: correct tokens, silently slower decoding. The compiled program says, for
  # batched rows and for the one-row path (q|k|v fused, its own attention branch).
  texts = testing.capture_compiled_texts(monkeypatch, sampler, '_decode')
  gen = _generate(lm.model, prompts[:rows], GREEDY, key=None, timings={}, return_cache=True)
  (text,) = texts
  testing.assert_no_cache_copies(text, gen.cache.layers[0])


def test_sampling_is_deterministic_given_keys(lm, prompts):
  a = _generate(lm.model, prompts)
  b = _generate(lm.model, prompts)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  c = _generate(lm.model, prompts, key=sampler.row_keys(jax.random.key(1), np.arange(4)))
  assert not np.array_equal(a.tokens, c.tokens)
  # A single key is split by row index: the same as passing row_keys(key, arange(B)).
  d = _generate(lm.model, prompts, key=jax.random.key(0))
  np.testing.assert_array_equal(d.tokens, a.tokens)
  with pytest.raises(ValueError, match='needs a key'):
    _generate(lm.model, prompts, key=None)


def test_temperature_schedule_indexes_generated_positions(lm, prompts):
  temps = np.array(
    schedules.ead(tau_max=1.5, tau_min=0.3, decay=4.0, warmup_tokens=2)(np.arange(N))
  )
  temps[5] = 0.0  # greedy at generated position 5 only
  config = sampler.SamplingConfig(max_new_tokens=N, temperature=temps)
  gen = _generate(lm.model, prompts, config)
  logits = _reference(lm.model, prompts, gen)  # log-probs are logits up to a per-row constant
  expected = np.asarray(jax.nn.log_softmax(logits / np.where(temps > 0, temps, 1.0)[:, None], -1))
  hot = temps > 0
  _close(gen.sample_logprobs[:, hot], _pick(expected, gen.tokens)[:, hot], atol=2e-5)
  ent = -(np.exp(expected) * expected).sum(-1)
  _close(gen.entropies[:, hot], ent[:, hot], atol=1e-4)
  np.testing.assert_array_equal(gen.tokens[:, 5], logits[:, 5].argmax(-1))
  np.testing.assert_array_equal(gen.sample_logprobs[:, 5], 0.0)
  _close(gen.logprobs, _pick(logits, gen.tokens))  # the model's logprobs ignore the temperature
  # A callable schedule is evaluated on arange(N): same program, same result.
  same = _generate(lm.model, prompts, sampler.SamplingConfig(N, temperature=lambda t: temps[t]))
  np.testing.assert_array_equal(same.tokens, gen.tokens)
  # Per-row schedules [B, N]: row 1 fully greedy.
  rows = np.broadcast_to(temps, (4, N)).copy()
  rows[1] = 0.0
  per_row = _generate(lm.model, prompts, sampler.SamplingConfig(N, temperature=rows))
  np.testing.assert_array_equal(per_row.entropies[1], 0.0)
  np.testing.assert_array_equal(per_row.tokens[0], gen.tokens[0])


def test_stop_tokens_and_sequences_and_returned_cache(lm, prompts):
  free = np.asarray(_generate(lm.model, prompts).tokens)
  seq = (int(free[0, 3]), int(free[0, 4]))  # row 0 must stop at 5 tokens (or earlier)
  stop_tok = int(free[2, 6])
  config = sampler.SamplingConfig(
    N, temperature=1.0, stop_tokens=(stop_tok,), stop_sequences=(seq,)
  )
  gen = _generate(lm.model, prompts, config, return_cache=True)
  for i in range(4):
    row = list(free[i])
    end = next(
      (t + 1 for t in range(N) if row[t] == stop_tok or tuple(row[max(0, t - 1) : t + 1]) == seq),
      None,
    )
    assert bool(gen.done[i]) == (end is not None)
    end = end or N
    assert int(gen.lengths[i]) == end
    np.testing.assert_array_equal(gen.tokens[i, :end], free[i, :end])
    np.testing.assert_array_equal(gen.tokens[i, end:], config.pad_id)
    np.testing.assert_array_equal(gen.logprobs[i, end:], 0.0)
  assert int(gen.lengths[0]) <= 5 and bool(gen.done[0]) and bool(gen.done[2])
  # The returned cache holds exactly each row's prompt and generated tokens (finished rows' padding
  # is written as invalid), ready for a next turn.
  total = np.asarray(LENGTHS) + np.asarray(gen.lengths)
  np.testing.assert_array_equal(gen.cache.num_valid(), np.broadcast_to(total, (2, 4)))
  np.testing.assert_array_equal(gen.cache.next_position, total)


def test_fork_matches_tiled_copies(lm, prompts):
  two = prompts[:2]
  forked = _generate(lm.model, two, key=KEYS[:2], num_samples=2)
  tiled = _generate(
    lm.model, [p for p in two for _ in range(2)], key=sampler.fork_keys(KEYS[:2], 2)
  )
  np.testing.assert_array_equal(forked.tokens, tiled.tokens)
  _close(forked.logprobs, tiled.logprobs)
  assert not np.array_equal(forked.tokens[0], forked.tokens[1])  # distinct samples of one prompt


def _np_top_k(x, k):
  kth = np.sort(x, -1)[..., -k][..., None]
  return np.where(x >= kth, x, -1e9)


def _np_top_p(x, p):
  out = np.full_like(x, -1e9)
  for i, row in enumerate(x):
    order = np.argsort(-row, kind='stable')
    probs = np.exp(row[order] - row.max())
    probs /= probs.sum()
    keep = order[: max(1, int(np.sum(np.cumsum(probs) - probs < p)))]
    out[i, keep] = row[keep]
  return out


def test_top_k_and_top_p_filters_match_numpy():
  x = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 3
  ks = (1, 5, 50)
  for k, got in zip(
    ks, jax.jit(lambda x: [sampler.top_k_filter(x, kk) for kk in ks])(x), strict=True
  ):
    np.testing.assert_array_equal(got, _np_top_k(x, k))
  top_p = jax.jit(sampler.top_p_filter)  # p may be traced: one program for every p
  for p in (0.0, 0.3, 0.9, 1.0):
    np.testing.assert_array_equal(top_p(x, p), _np_top_p(x, p))
  assert np.sum(np.asarray(sampler.top_p_filter(x, 0.0)) > -1e9) == 3  # always keeps one per row
  # Temperature first, then the filters (HF order).
  both = sampler.sampling_logits(jnp.asarray(x), jnp.full((3,), 0.5), 5, 0.9)
  np.testing.assert_allclose(both, _np_top_p(_np_top_k(x / 0.5, 5), 0.9), rtol=1e-6)


def test_sample_categorical_frequencies_and_support():
  probs = np.array([0.5, 0.0, 0.2, 0.0, 0.25, 0.05] + [0.0] * 250, np.float32)  # 2 blocks of 128
  logp = jnp.log(jnp.broadcast_to(jnp.asarray(probs), (20000, 256)))
  keys = sampler.row_keys(jax.random.key(3), np.arange(20000))
  draws = np.asarray(jax.jit(sampler.sample_categorical)(keys, logp))
  counts = np.bincount(draws, minlength=256)
  assert counts[probs == 0].sum() == 0  # zero-probability tokens never drawn
  np.testing.assert_allclose(counts / 20000, probs, atol=0.015)
  # The second block is reached too.
  probs2 = np.zeros(256, np.float32)
  probs2[[3, 200]] = 0.5
  draws2 = np.asarray(
    jax.jit(sampler.sample_categorical)(keys[:2000], jnp.log(jnp.broadcast_to(probs2, (2000, 256))))
  )
  assert set(np.unique(draws2)) == {3, 200} and 800 < np.sum(draws2 == 200) < 1200


def test_pad_prompts_and_temperature_arrays():
  tokens, mask = sampler.pad_prompts([[1, 2, 3], [4]], side='left', pad_id=9)
  np.testing.assert_array_equal(tokens, [[1, 2, 3], [9, 9, 4]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
  tokens, mask = sampler.pad_prompts([[1, 2, 3], [4]], side='right')
  np.testing.assert_array_equal(tokens, [[1, 2, 3], [4, 0, 0]])
  with pytest.raises(ValueError, match='at least one'):
    sampler.pad_prompts([[1], []])
  with pytest.raises(ValueError, match='a prompt of 3 tokens does not fit length=2'):
    sampler.pad_prompts([[1, 2, 3], [4]], length=2)
  np.testing.assert_array_equal(sampler.pad_prompts([[1, 2]], length=3)[0], [[0, 1, 2]])
  np.testing.assert_array_equal(sampler.temperature_array(0.7, 3), np.full(3, 0.7, np.float32))
  np.testing.assert_array_equal(sampler.temperature_array(lambda t: 1.0 / (t + 1), 2), [1.0, 0.5])
  with pytest.raises(ValueError, match='temperature array'):
    sampler.temperature_array(np.ones(4), 3)


def test_sharded_generation_matches_unsharded(lm, prompts):
  if jax.device_count() < 8:
    pytest.skip('needs 8 (fake) devices; tests/conftest.py sets them')
  ref = _generate(lm.model, prompts)
  mesh = sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])
  graphdef, state = nnx.split(lm.model)
  with nnx.use_eager_sharding(False):
    shardings = sharding.state_shardings(nnx.state(lm.model), mesh)
  state = jax.device_put(state, shardings)
  with jax.set_mesh(mesh):
    gen = _generate(nnx.merge(graphdef, state), prompts)
  np.testing.assert_array_equal(gen.tokens, ref.tokens)
  _close(gen.logprobs, ref.logprobs)
  _close(gen.entropies, ref.entropies, atol=1e-4)
  # One row: the decode loop multiplies a fused q|k|v matrix (decoder.fuse_qkv), built inside the
  # jitted program from the sharded projections; on the mesh it still samples what one device does.
  one = _generate(lm.model, prompts[:1], key=KEYS[:1])
  with jax.set_mesh(mesh):
    one_sharded = _generate(nnx.merge(graphdef, state), prompts[:1], key=KEYS[:1])
  np.testing.assert_array_equal(one_sharded.tokens, one.tokens)
  _close(one_sharded.logprobs, one.logprobs)


def test_bf16_weights_multiply_bf16_inputs_with_f32_accumulation(lm):
  # cast_weights stores the weight matrices in bf16 (norm scales stay f32); every projection and
  # the tied head then multiply bf16-rounded inputs by the bf16 weights with an f32 result, at any
  # row count (one row is multiplied as two equal rows: the same row up to f32 rounding).
  model = sampler.cast_weights(lm.model, jnp.bfloat16)
  state = nnx.state(model)
  dtypes = {str(path): x.dtype for path, x in jax.tree_util.tree_leaves_with_path(state)}
  assert any(d == jnp.bfloat16 for d in dtypes.values())
  assert all(d == jnp.float32 for p, d in dtypes.items() if 'scale' in p), dtypes
  lin = model.layers[0].mlp.up_proj
  w = np.asarray(lin.kernel[...].astype(jnp.float32), np.float64)
  x = jax.random.normal(jax.random.key(1), (5, w.shape[0]))
  xb = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  for rows in (1, 2, 5):
    y = jax.jit(lambda x: lin(x))(x[:rows])
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), xb[:rows] @ w, rtol=1e-5, atol=1e-5)
  table = np.asarray(model.embed.embedding[...].astype(jnp.float32), np.float64)
  h = jax.random.normal(jax.random.key(2), (3, 1, table.shape[1]))
  hb = np.asarray(h.astype(jnp.bfloat16).astype(jnp.float32), np.float64)[:, 0]
  logits = np.asarray(jax.jit(model.logits_from_hidden)(h))[:, 0, : lm.config.vocab_size]
  np.testing.assert_allclose(
    logits, (hb @ table.T)[:, : lm.config.vocab_size], rtol=1e-5, atol=1e-5
  )
  one = np.asarray(jax.jit(model.logits_from_hidden)(h[:1]))
  np.testing.assert_allclose(one[0, 0, : lm.config.vocab_size], logits[0], rtol=1e-6, atol=1e-6)


def test_bf16_weights_generation_matches_its_own_full_forward(lm, prompts):
  # The bf16-weight model decodes what its own full forward pass computes, batched and alone,
  # and stays close to the f32 model. "What it computes" is up to bf16 resolution, not f32's:
  # activations are rounded to bf16 before each matmul, so where the two paths' f32 values (a few
  # ulps apart, different kernels) straddle a bf16 rounding boundary an input moves by one bf16
  # ulp (2^-8 relative) and a log-prob by ~1e-3 (measured: 2.3e-3 on 1 of 40 with the tiny LM
  # trained at ac283f3; none with the one before).
  model = sampler.cast_weights(lm.model, jnp.bfloat16)
  gen = _generate(model, prompts, GREEDY, key=None)
  ref = _reference(model, prompts, gen)
  np.testing.assert_array_equal(gen.tokens, ref.argmax(-1))
  _close(gen.logprobs, ref.max(-1), atol=1e-2)
  alone = _generate(model, prompts[:1], GREEDY, key=None)
  np.testing.assert_array_equal(alone.tokens[0], gen.tokens[0])
  f32 = _reference(lm.model, prompts, gen)
  np.testing.assert_allclose(_pick(ref, gen.tokens), _pick(f32, gen.tokens), atol=0.1)
