"""Tests for `sampler.generate_chunks` (streaming): the decode loop stopped every few positions and
resumed with its donated carry gives exactly what `generate` gives, and hands out each chunk's
tokens as it goes.

The reference is `sampler.generate` itself with the same arguments (its own properties are tested
in sampler_test.py), compared bitwise: tokens, log-probabilities, entropies, lengths, done flags and
the returned KV cache. Same tiny_lm and static shapes as sampler_test.py (batch 4, prompts bucketed
to 16, 10 new tokens), so most programs come from the compilation cache.
"""

import jax
import numpy as np
import pytest

from common import testing
from common.models import tiny_lm
from common.sampling import kv_cache
from common.sampling import sampler

N, BUCKET = 10, 16
LENGTHS = (5, 9, 2, 13)
KEYS = sampler.row_keys(jax.random.key(0), np.arange(4))
FIELDS = (
  'tokens',
  'lengths',
  'logprobs',
  'sample_logprobs',
  'entropies',
  'model_entropies',
  'done',
)


@pytest.fixture(scope='module')
def lm():
  return tiny_lm.tiny_lm()


@pytest.fixture(scope='module')
def prompts(lm):
  return [list(lm.language[100 + i]['tokens'][:n]) for i, n in enumerate(LENGTHS)]


def _same(a, b):
  for f in FIELDS:
    x, y = np.asarray(getattr(a, f)), np.asarray(getattr(b, f))
    assert x.dtype == y.dtype, f
    np.testing.assert_array_equal(x, y, err_msg=f)


def _chunks(model, prompts, config, key, chunk, **kw):
  return list(
    sampler.generate_chunks(
      model, prompts, config=config, key=key, chunk=chunk, prompt_bucket=BUCKET, **kw
    )
  )


def test_chunks_end_with_exactly_what_generate_returns(lm, prompts):
  free = sampler.generate(
    lm.model, prompts, config=sampler.SamplingConfig(N), key=KEYS, prompt_bucket=BUCKET
  )
  stop = int(np.asarray(free.tokens)[2, 4])  # row 2 (at least) stops early, the others may not
  sample = sampler.SamplingConfig(N, temperature=1.0, stop_tokens=(stop,))
  greedy = sampler.SamplingConfig(N, temperature=0.0)
  for config, key in ((sample, KEYS), (greedy, None)):
    ref = sampler.generate(
      lm.model, prompts, config=config, key=key, prompt_bucket=BUCKET, return_cache=True
    )
    steps = int(np.max(ref.lengths))
    for chunk, timings in ((1, None), (3, {}), (N, None)):
      gens = _chunks(lm.model, prompts, config, key, chunk, return_cache=True, timings=timings)
      _same(gens[-1], ref)
      for got, want in zip(
        jax.tree.leaves(gens[-1].cache), jax.tree.leaves(ref.cache), strict=True
      ):
        np.testing.assert_array_equal(got, want)
      assert len(gens) == -(-steps // chunk)
      # Each chunk hands out host copies of the rows so far: a prefix of the final rows (the arrays
      # survive the next chunk's donation of the loop's buffers).
      for i, g in enumerate(gens[:-1]):
        assert isinstance(g.tokens, np.ndarray) and g.cache is None
        t = (i + 1) * chunk
        np.testing.assert_array_equal(g.lengths, np.minimum(ref.lengths, t))
        np.testing.assert_array_equal(g.tokens[:, :t], np.asarray(ref.tokens)[:, :t])
        np.testing.assert_array_equal(g.tokens[:, t:], config.pad_id)
      if timings is not None:
        assert {'compile_s', 'prefill_s', 'decode_s', 'decode_cpu_s'} <= set(timings), timings
    assert config is greedy or bool(ref.done[2])


def test_chunks_continue_a_cache_and_fork(lm, prompts):
  # A second turn on the returned cache, forked twice: as generate does it.
  config = sampler.SamplingConfig(N, temperature=1.0)
  empty = kv_cache.KVCache.init(lm.model.cfg, 2, 2 * (BUCKET + N))
  first = sampler.generate(
    lm.model, prompts[:2], config=config, key=KEYS[:2], cache=empty, return_cache=True
  )
  cache = first.cache  # neither generate nor generate_chunks donates the cache they continue
  more = [p[:3] for p in prompts[:2]]
  ref = sampler.generate(
    lm.model, more, config=config, key=KEYS[2:], num_samples=2, cache=cache, prompt_bucket=BUCKET
  )
  gens = _chunks(lm.model, more, config, KEYS[2:], 4, num_samples=2, cache=cache)
  _same(gens[-1], ref)
  assert ref.tokens.shape == (4, N)


def test_chunk_must_be_positive(lm, prompts):
  with pytest.raises(ValueError, match='chunk must be >= 1'):
    next(sampler.generate_chunks(lm.model, prompts, chunk=0))


def test_chunks_update_the_donated_cache_in_place(lm, prompts, monkeypatch):
  # As sampler_test.py's test of `_decode`: a copy of a layer's keys or values in the chunk program
  # would move the whole cache on every step (or chunk).
  texts = testing.capture_compiled_texts(monkeypatch, sampler, '_decode_until')
  greedy = sampler.SamplingConfig(N, temperature=0.0)
  gen = _chunks(lm.model, prompts, greedy, None, 4, timings={}, return_cache=True)[-1]
  (text,) = texts
  testing.assert_no_cache_copies(text, gen.cache.layers[0])
