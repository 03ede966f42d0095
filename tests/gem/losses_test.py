"""GEM's total loss, its switch schedule and the learning-rate switch at the same boundary."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import losses as common_losses
from common import sharding
from common.models import decoder
from projects.gem import input_pipeline as ip
from projects.gem import losses
from projects.gem import models

CFG = decoder.DecoderConfig(
  vocab_size=60, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)


def _batch(alpha, n=6, seed=0):
  layout = ip.Layout(seq_len=12, special_ids=(58, 59), pad_id=0, p_plain=0.5)
  rng = np.random.default_rng(seed)
  texts = [rng.integers(1, 50, size=int(rng.integers(1, 15))) for _ in range(n)]
  texts[0] = np.array([], np.int32)  # one empty text: excluded everywhere
  exs = [ip.build_example(t, seed, i, layout) for i, t in enumerate(texts)]
  batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
  batch['alpha'] = np.full(n, alpha, np.float32)
  return jax.tree.map(jnp.asarray, batch)


@pytest.fixture(scope='module')
def model():
  with sharding.unsharded():
    return models.GemModel(decoder.Decoder(CFG, rngs=nnx.Rngs(0)))


@nnx.jit
def _total(model, batch):
  return losses.total_loss(model, batch)


@nnx.jit
def _parts(model, batch):
  return losses.ntp_loss(model, batch)[0], losses.contrastive_loss(model, batch)[0]


def test_total_loss_is_the_alpha_mix(model):
  for alpha in (0.0, 0.3, 1.0):
    batch = _batch(alpha)
    loss, m = _total(model, batch)
    ntp, cl = _parts(model, batch)
    np.testing.assert_allclose(float(loss), (1 - alpha) * float(ntp) + alpha * float(cl), 1e-5)
    assert float(m['alpha']) == pytest.approx(alpha)
    assert float(m['empty_frac']) == pytest.approx(1 / 6)


@functools.partial(nnx.jit, static_argnames='alphas')
def _total_traced(model, batch, alphas):
  return losses.total_loss(model, batch, alphas=alphas)


def test_declared_alphas_trace_fewer_branches_with_the_same_loss(model):
  assert losses.branches_for((0.0, 1.0)) == ('ntp', 'cl')
  assert losses.branches_for((0.0, 0.5)) == ('ntp', 'both')
  assert losses.branches_for((1.0,)) == ('cl',)
  for alpha in (0.0, 1.0):
    batch = _batch(alpha)
    want, _ = _total(model, batch)
    got, m = _total_traced(model, batch, (0.0, 1.0))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    assert float(m['alpha_untraced']) == 0.0
  _, m = _total_traced(model, _batch(0.3), (0.0, 1.0))  # undeclared: flagged, not silent
  assert float(m['alpha_untraced']) == 1.0


def test_ntp_loss_equals_masked_cross_entropy_reference(model):
  batch = _batch(0.0, seed=1)
  logits = nnx.jit(lambda m, t, r: m.logits(t, r))(model, batch['inputs'], batch['roles'])
  want, count = common_losses.cross_entropy(
    logits, batch['targets'], batch['loss_mask'] * batch['valid'][:, None]
  )
  got, got_count = nnx.jit(losses.ntp_loss)(model, batch)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  assert (
    float(got_count) == float(count) == float((batch['loss_mask'].sum(1) * batch['valid']).sum())
  )


def test_gradients_reach_specials_and_scale_only_in_their_phase(model):
  grad = nnx.jit(nnx.grad(lambda m, b: losses.total_loss(m, b)[0]))  # one compile, both phases
  g0, g1 = grad(model, _batch(0.0)), grad(model, _batch(1.0))
  assert float(jnp.abs(g0.logit_scale.log_scale[...])) == 0.0  # NTP phase: no InfoNCE
  assert float(jnp.abs(g1.logit_scale.log_scale[...])) > 0.0
  emb1 = np.asarray(g1.lm.embed.embedding[...])
  assert np.abs(emb1[58:60]).max() > 0  # the special rows are trained by the contrastive loss


def test_switch_schedule_and_lr_boundary():
  assert [losses.alpha_at(i, 3) for i in range(5)] == [0, 0, 0, 1, 1]
  sched = losses.learning_rate(10, 3, lr_ntp=1e-4, lr_cl=1e-5)
  assert float(sched(0)) == pytest.approx(1e-4)
  assert 1e-5 < float(sched(2)) < 1e-4  # still the NTP cosine
  assert float(sched(3)) == pytest.approx(1e-5)  # the contrastive phase starts at its own lr
  assert float(sched(9)) < 1e-5
  only_cl = losses.learning_rate(10, 0, lr_ntp=1e-4, lr_cl=1e-5)
  assert float(only_cl(0)) == pytest.approx(1e-5)


def test_optimizer_leaves_the_log_scale_alone_in_ntp_steps(model):
  from flax import nnx as nnx_  # noqa: PLC0415

  from experiments.gem.configs import base  # noqa: PLC0415
  from projects.gem import train  # noqa: PLC0415

  cfg = base.get_config('smoke,gem.pretrain_steps=2,gem.mixed_steps=2,gem.cl_steps=2')
  with sharding.unsharded():
    m = models.GemModel(decoder.Decoder(CFG, rngs=nnx_.Rngs(1)))
    opt = nnx_.Optimizer(m, train.make_optimizer(cfg), wrt=nnx_.Param)
  before = float(m.logit_scale.log_scale[...])
  kernel = np.asarray(m.lm.layers[0].mlp.up_proj.kernel[...]).copy()

  @nnx_.jit
  def step(m, opt, batch):
    opt.update(m, nnx_.grad(lambda m: losses.total_loss(m, batch)[0])(m))

  for _ in range(3):
    step(m, opt, _batch(0.0))
  assert float(m.logit_scale.log_scale[...]) == before  # no gradient and no weight decay
  assert np.abs(np.asarray(m.lm.layers[0].mlp.up_proj.kernel[...]) - kernel).max() > 0
