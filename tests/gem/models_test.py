"""GEM's mask, bottleneck, special independence, read-out and the unchanged base LM (spec 4(d))."""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import sharding
from common.models import decoder
from projects.gem import input_pipeline
from projects.gem import models
from tests.common.models import synthetic_gguf as syn

CFG = decoder.DecoderConfig(
  vocab_size=60, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
SPECIALS = (50, 51, 52)


def _model(seed=0):
  with sharding.unsharded():
    return models.GemModel(decoder.Decoder(CFG, rngs=nnx.Rngs(seed)))


@pytest.fixture(scope='module')
def model():
  return _model()


@nnx.jit
def _hidden(model, tokens, roles):
  return model.hidden(tokens, roles)


@nnx.jit
def _hidden_gist(model, tokens, roles):
  return model.hidden(tokens, roles, block_specials=False)


def _split_rows(rng, m, k, n):
  tokens = rng.integers(0, 50, size=m + n)
  return input_pipeline.insert_specials(tokens, m, SPECIALS[:k])


T_MAX = 24
_full_mask = jax.jit(models.full_mask)


def test_mask_on_random_splits():
  rng = np.random.default_rng(0)
  for _ in range(25):
    m, k, n = int(rng.integers(0, 8)), int(rng.integers(1, 4)), int(rng.integers(0, 8))
    _, roles = _split_rows(rng, m, k, n)
    roles = np.concatenate([roles, np.zeros(T_MAX - roles.size, np.int32)])  # one shape
    mask = np.asarray(_full_mask(jnp.asarray(roles)[None]))[0]
    t = roles.size
    for i in range(t):
      for j in range(t):
        ri, rj = roles[i], roles[j]
        want = j <= i and rj != models.PAD
        if ri == models.SUFFIX and rj == models.PREFIX:
          want = False
        if ri == models.SPECIAL and rj == models.SPECIAL and i != j:
          want = False
        assert mask[i, j] == want, (m, k, n, i, j)


def test_no_specials_is_causal_and_forward_equals_plain_lm(model):
  roles = jnp.full((2, 9), models.PREFIX)
  np.testing.assert_array_equal(
    np.asarray(models.full_mask(roles)), np.tril(np.ones((9, 9), bool))[None].repeat(2, 0)
  )
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 50, size=(2, 9)))
  np.testing.assert_array_equal(
    np.asarray(nnx.jit(lambda m, t, r: m.logits(t, r))(model, tokens, roles)),
    np.asarray(nnx.jit(lambda m, t: m.lm(t))(model, tokens)),
  )


def test_information_bottleneck(model):
  """Suffix outputs depend on the prefix only through the specials: with the specials' columns
  removed from suffix rows the suffix is invariant to the prefix; with them it is not."""
  rng = np.random.default_rng(2)
  seq_a, roles = _split_rows(rng, 6, 2, 5)
  seq_b = seq_a.copy()
  seq_b[:6] = rng.integers(0, 50, size=6)  # a different prefix
  tokens = jnp.asarray(np.stack([seq_a, seq_b]))
  roles = jnp.asarray(np.stack([roles, roles]))
  suffix = np.asarray(roles[0]) == models.SUFFIX
  h = np.asarray(_hidden(model, tokens, roles))
  assert np.abs(h[0, suffix] - h[1, suffix]).max() > 1e-4  # information does flow, via specials

  # Specials hidden from suffix rows: mask out (suffix row, special column) too.
  r = roles
  extra = ~((r[:, :, None] == models.SUFFIX) & (r[:, None, :] == models.SPECIAL))
  mask = models.gem_mask(r) & extra
  h2 = np.asarray(
    nnx.jit(lambda m, t, a: m.lm.hidden_states(t, attention_mask=a))(model, tokens, mask)
  )
  np.testing.assert_allclose(h2[0, suffix], h2[1, suffix], rtol=0, atol=1e-6)


def test_specials_are_independent(model):
  rng = np.random.default_rng(3)
  seq, roles = _split_rows(rng, 5, 3, 4)
  other = seq.copy()
  other[5] = 40  # special 0 carries another embedding
  tokens = jnp.asarray(np.stack([seq, other]))
  roles = jnp.asarray(np.stack([roles, roles]))
  h = np.asarray(_hidden(model, tokens, roles))
  np.testing.assert_allclose(h[0, 6:8], h[1, 6:8], rtol=0, atol=1e-6)  # specials 1 and 2
  assert np.abs(h[0, 5] - h[1, 5]).max() > 1e-4
  # Gist tokens (no special-special blocking, the ablation) do see each other.
  g = np.asarray(_hidden_gist(model, tokens, roles))
  assert np.abs(g[0, 6:8] - g[1, 6:8]).max() > 1e-4


def test_embedding_invariant_to_padding_and_batch_composition(model):
  layout = input_pipeline.Layout(seq_len=16, special_ids=SPECIALS[:2], pad_id=0)
  rng = np.random.default_rng(4)
  texts = [rng.integers(1, 50, size=n) for n in (3, 9, 14)]
  rows = [input_pipeline.end_appended(t, layout) for t in texts]

  @nnx.jit
  def emb(model, tokens, roles, pos):
    return {p: models.embed(model, tokens, roles, pos, p) for p in ('special', 'mean', 'last')}

  def run(rs, seq_len):
    tok = np.stack([r['tokens'][:seq_len] for r in rs])
    rol = np.stack([r['roles'][:seq_len] for r in rs])
    pos = np.stack([r['special_positions'] for r in rs])
    return jax.tree.map(np.asarray, emb(model, tok, rol, pos))

  full = run(rows, 16)
  for p, v in full.items():
    alone = run(rows[:1], 16)[p][0]  # batch composition
    np.testing.assert_allclose(alone, v[0], rtol=1e-5, atol=1e-6)
    shorter = run(rows[:2], 12)[p]  # less padding
    np.testing.assert_allclose(shorter, v[:2], rtol=1e-5, atol=1e-6)
    garbage = [dict(r, tokens=np.where(r['roles'] == 0, 49, r['tokens'])) for r in rows]
    np.testing.assert_allclose(run(garbage, 16)[p], v, rtol=1e-5, atol=1e-6)
  # Concatenation read-out: [B, k * d].
  pos = np.stack([r['special_positions'] for r in rows])
  h = nnx.jit(lambda m, t, r: m.hidden(t, r))(
    model, np.stack([r['tokens'] for r in rows]), np.stack([r['roles'] for r in rows])
  )
  cat = models.pool(h, None, jnp.asarray(pos), 'special_concat')
  assert cat.shape == (3, 2 * CFG.d_model)
  with pytest.raises(ValueError, match='pooling'):
    models.pool(h, jnp.zeros((3, 16)), None, 'max')


def test_added_specials_leave_the_base_logits_unchanged(tmp_path, monkeypatch):
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path / 'cache'))
  from common.models import loader  # noqa: PLC0415

  syn.write(tmp_path / 'llama.gguf', syn.LLAMA)
  base, cfg, tok = loader.load_pretrained(tmp_path / 'llama.gguf')
  ext, _, tok2 = loader.load_pretrained(tmp_path / 'llama.gguf')
  ids = models.add_special_tokens(ext, tok2, 2)
  assert ids == [cfg.vocab_size, cfg.vocab_size + 1]
  assert tok2.encode('<|gem_summary_1|>') == [ids[1]]
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, size=(2, 7)))
  before = np.asarray(nnx.jit(lambda m, t: m(t))(base, tokens))
  gem = models.GemModel(ext)
  roles = jnp.full(tokens.shape, models.PREFIX)
  after = np.asarray(nnx.jit(lambda m, t, r: m.logits(t, r))(gem, tokens, roles))
  np.testing.assert_allclose(after[..., : cfg.vocab_size], before[..., : cfg.vocab_size], atol=1e-5)


def test_suffix_depends_on_the_prefix_only_through_the_specials_kv(model):
  """Spec 4(d)2 with cached K/V: prefix B's cache with the specials' per-layer K/V taken from
  prefix A's run (prefix slots then evicted) gives the suffix exactly prefix A's suffix outputs."""
  from common.sampling import kv_cache  # noqa: PLC0415

  rng = np.random.default_rng(6)
  m, k, n = 5, 2, 4
  seq_a, roles = _split_rows(rng, m, k, n)
  seq_b = seq_a.copy()
  seq_b[:m] = rng.integers(0, 50, size=m)
  s = m + k + n
  head = jnp.asarray(roles[None, : m + k])
  head_mask = jnp.pad(models.gem_mask(head), ((0, 0), (0, 0), (0, s - m - k)), constant_values=True)

  @nnx.jit
  def prefill(model, tokens):
    cache = kv_cache.KVCache.init(CFG, 1, s)
    _, cache = model.lm.hidden_states(tokens, cache=cache, attention_mask=head_mask)
    return cache

  @nnx.jit
  def suffix(model, tokens, cache):
    return model.lm.hidden_states(tokens, cache=cache)[0]

  cache_a = prefill(model, jnp.asarray(seq_a[None, : m + k]))
  cache_b = prefill(model, jnp.asarray(seq_b[None, : m + k]))
  specials = slice(m, m + k)
  mixed = dataclasses.replace(
    cache_b,
    layers=tuple(
      dataclasses.replace(
        lb,
        kt=lb.kt.at[..., specials].set(la.kt[..., specials]),
        v=lb.v.at[:, :, specials].set(la.v[:, :, specials]),
      )
      for la, lb in zip(cache_a.layers, cache_b.layers, strict=True)
    ),
  )
  evict = jnp.zeros((1, s), bool).at[:, :m].set(True)  # suffix rows never read the prefix
  got = np.asarray(suffix(model, jnp.asarray(seq_b[None, m + k :]), mixed.evict(evict)))[0]
  full = np.asarray(
    _hidden(model, jnp.asarray(np.stack([seq_a, seq_b])), jnp.asarray(np.stack([roles, roles])))
  )
  np.testing.assert_allclose(got, full[0, m + k :], rtol=1e-4, atol=1e-5)
  assert np.abs(full[1, m + k :] - full[0, m + k :]).max() > 1e-4  # B's own specials differ
