"""common.optim: the shared recipe gives bitwise the updates of the recipes it replaced."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from common import optim


def _updates(tx, steps=12):
  params = {'w': jnp.linspace(-1.0, 1.0, 24).reshape(4, 6), 'b': jnp.ones(3)}
  state = tx.init(params)
  out = []
  for i in range(steps):
    grads = jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)) * 3.0, params)
    u, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, u)
    out.append(params)
  return out


def _same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(lr=3e-3, clip_norm=1.0, weight_decay=0.01, **kw))


def test_constant_lr_is_clipped_adamw():
  o = _cfg(b1=0.9, b2=0.99)
  ref = optax.chain(
    optax.clip_by_global_norm(1.0), optax.adamw(3e-3, b1=0.9, b2=0.99, weight_decay=0.01)
  )
  _same(_updates(optim.make_optimizer(o, 12)), _updates(ref))
  assert optim.learning_rate(o, 12) == 3e-3


@pytest.mark.parametrize('final', [None, 0.05])
def test_warmup_cosine_schedule(final):
  o = _cfg(warmup_steps=4) if final is None else _cfg(warmup_steps=4, final_lr_frac=final)
  sched = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 4, 12, 3e-3 * (final or 0.1))
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
  _same(_updates(optim.make_optimizer(o, 12)), _updates(ref))
  lr = optim.learning_rate(o, 12)
  assert float(lr(0)) == 0.0 and float(lr(4)) == pytest.approx(3e-3)
  assert float(lr(12)) == pytest.approx(3e-3 * (final or 0.1))


def test_own_schedule_mask_and_extra_transforms():
  o = _cfg(warmup_steps=2)
  mask = lambda p: {'w': True, 'b': False}  # noqa: E731
  clamp = optax.scale(0.5)
  ref = optax.chain(
    optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01, mask=mask), clamp
  )
  _same(
    _updates(optim.make_optimizer(o, 12, lr=1e-3, decay_mask=mask, then=[clamp])), _updates(ref)
  )


def test_flatten_is_the_same_adamw_on_one_vector():
  o = _cfg(warmup_steps=2)
  sched = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 2, 12, 3e-3 * 0.1)
  ref = optax.flatten(
    optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
  )
  _same(_updates(optim.make_optimizer(o, 12, flatten=True)), _updates(ref))
