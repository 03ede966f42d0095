"""Adapter initialisation inside a trace: the same keys as nnx.Rngs, and work linear in the adapters.

train_loop.abstract_state / init_state build the adapted model inside jax.eval_shape / jax.jit. With
an nnx.Rngs stream each draw wrote a traced count whose error-message path walked every equation
traced so far, so building N adapters cost O(N^2) (minutes for SmolLM2's 90 S'MoRE adapters).
These tests count Python calls (deterministic), never time.
"""

import cProfile
import pstats

from flax import nnx
import jax
import ml_collections
import numpy as np
import pytest

from common.adapters import core
from experiments.smore.configs import base
from projects.smore import models
from projects.smore import train

D = 16


class _Stack(nnx.Module):
  def __init__(self, n: int, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(D, D, rngs=rngs) for _ in range(n)])


def _key_data(keys):
  return [np.asarray(jax.random.key_data(k)) for k in keys]


@pytest.mark.parametrize('traced', [False, True])
def test_key_stream_draws_the_keys_of_nnx_rngs(traced):
  def draws(key):
    rngs, stream = nnx.Rngs(params=key), models.KeyStream(key)
    return [rngs.params() for _ in range(6)], [stream.params() for _ in range(6)]

  key = jax.random.fold_in(jax.random.key(7), 0xADA)
  old, new = jax.jit(draws)(key) if traced else draws(key)
  for a, b in zip(_key_data(old), _key_data(new), strict=True):
    np.testing.assert_array_equal(a, b)
  assert models.KeyStream(3).params().dtype == nnx.Rngs(params=3).params().dtype


METHODS = [
  ('lora', {'rank': 3}),
  ('mixlora', {'experts': 3, 'rank': 2, 'top_k': 2, 'gate': 'noisy_topk'}),
  ('hydralora', {'experts': 3, 'rank': 2}),
  ('smore', {'spec': models.SMoRESpec(experts=(2, 2), ranks=(2, 3), fanouts=(2, 2), gate_dim=4)}),
  (
    'smore',
    {
      'spec': models.SMoRESpec(
        experts=(3, 2), ranks=(2, 2), fanouts=(2, 1), gate='noisy_topk', init='normal'
      )
    },
  ),
]


@pytest.mark.parametrize('method,kw', METHODS)
def test_adapters_from_a_key_stream_equal_those_from_nnx_rngs_bitwise(method, kw):
  """Switching the stream changed no initial value (three adapters share one stream, as in train)."""

  def build(stream):
    model = _Stack(3, nnx.Rngs(0))
    core.adapt(model, r'layers/\d+', models.factory(method, stream, **kw))
    return nnx.to_flat_state(nnx.state(model, core.AdapterParam))

  key = jax.random.fold_in(jax.random.key(0), 0xADA)
  with nnx.use_eager_sharding(False):
    old, new = build(nnx.Rngs(params=key)), build(models.KeyStream(key))
  assert [p for p, _ in old] == [p for p, _ in new] and len(old) > 3
  for (path, a), (_, b) in zip(old, new, strict=True):
    assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), path


def _calls_to_add_adapters_in_a_trace(n: int) -> int:
  """Python calls (cProfile, builtins included) made by train.add_adapters for n S'MoRE (2-2)
  adapters, inside jax.eval_shape after an n-layer base was traced (as in abstract_state)."""
  a = ml_collections.ConfigDict(base.get_config('smoke').adapter.to_dict())
  a.pattern = r'layers/\d+'
  the_plan = {'layers': {f'layers/{i}': (2, 2) for i in range(n)}}
  out = {}

  def build():
    with nnx.use_eager_sharding(False):
      model = _Stack(n, nnx.Rngs(0))
      prof = cProfile.Profile()
      prof.enable()
      try:
        paths = train.add_adapters(model, a, the_plan, seed=0, dtype='float32')
      finally:
        prof.disable()
    assert len(paths) == n
    out['calls'] = pstats.Stats(prof).total_calls
    return nnx.state(model, core.AdapterParam)

  jax.eval_shape(build)
  return out['calls']


def test_building_adapters_inside_a_trace_is_linear_in_their_number():
  _calls_to_add_adapters_in_a_trace(2)  # warm JAX's tracing caches
  c = {n: _calls_to_add_adapters_in_a_trace(n) for n in (2, 4, 8)}
  per_adapter_2_to_4 = (c[4] - c[2]) / 2
  per_adapter_4_to_8 = (c[8] - c[4]) / 4
  # Linear: each adapter costs the same (measured ratio 1.00). With an nnx.Rngs stream each draw
  # walked every equation traced before it: 1.68 here, and growing with n.
  assert per_adapter_4_to_8 <= 1.15 * per_adapter_2_to_4, c
