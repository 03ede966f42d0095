"""S'MoRE, MixLoRA and HydraLoRA: the Must-hold list of issue 7 (core.md Sec. 3 (d))."""

# ruff: noqa: E741 - `l` is the paper's layer index.

import itertools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import sharding
from common.adapters import core
from common.adapters import lora
from projects.smore import losses
from projects.smore import models

D_IN, D_OUT = 12, 10


def _smore(spec, seed=0, d_in=D_IN, d_out=D_OUT, **kw):
  with sharding.unsharded():
    return models.SMoRE(d_in, d_out, spec, rngs=nnx.Rngs(seed), **kw)


def _spec(**kw):
  base = dict(experts=(4, 4), ranks=(3, 2), fanouts=(2, 2), gate_dim=8, down_dim=6, init='normal')
  base.update(kw)
  return models.SMoRESpec(**base)


def _x(n=7, d=D_IN, seed=1):
  return jax.random.normal(jax.random.key(seed), (n, d))


def _leaves(module, names):
  """Scalars in the AdapterParams whose attribute name is in `names`."""
  total = 0
  for path, v in nnx.to_flat_state(nnx.state(module, core.AdapterParam)):
    if any(str(p) in names for p in path):
      total += v.get_value().size
  return total


# ---------------------------------------------------------------------------------------------------
# Dimensions and parameter counts.


@pytest.mark.parametrize(
  'kw',
  [
    dict(),
    dict(experts=(4, 2, 3), ranks=(2, 3, 1), fanouts=(2, 1, 2)),
    dict(experts=(2,), ranks=(5,), fanouts=(1,)),
    dict(gate='noisy_topk'),
    dict(gate='dense'),
    dict(experts=(4, 4), ranks=(2, 2), shared_pool=True),
    dict(experts=(4, 4, 4), ranks=(2, 2, 2), fanouts=(2, 2, 2), shared_pool=True),
  ],
)
def test_dims_and_exact_parameter_count_match_the_real_leaves(kw):
  spec = _spec(**kw)
  m = _smore(spec)
  d = spec.dims
  L = spec.num_layers
  assert d[0] == 0
  if not spec.shared_pool:
    assert all(d[l + 1] == d[l] + spec.experts[l] * spec.ranks[l] for l in range(L))
    assert d[L] == sum(s * r for s, r in zip(spec.experts, spec.ranks, strict=True))
    for l in range(L):
      assert m.a[l].get_value().shape == (spec.experts[l], D_IN, spec.ranks[l])
      assert m.b[l].get_value().shape == (spec.experts[l], spec.ranks[l], d[l + 1])
  for l in range(1, L):
    assert m.w[l - 1].get_value().shape == (d[l], d[l + 1])
  assert m.proj.get_value().shape == (d[L], D_OUT)
  counts = models.smore_num_params(spec, D_IN, D_OUT)
  assert core.count_trainable(m) == counts['total']
  assert _leaves(m, {'a', 'b', 'w', 'proj'}) == counts['core']
  assert _leaves(m, {'a_bias', 'b_bias', 'w_bias', 'proj_bias'}) == counts['bias']
  assert _leaves(m, {'down', 'down_bias', 'gates'}) == counts['router']


@pytest.mark.parametrize(
  'experts,ranks', [((4, 4), (8, 8)), ((2, 2), (4, 4)), ((4, 2, 3), (2, 3, 1))]
)
def test_core_count_is_lora_of_rank_dL_plus_sum_of_squares(experts, ranks):
  """Eq. 8-9: with d_in = d_out = d, core = 2 d d_L + sum_{l=1..L} d_l^2."""
  spec = models.SMoRESpec(experts=experts, ranks=ranks, fanouts=(1,) * len(experts))
  dim = 64
  d = spec.dims
  core_n = models.smore_num_params(spec, dim, dim)['core']
  assert core_n == lora.num_params(dim, dim, d[-1]) + sum(x * x for x in d[1:])
  # The equivalent MixLoRA (sum_l s_l experts of rank r, no router) has the same 2 d d_L core.
  if len(set(ranks)) == 1:
    mix_core = sum(experts) * ranks[0] * 2 * dim
    assert core_n - mix_core == sum(x * x for x in d[1:])


@pytest.mark.parametrize(
  'method,kw',
  [
    ('lora', dict(rank=5)),
    ('mixlora', dict(experts=4, rank=3, top_k=2)),
    ('mixlora', dict(experts=4, rank=3, top_k=2, gate='noisy_topk')),
    ('hydralora', dict(experts=4, rank=3)),
    ('smore', dict(spec=_spec())),
  ],
)
def test_closed_form_counts_of_every_method(method, kw):
  with sharding.unsharded():
    lin = nnx.Linear(D_IN, D_OUT, rngs=nnx.Rngs(0))
    adapter = models.factory(method, nnx.Rngs(1), **kw)('x', lin)
  assert core.count_trainable(adapter) == models.num_params(method, D_IN, D_OUT, **kw)


# ---------------------------------------------------------------------------------------------------
# Initialisations.


@pytest.mark.parametrize('gate', models.GATES)
def test_w_final_zero_outputs_exactly_zero(gate):
  m = _smore(_spec(init='w_final_zero', gate=gate))
  np.testing.assert_array_equal(m(_x()), 0.0)


def _random_proj(m, seed=5):
  m.proj[...] = jax.random.normal(jax.random.key(seed), m.proj[...].shape)


def test_eq_1_layer_two_layers_equal_the_one_layer_mixture():
  """B_l^e writes x A_l^e into block e, W_1 = [0, I]: x_2 is a 1-layer MoE over both layers."""
  spec = _spec(init='eq_1_layer', activation='identity', ranks=(3, 2))
  m = _smore(spec)
  _random_proj(m)
  x = _x(9)
  routing, _ = m.route(x)
  out = np.asarray(m(x))
  i1, w1 = np.asarray(routing.idx[1]), np.asarray(routing.weights[1])  # [N, f1]
  i0, w0 = np.asarray(routing.idx[0]), np.asarray(routing.weights[0])  # [N, f1, f0]
  a0, a1 = np.asarray(m.a[0][...]), np.asarray(m.a[1][...])
  proj = np.asarray(m.proj[...])
  (s0, s1), (r0, r1) = spec.experts, spec.ranks
  d1 = s0 * r0
  xn = np.asarray(x)
  for t in range(xn.shape[0]):
    # Effective 1-layer weights: alpha_m for layer-1 expert m, sum_m alpha_m alpha_{m,c} for c.
    beta1, beta0 = np.zeros(s1), np.zeros(s0)
    for j in range(i1.shape[1]):
      beta1[i1[t, j]] += w1[t, j]
      for k in range(i0.shape[2]):
        beta0[i0[t, j, k]] += w1[t, j] * w0[t, j, k]
    ref = sum(beta1[e] * (xn[t] @ a1[e]) @ proj[e * r1 : (e + 1) * r1] for e in range(s1))
    ref += sum(
      beta0[c] * (xn[t] @ a0[c]) @ proj[s1 * r1 + c * r0 : s1 * r1 + (c + 1) * r0]
      for c in range(s0)
    )
    assert spec.dims[2] == s1 * r1 + d1
    np.testing.assert_allclose(out[t], ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Activation: identity collapses to the linear (MoMOR) mixture; tanh tells trees apart.


def _manual_routing(idx1, idx0, n):
  """A fixed 2-layer routing with uniform weights for n tokens (the paper's Fig. 3 trees)."""
  i1 = jnp.broadcast_to(jnp.asarray(idx1, jnp.int32), (n, len(idx1)))
  i0 = jnp.broadcast_to(jnp.asarray(idx0, jnp.int32), (n, *np.shape(idx0)))
  return models.Routing(
    idx=[i0, i1],
    weights=[jnp.full(i0.shape, 1.0 / i0.shape[-1]), jnp.full(i1.shape, 1.0 / i1.shape[-1])],
    probs=[None, None],
  )


def test_identity_activation_is_the_linear_mixture_formula():
  m = _smore(_spec(activation='identity'))
  x = _x(5)
  routing, _ = m.route(x)
  got = np.asarray(m.hidden(x, routing))
  r0 = np.asarray(m.residual_all(x, 0))  # [N, s0, d1]
  r1 = np.asarray(m.residual_all(x, 1))  # [N, s1, d2]
  w1m, w1b = np.asarray(m.w[0][...]), np.asarray(m.w_bias[0][...])
  i1, a1 = np.asarray(routing.idx[1]), np.asarray(routing.weights[1])
  i0, a0 = np.asarray(routing.idx[0]), np.asarray(routing.weights[0])
  for t in range(x.shape[0]):
    ref = 0.0
    for j in range(i1.shape[1]):
      child = sum(a0[t, j, k] * r0[t, i0[t, j, k]] for k in range(i0.shape[2]))
      ref = ref + a1[t, j] * (r1[t, i1[t, j]] + child @ w1m + w1b)
    np.testing.assert_allclose(got[t], ref, rtol=1e-5, atol=1e-5)


def test_non_isomorphic_trees_agree_only_with_identity_activation():
  x = _x(4)
  tree_b = _manual_routing([0, 1], [[0, 1], [2, 3]], 4)
  tree_c = _manual_routing([0, 1], [[0, 2], [1, 3]], 4)
  lin = _smore(_spec(activation='identity'))
  np.testing.assert_allclose(lin.hidden(x, tree_b), lin.hidden(x, tree_c), rtol=1e-5, atol=1e-5)
  nonlin = _smore(_spec(activation='tanh'))
  hb, hc = np.asarray(nonlin.hidden(x, tree_b)), np.asarray(nonlin.hidden(x, tree_c))
  assert np.abs(hb - hc).max() > 1e-3 * np.abs(hb).max()


# ---------------------------------------------------------------------------------------------------
# Routing.


@pytest.mark.parametrize('gate', ['switch', 'noisy_topk'])
def test_topk_routing_shapes_weights_and_distinct_children(gate):
  spec = _spec(experts=(4, 3, 5), ranks=(1, 1, 1), fanouts=(2, 1, 3), gate=gate)
  m = _smore(spec)
  with core.context(key=jax.random.key(0), train=True):
    routing, _ = m.route(_x(6))
  for l, shape in enumerate([(6, 3, 1, 2), (6, 3, 1), (6, 3)]):
    assert routing.idx[l].shape == shape
    np.testing.assert_allclose(np.asarray(routing.weights[l]).sum(-1), 1.0, rtol=1e-6)
    idx = np.asarray(routing.idx[l]).reshape(-1, shape[-1])
    assert all(len(set(row)) == len(row) for row in idx)  # top-k picks distinct children
    assert idx.min() >= 0 and idx.max() < spec.experts[l]


def test_dense_gate_selects_every_expert_with_softmax_weights():
  m = _smore(_spec(gate='dense', experts=(3, 4), ranks=(1, 1)))
  routing, bal = m.route(_x(5))
  assert routing.idx[1].shape == (5, 4) and routing.idx[0].shape == (5, 4, 3)
  np.testing.assert_array_equal(routing.idx[0][0, 0], [0, 1, 2])
  np.testing.assert_allclose(routing.weights[1], routing.probs[1], rtol=1e-6)
  assert float(bal) == 0.0


def test_children_follow_their_parents_keys():
  """Swap two top-layer keys: the parents' ranks swap, and each child choice goes with its key."""
  spec = _spec(experts=(4, 2), ranks=(1, 1), fanouts=(2, 2))
  m = _smore(spec)
  x = _x(8)
  before, _ = m.route(x)
  keys = m.gates[1].keys
  keys[...] = keys[...][jnp.array([1, 0])]
  after, _ = m.route(x)
  top_b, top_a = np.asarray(before.idx[1]), np.asarray(after.idx[1])
  np.testing.assert_array_equal(top_a, 1 - top_b)  # expert 0 now scores as 1 did, and vice versa
  # The child set chosen under the path holding key k is the same before and after.
  for t in range(8):
    for j in range(2):
      np.testing.assert_array_equal(after.idx[0][t, j], before.idx[0][t, j])
  # ... and the children do depend on the key: with random keys the two parents disagree somewhere.
  assert any(
    set(np.asarray(before.idx[0][t, 0])) != set(np.asarray(before.idx[0][t, 1])) for t in range(8)
  )


@pytest.mark.parametrize('gate', models.GATES)
@pytest.mark.parametrize('shared', [False, True])
@pytest.mark.parametrize('position', models.POSITIONS)
def test_compute_then_gather_equals_gather_then_compute(gate, shared, position):
  spec = _spec(gate=gate, shared_pool=shared, position=position, ranks=(2, 2))
  m = _smore(spec)
  x = _x(6).reshape(2, 3, D_IN)
  with core.context(key=jax.random.key(2), train=True):
    fast = m(x)
    m.forward_mode = 'tree'
    slow = m(x)
  np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Load balance.


def test_balance_loss_uniform_collapsed_and_masked():
  s, k, n, w = 4, 2, 8, 1e-2
  probs = jnp.full((n, s), 1.0 / s)
  idx = jnp.array([[i % s, (i + 1) % s] for i in range(n)])  # every expert chosen n*k/s times
  np.testing.assert_allclose(losses.balance_loss(probs, idx, None, w), w * k, rtol=1e-6)
  collapsed_p = jnp.tile(jnp.array([0.5, 0.5, 0.0, 0.0]), (n, 1))
  collapsed_i = jnp.tile(jnp.array([0, 1]), (n, 1))
  np.testing.assert_allclose(
    losses.balance_loss(collapsed_p, collapsed_i, None, w), w * s, rtol=1e-6
  )
  # Masked rows do not count: uniform real rows plus collapsed padding still give w * k.
  mask = jnp.arange(2 * n) < n
  mixed_p = jnp.concatenate([probs, collapsed_p])
  mixed_i = jnp.concatenate([idx, collapsed_i])
  np.testing.assert_allclose(losses.balance_loss(mixed_p, mixed_i, mask, w), w * k, rtol=1e-6)
  assert float(losses.balance_loss(mixed_p, mixed_i, None, w)) > w * k


def test_adapter_balance_loss_respects_the_context_mask():
  m = _smore(_spec())
  x = _x(6).reshape(2, 3, D_IN)
  mask = jnp.array([[True, True, False], [True, False, False]])
  with core.context(token_mask=mask):
    m(x)
  masked = float(m.balance[...])
  x2 = x.at[0, 2].set(100.0).at[1, 1:].set(-50.0)  # change only the padding tokens
  with core.context(token_mask=mask):
    m(x2)
  np.testing.assert_allclose(float(m.balance[...]), masked, rtol=1e-6)
  m(x2)
  assert abs(float(m.balance[...]) - masked) > 1e-6


# ---------------------------------------------------------------------------------------------------
# MixLoRA and HydraLoRA against per-token loops.


def test_mixlora_matches_a_per_token_loop():
  with sharding.unsharded():
    m = models.MixLoRA(D_IN, D_OUT, experts=4, rank=3, top_k=2, rngs=nnx.Rngs(0))
  m.b[...] = jax.random.normal(jax.random.key(3), m.b[...].shape)
  x = np.asarray(_x(5))
  out = np.asarray(m(x))
  a, b, router = (np.asarray(v[...]) for v in (m.a, m.b, m.router))
  for t in range(5):
    p = np.exp(x[t] @ router)
    p /= p.sum()
    top = np.argsort(-p)[:2]
    w = p[top] / p[top].sum()
    ref = sum(wi * (x[t] @ a[e]) @ b[e] for wi, e in zip(w, top, strict=True)) * m.scaling
    np.testing.assert_allclose(out[t], ref, rtol=1e-5, atol=1e-5)
  assert float(m.balance[...]) > 0


def test_hydralora_matches_a_per_token_loop():
  with sharding.unsharded():
    m = models.HydraLoRA(D_IN, D_OUT, heads=3, rank=2, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(m(_x()), 0.0)  # zero B heads: exact identity at init
  m.b[...] = jax.random.normal(jax.random.key(3), m.b[...].shape)
  x = np.asarray(_x(4))
  out = np.asarray(m(x))
  a, b, router = (np.asarray(v[...]) for v in (m.a, m.b, m.router))
  for t in range(4):
    p = np.exp(x[t] @ router)
    p /= p.sum()
    ref = sum(p[e] * (x[t] @ a) @ b[e] for e in range(3)) * m.scaling
    np.testing.assert_allclose(out[t], ref, rtol=1e-5, atol=1e-5)


def test_bad_specs_are_clear_errors():
  with pytest.raises(core.AdapterError, match='equal-length'):
    models.SMoRESpec(experts=(4, 4), ranks=(2,), fanouts=(2, 2))
  with pytest.raises(core.AdapterError, match='1 <= f <= s'):
    models.SMoRESpec(experts=(2,), ranks=(2,), fanouts=(3,))
  with pytest.raises(core.AdapterError, match='unknown gate'):
    models.SMoRESpec(experts=(2,), ranks=(2,), fanouts=(1,), gate='hash')
  with pytest.raises(core.AdapterError, match='one pool'):
    models.SMoRESpec(experts=(4, 2), ranks=(2, 2), fanouts=(1, 1), shared_pool=True)


def test_gradients_reach_every_trainable_leaf():
  m = _smore(_spec(init='normal'))
  x = _x(8)

  def loss(mod):
    with core.context():
      y = mod(x)
    return jnp.sum(y**2) + core.aux_loss(mod)

  grads = nnx.grad(loss)(m)
  flat = nnx.to_flat_state(grads)
  assert flat
  zero = [p for p, g in flat if not np.any(np.asarray(g.get_value()))]
  # Keys of never-selected experts can get zero gradient; everything else must move.
  assert all('keys' in map(str, p) for p in zero), zero


def test_flatten_helper_sees_all_leaves():
  m = _smore(_spec())
  names = {str(p[0]) for p, _ in nnx.to_flat_state(nnx.state(m, core.AdapterParam))}
  assert names == set(
    itertools.chain(
      [
        'down',
        'down_bias',
        'gates',
        'a',
        'a_bias',
        'b',
        'b_bias',
        'w',
        'w_bias',
        'proj',
        'proj_bias',
      ]
    )
  )


def test_recorded_routing_and_tree_labels():
  from projects.smore import analysis  # noqa: PLC0415

  m = _smore(_spec(experts=(4, 4), ranks=(1, 1), fanouts=(2, 2)))
  x = _x(6).reshape(2, 3, D_IN)
  record = {}
  m.name = 'adapter'
  with core.context(record=record):
    m(x)
  routing = record['adapter']
  assert routing.idx[1].shape == (2, 3, 2) and routing.idx[0].shape == (2, 3, 2, 2)
  label = analysis.tree_label(routing, 1, 2)
  top = sorted(int(e) for e in routing.idx[1][1, 2])
  assert sorted(int(p.split('{')[0]) for p in label.split()) == top
  batch = {'loss_mask': np.ones((2, 3)), 'task': np.array([0, 1])}
  usage = analysis.usage_by_task(routing, batch, 2, (4, 4))
  # Every token uses exactly 2 distinct top experts, so each task's top row sums to 2.
  np.testing.assert_allclose(usage[1].sum(1), 2.0)
  assert np.all((usage[0].sum(1) >= 2) & (usage[0].sum(1) <= 4))


# ---------------------------------------------------------------------------------------------------
# The fast paths equal the library operations they replace.


@pytest.mark.parametrize('k', [1, 2, 3, 4, 6])
def test_top_k_equals_lax_top_k_including_ties_and_gradients(k):
  v = jax.random.normal(jax.random.key(0), (5, 3, 6))
  v = v.at[0, 0, 1].set(v[0, 0, 4]).at[1, 2, :].set(0.5)  # ties: the lower index comes first
  got_v, got_i = models.top_k(v, k)
  ref_v, ref_i = jax.lax.top_k(v, k)
  np.testing.assert_array_equal(got_i, ref_i)
  np.testing.assert_array_equal(got_v, ref_v)
  cot = jax.random.normal(jax.random.key(1), ref_v.shape)
  g = jax.grad(lambda x: jnp.sum(models.top_k(x, k)[0] * cot))(v)
  g_ref = jax.grad(lambda x: jnp.sum(jax.lax.top_k(x, k)[0] * cot))(v)
  np.testing.assert_array_equal(g, g_ref)


@pytest.mark.parametrize('s', [3, models.SMALL_S + 2])  # the masked-sum path and the gather path
def test_pick_equals_take_with_its_gradient(s):
  table = jax.random.normal(jax.random.key(0), (4, s, 5))
  idx = jax.random.randint(jax.random.key(1), (4, 2, 3), 0, s)
  got = models.pick(table, idx, axis=1)
  ref = jnp.stack([table[n][idx[n]] for n in range(4)])
  np.testing.assert_array_equal(got, ref)
  keys = table[0]
  np.testing.assert_array_equal(models.pick(keys, idx, axis=0), keys[idx])
  cot = jax.random.normal(jax.random.key(2), ref.shape)
  g = jax.grad(lambda t: jnp.sum(models.pick(t, idx, axis=1) * cot))(table)
  g_ref = jax.grad(lambda t: jnp.sum(jnp.stack([t[n][idx[n]] for n in range(4)]) * cot))(table)
  np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  'kw',
  [
    dict(),
    dict(experts=(4, 2, 3), ranks=(2, 3, 1), fanouts=(2, 1, 2)),
    dict(experts=(2,), ranks=(5,), fanouts=(1,)),
  ],
)
def test_residual_pools_of_the_stack_equal_each_layer_alone(kw):
  spec = _spec(**kw)
  m = _smore(spec)
  for l in range(spec.num_layers):
    m.a_bias[l][...] = jax.random.normal(jax.random.key(10 + l), m.a_bias[l][...].shape)
    m.b_bias[l][...] = jax.random.normal(jax.random.key(20 + l), m.b_bias[l][...].shape)
  x = _x(7)
  pools = m.residual_pools(x)
  assert len(pools) == spec.num_layers
  for l, pool in enumerate(pools):
    np.testing.assert_allclose(pool, m.residual_all(x, l), rtol=1e-5, atol=1e-5)
