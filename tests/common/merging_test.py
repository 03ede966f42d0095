"""common.merging against numpy references written here, the papers' must-holds, and mergekit.

The numpy references are independent transcriptions of the papers' rules (float64, loops over
models); mergekit (arcee-ai, the tool FuseChat's code forks) is compared where it is importable:
it pulls in torch and transformers, so it is not part of the pinned stack (see the last tests).
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import merging
from common import sharding
from common.adapters import core
from common.adapters import lora
from common.models import decoder

# ---------------------------------------------------------------------------------------------------
# Independent numpy references (per tensor; deltas: list of float64 arrays of one shape).


def np_trim(d, density):
  """Keep the floor(density * size) largest |d| (earlier position wins a tie)."""
  if density >= 1:
    return d.copy()
  k = int(density * d.size)
  flat = d.reshape(-1)
  keep = np.zeros(flat.size, bool)
  keep[np.argsort(-np.abs(flat), kind='stable')[:k]] = True
  return np.where(keep, flat, 0.0).reshape(d.shape)


def np_ties(deltas, density, weights):
  trimmed = [w * np_trim(d, density) for d, w in zip(deltas, weights, strict=True)]
  total = sum(trimmed)
  out = np.zeros_like(total)
  for idx in np.ndindex(total.shape):
    sign = 1.0 if total[idx] >= 0 else -1.0
    agree = [(t[idx], w) for t, w in zip(trimmed, weights, strict=True) if np.sign(t[idx]) == sign]
    if agree:
      out[idx] = sum(v for v, _ in agree) / sum(w for _, w in agree)
  return out


def np_sce(deltas, density, mask_deltas=False):
  """FuseChat's SCE per tensor (mask_deltas: arcee mergekit's variant)."""
  stack = np.stack(deltas)
  if density < 1:
    var = stack.var(axis=0)
    k = int(density * np.count_nonzero(var))
    flat = np.zeros(var.size, bool)
    flat[np.argsort(-var.reshape(-1), kind='stable')[:k]] = True
    select = flat.reshape(var.shape)
  else:
    select = np.ones(stack.shape[1:], bool)
  if mask_deltas:
    stack = np.where(select, stack, 0.0)
  energy = np.array([np.mean(np.where(select, d, 0.0) ** 2) for d in stack])
  weights = energy / energy.sum() if energy.sum() > 0 else np.full(len(stack), 1 / len(stack))
  majority = np.where(stack.sum(0) >= 0, 1.0, -1.0)
  num = np.zeros(stack.shape[1:])
  den = np.zeros(stack.shape[1:])
  for w, d in zip(weights, stack, strict=True):
    m = np.sign(d) == majority
    num += np.where(m, w * d, 0.0)
    den += np.where(m, w, 0.0)
  return num / np.where(den == 0, 1.0, den), weights


def _tree(seed, scale=1.0):
  """A small nested-dict pytree: matrices, a vector, a scalar and an integer counter."""
  rng = np.random.default_rng(seed)
  return {
    'dense': {'kernel': (scale * rng.normal(size=(4, 6))).astype(np.float32)},
    'norm': {'scale': (scale * rng.normal(size=(5,))).astype(np.float32)},
    'gain': np.float32(scale * rng.normal()),
    'step': np.int32(seed),
  }


def _models(n=3):
  base = _tree(0)
  models = [jax.tree.map(lambda b, d: b + d, base, _tree(10 + i, 0.1)) for i in range(n)]
  for m in models:
    m['step'] = np.int32(99)
  return base, models


PATHS = [('dense', 'kernel'), ('norm', 'scale'), ('gain',)]


def _leaf(tree, path):
  return np.asarray(tree[path[0]][path[1]] if len(path) == 2 else tree[path[0]], np.float64)


def _deltas(base, models, path):
  """([delta_i at path] float64, base at path)."""
  return [_leaf(m, path) - _leaf(base, path) for m in models], _leaf(base, path)


# ---------------------------------------------------------------------------------------------------
# Task arithmetic.


def test_task_arithmetic_matches_numpy_and_keeps_types():
  base, models = _models()
  merged = merging.task_arithmetic(base, models, scale=0.7, weights=[1.0, 0.5, 2.0])
  for path in PATHS:
    deltas, b = _deltas(base, models, path)
    ref = b + 0.7 * (deltas[0] + 0.5 * deltas[1] + 2.0 * deltas[2])
    np.testing.assert_allclose(_leaf(merged, path), ref, rtol=1e-5, atol=1e-6)
  assert merged['step'] == 0  # integer leaves keep the base's value
  assert merged['dense']['kernel'].dtype == np.float32
  assert isinstance(merged['dense']['kernel'], np.ndarray)


def test_task_arithmetic_of_one_model_at_scale_one_is_that_model():
  base, models = _models(1)
  merged = merging.task_arithmetic(base, models, scale=1.0)
  for path in PATHS:
    np.testing.assert_allclose(_leaf(merged, path), _leaf(models[0], path), rtol=1e-6, atol=1e-7)


def test_task_vectors():
  base, models = _models(2)
  tv = merging.task_vectors(base, models)
  for path in PATHS:
    deltas, _ = _deltas(base, models, path)
    for t, d in zip(tv, deltas, strict=True):
      np.testing.assert_allclose(_leaf(t, path), d, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# TIES.


@pytest.mark.parametrize('density', [0.2, 0.5, 1.0])
def test_ties_matches_numpy(density):
  base, models = _models()
  weights = [1.0, 0.3, 2.0]
  merged = merging.ties(base, models, density=density, scale=0.9, weights=weights)
  for path in PATHS:
    deltas, b = _deltas(base, models, path)
    ref = b + 0.9 * np_ties(deltas, density, weights)
    np.testing.assert_allclose(_leaf(merged, path), ref, rtol=1e-5, atol=1e-6)


def test_ties_steps_on_a_hand_example():
  d = jnp.asarray(
    [
      [3.0, -1.0, 0.5, 0.0],
      [-2.0, -4.0, 0.2, 1.0],
      [1.0, 2.0, -0.1, 0.0],
    ]
  )
  # density 0.5 keeps 2 of 4 per row: [3, -1], [-2, -4], [1, 2] (ties by position).
  np.testing.assert_array_equal(jax.vmap(lambda x: merging.trim(x, 0.5))(d)[2], [1, 2, 0, 0])
  out = merging.ties_delta(d, jnp.ones(3), density=0.5)
  # column 0: sum 2 > 0 -> mean of 3, 1 = 2; column 1: sum -3 -> mean of -1, -4; the rest 0.
  np.testing.assert_allclose(out, [2.0, -2.5, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------------
# DARE.


def test_dare_at_zero_drop_rate_is_task_arithmetic():
  base, models = _models()
  a = merging.dare(base, models, drop_rate=0.0, key=jax.random.key(0), weights=[1, 2, 3])
  b = merging.task_arithmetic(base, models, weights=[1, 2, 3])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_dare_drops_and_rescales_deterministically():
  base, models = _models(2)
  key = jax.random.key(3)
  a = merging.dare(base, models[:1], drop_rate=0.75, key=key)
  again = merging.dare(base, models[:1], drop_rate=0.75, key=key)
  other = merging.dare(base, models[:1], drop_rate=0.75, key=jax.random.key(4))
  d, b = _deltas(base, models[:1], PATHS[0])
  got = _leaf(a, PATHS[0]) - b
  dropped = np.isclose(got, 0.0, atol=1e-7)
  np.testing.assert_allclose(got[~dropped], d[0][~dropped] / 0.25, rtol=1e-4)
  assert 0 < dropped.sum() < dropped.size
  np.testing.assert_array_equal(_leaf(again, PATHS[0]), _leaf(a, PATHS[0]))
  assert not np.array_equal(_leaf(other, PATHS[0]), _leaf(a, PATHS[0]))
  # A tensor's mask depends on its own name only: merging a subtree gives the same values.
  sub = merging.dare(
    {'dense': base['dense']}, [{'dense': models[0]['dense']}], drop_rate=0.75, key=key
  )
  np.testing.assert_array_equal(sub['dense']['kernel'], a['dense']['kernel'])
  # ...and model 0's mask does not depend on how many models are merged (fold_in per model).
  pair = merging.dare(base, models, drop_rate=0.75, key=key, weights=[1.0, 0.0])
  np.testing.assert_array_equal(_leaf(pair, PATHS[0]), _leaf(a, PATHS[0]))


def test_dare_is_unbiased_over_keys():
  """E[DARE(delta)] = delta. Over K keys the mean of delta_hat at an entry has standard deviation
  |delta| sqrt(p / ((1 - p) K)); every entry must lie within 5 of those (K = 4000, p = 0.5: the
  chance that one of 24 entries exceeds 5 sigma is about 1e-5)."""
  p, k = 0.5, 4000
  delta = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)
  keys = jax.random.split(jax.random.key(0), k)
  draws = jax.vmap(lambda key: merging.dare_deltas(delta[None], key, drop_rate=p)[0])(keys)
  mean = np.asarray(draws, np.float64).mean(0)
  sigma = np.abs(np.asarray(delta)) * np.sqrt(p / ((1 - p) * k))
  assert np.all(np.abs(mean - np.asarray(delta)) <= 5 * sigma + 1e-7)
  kept = np.mean(np.asarray(draws) != 0)
  assert abs(kept - (1 - p)) < 0.01


# ---------------------------------------------------------------------------------------------------
# SCE (FuseChat).


@pytest.mark.parametrize('density', [0.3, 0.6, 1.0])
@pytest.mark.parametrize('mask_deltas', [False, True])
def test_sce_matches_numpy(density, mask_deltas):
  base, models = _models()
  merged = merging.sce(base, models, density=density, mask_deltas=mask_deltas)
  for path in PATHS:
    deltas, b = _deltas(base, models, path)
    ref, _ = np_sce(deltas, density, mask_deltas)
    np.testing.assert_allclose(_leaf(merged, path), b + ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('density', [0.25, 1.0])
def test_sce_weights_sum_to_one(density):
  d = jnp.asarray(np.random.default_rng(1).normal(size=(3, 8, 5)), jnp.float32)
  w = merging.sce_weights(d, density)
  np.testing.assert_allclose(jnp.sum(w), 1.0, rtol=1e-6)
  np.testing.assert_allclose(w, np_sce(list(np.asarray(d, np.float64)), density)[1], rtol=1e-5)
  zero = merging.sce_weights(jnp.zeros((4, 3)), density)
  np.testing.assert_allclose(zero, np.full(4, 0.25))


@pytest.mark.parametrize('density', [0.3, 1.0])
def test_sce_of_identical_deltas_is_base_plus_delta(density):
  base = _tree(0)
  delta = _tree(1, 0.1)
  model = jax.tree.map(lambda b, d: b + d, base, delta)
  merged = merging.sce(base, [model, model, model], density=density)
  for path in PATHS:
    np.testing.assert_allclose(_leaf(merged, path), _leaf(model, path), rtol=1e-6, atol=1e-7)


def test_sce_density_one_disables_selection():
  d = jnp.asarray(np.random.default_rng(2).normal(size=(3, 7)), jnp.float32)
  assert bool(jnp.all(merging.sce_select(d, 1.0)))
  energy = np.mean(np.asarray(d, np.float64) ** 2, axis=1)
  np.testing.assert_allclose(merging.sce_weights(d, 1.0), energy / energy.sum(), rtol=1e-5)
  # Selection at density < 1 keeps floor(density * #nonzero-variance) positions.
  assert int(jnp.sum(merging.sce_select(d, 0.5))) == 3


def test_sce_all_positive_deltas_erase_nothing():
  d = jnp.asarray(np.random.default_rng(3).uniform(0.01, 1.0, size=(4, 5, 3)), jnp.float32)
  assert bool(jnp.all(merging.sce_erase(d)))
  mixed = merging.sce_delta(d, density=0.5)
  w = merging.sce_weights(d, 0.5)
  np.testing.assert_allclose(mixed, jnp.tensordot(w, d, axes=1), rtol=1e-5)  # weights sum to 1
  # A minority sign is erased: column 0 sums positive, so model 1's negative entry goes.
  e = merging.sce_erase(jnp.asarray([[1.0, -1.0], [-0.5, -1.0], [2.0, 1.0]]))
  np.testing.assert_array_equal(e, [[True, True], [False, True], [True, False]])


# ---------------------------------------------------------------------------------------------------
# Pytree types, dtypes and errors.


def test_nnx_state_and_dtypes_round_trip():
  rngs = [nnx.Rngs(i) for i in range(3)]
  with sharding.unsharded():
    mods = [nnx.Linear(4, 3, rngs=r) for r in rngs]
  states = [nnx.state(m, nnx.Param) for m in mods]
  as_dicts = [jax.tree.map(np.asarray, nnx.to_pure_dict(s)) for s in states]
  ref = merging.ties(as_dicts[0], as_dicts[1:], density=0.5)
  merged = merging.ties(states[0], states[1:], density=0.5)
  assert isinstance(merged, nnx.State)
  assert isinstance(merged['kernel'], nnx.Param)
  nnx.update(mods[0], merged)  # loads straight back into a model
  np.testing.assert_allclose(mods[0].kernel[...], ref['kernel'], rtol=1e-6)
  # DARE's masks follow the tensor's name, whatever the container.
  key = jax.random.key(1)
  from_state = merging.dare(states[1], states[2:], drop_rate=0.5, key=key)
  from_dict = merging.dare(as_dicts[1], as_dicts[2:], drop_rate=0.5, key=key)
  np.testing.assert_array_equal(from_state['kernel'][...], from_dict['kernel'])
  bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), as_dicts)
  out = merging.sce(bf16[0], bf16[1:], density=0.5)
  assert out['kernel'].dtype == jnp.bfloat16


def test_mismatches_and_bad_settings_are_one_line_errors():
  base, models = _models(2)
  with pytest.raises(merging.MergeError, match='another structure.*extra'):
    merging.task_arithmetic(base, [{**models[0], 'extra': np.zeros(2)}])
  wrong = {**models[0], 'norm': {'scale': np.zeros(7, np.float32)}}
  with pytest.raises(merging.MergeError, match=r'norm/scale: model 0 has shape \(7,\)'):
    merging.task_arithmetic(base, [wrong])
  with pytest.raises(merging.MergeError, match='at least one model'):
    merging.ties(base, [], density=0.5)
  with pytest.raises(merging.MergeError, match=r'density must lie in \(0, 1\]'):
    merging.ties(base, models, density=0.0)
  with pytest.raises(merging.MergeError, match=r'drop_rate must lie in \[0, 1\)'):
    merging.dare(base, models, drop_rate=1.0, key=jax.random.key(0))
  with pytest.raises(merging.MergeError, match='3 weights for 2 models'):
    merging.task_arithmetic(base, models, weights=[1, 2, 3])


# ---------------------------------------------------------------------------------------------------
# Adapted models: LoRA folded into the base, then merged.

CFG = decoder.DecoderConfig(
  vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
MLP = r'layers/\d+/mlp/(gate|up|down)_proj'


def _lora_model(seed):
  with sharding.unsharded():
    model = decoder.Decoder(CFG, rngs=nnx.Rngs(0))  # every fine-tune starts from the same base
    core.adapt(model, MLP, lora.factory(rank=2, rngs=nnx.Rngs(seed)))
  for i, layer in enumerate(core.adapted(model).values()):
    b = layer.adapter.b
    b[...] = 0.1 * jax.random.normal(jax.random.key(seed * 100 + i), b[...].shape)
  return model


def test_merged_params_fold_lora_into_the_plain_layout():
  with sharding.unsharded():
    base_model = decoder.Decoder(CFG, rngs=nnx.Rngs(0))
    plain = decoder.Decoder(CFG, rngs=nnx.Rngs(7))
  base = merging.merged_params(base_model)
  assert jax.tree.structure(base) == jax.tree.structure(
    nnx.to_pure_dict(nnx.state(plain, nnx.Param))
  )
  adapted = _lora_model(1)
  params = merging.merged_params(adapted)
  assert jax.tree.structure(params) == jax.tree.structure(base)
  # Loaded into a plain model, the folded weights compute what the adapted model computes.
  state = nnx.state(plain, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(plain, state)
  tokens = np.arange(12, dtype=np.int32)[None] % 64
  np.testing.assert_allclose(plain(tokens), adapted(tokens), rtol=1e-5, atol=1e-5)
  # Only the adapted kernels moved, by exactly the adapter's delta; the model is untouched.
  layer = core.adapted(adapted)['layers/0/mlp/up_proj']
  expected = np.asarray(layer.base.kernel[...]) + np.asarray(layer.adapter.delta_kernel())
  np.testing.assert_allclose(params['layers'][0]['mlp']['up_proj']['kernel'], expected, rtol=1e-6)
  np.testing.assert_array_equal(params['embed']['embedding'], base['embed']['embedding'])
  assert not layer.merged
  # Already-merged adapters are not added twice.
  core.merge(adapted)
  again = merging.merged_params(adapted)
  for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(params), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_merging_adapter_fine_tunes():
  """Task arithmetic of two LoRA fine-tunes = base + both low-rank deltas; TIES/SCE/DARE run on
  the same trees and move only the adapted kernels."""
  with sharding.unsharded():
    base = merging.merged_params(decoder.Decoder(CFG, rngs=nnx.Rngs(0)))
  a, b = _lora_model(1), _lora_model(2)
  experts = [merging.merged_params(a), merging.merged_params(b)]
  ta = merging.task_arithmetic(base, experts)
  key = 'layers/1/mlp/down_proj'
  expected = (
    np.asarray(base['layers'][1]['mlp']['down_proj']['kernel'])
    + np.asarray(core.adapted(a)[key].adapter.delta_kernel())
    + np.asarray(core.adapted(b)[key].adapter.delta_kernel())
  )
  np.testing.assert_allclose(ta['layers'][1]['mlp']['down_proj']['kernel'], expected, atol=1e-6)
  for merged in (
    merging.ties(base, experts, density=0.3),
    merging.sce(base, experts, density=0.3),
    merging.dare(base, experts, drop_rate=0.5, key=jax.random.key(0)),
  ):
    np.testing.assert_array_equal(
      merged['layers'][0]['attn']['q_proj']['kernel'], base['layers'][0]['attn']['q_proj']['kernel']
    )
    assert not np.allclose(
      merged['layers'][0]['mlp']['up_proj']['kernel'], base['layers'][0]['mlp']['up_proj']['kernel']
    )


# ---------------------------------------------------------------------------------------------------
# mergekit (arcee-ai), when importable. It needs torch + transformers, which change no pinned
# package but are not in requirements.txt; install beside the stack to run these:
#   pip install --no-deps --target /tmp/mk_peers mergekit==0.1.5 torch==2.13.0 \
#     transformers==5.23.0 peft immutables accelerate==1.15.0
#   PYTHONPATH=/tmp/mk_peers python -m pytest -n 0 tests/common/merging_test.py -k mergekit


def _mergekit_group(base, models):
  torch = pytest.importorskip('torch')
  base_mod = pytest.importorskip('mergekit.merge_methods.base')
  tensors = [torch.tensor(np.asarray(x, np.float64)) for x in (base, *models)]
  return base_mod.TensorGroup.from_tensors(tensors, base_index=0)


@pytest.mark.parametrize('density', [0.4, 1.0])
def test_sce_matches_mergekit(density):
  sce_mod = pytest.importorskip('mergekit.merge_methods.sce')
  rng = np.random.default_rng(7)
  base = rng.normal(size=(6, 5))
  models = [base + rng.normal(size=(6, 5)) for _ in range(3)]
  group = _mergekit_group(base, models)
  theirs = sce_mod.sce_merge.merge_group(group, select_topk=density, int8_mask=False).numpy()
  tree = lambda x: {'w': np.asarray(x, np.float32)}  # noqa: E731
  ours = merging.sce(tree(base), [tree(m) for m in models], density=density, mask_deltas=True)
  np.testing.assert_allclose(ours['w'], theirs, rtol=1e-5, atol=1e-5)
  if density == 1.0:  # without selection, FuseChat's released rule and mergekit's coincide
    fusechat = merging.sce(tree(base), [tree(m) for m in models], density=density)
    np.testing.assert_allclose(fusechat['w'], theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('method', ['ties', 'task_arithmetic'])
def test_ties_and_task_arithmetic_match_mergekit(method):
  registry = pytest.importorskip('mergekit.merge_methods.registry')
  rng = np.random.default_rng(8)
  base = rng.normal(size=(8, 5))
  models = [base + rng.normal(size=(8, 5)) for _ in range(3)]
  group = _mergekit_group(base, models)
  weights = {1: 1.0, 2: 0.5, 3: 2.0}
  kit = registry.get(method)
  params = {
    'weight': weights,
    'density': dict.fromkeys(weights, 0.4),
    'normalize': method == 'ties',
    'rescale': False,
    'int8_mask': False,
    'lambda': 0.8,
  }
  theirs = kit.merge_group(group, **params).numpy()
  tree = lambda x: {'w': np.asarray(x, np.float32)}  # noqa: E731
  w = list(weights.values())
  if method == 'ties':
    ours = merging.ties(tree(base), [tree(m) for m in models], density=0.4, scale=0.8, weights=w)
  else:
    ours = merging.task_arithmetic(tree(base), [tree(m) for m in models], scale=0.8, weights=w)
  np.testing.assert_allclose(ours['w'], theirs, rtol=1e-5, atol=1e-5)
