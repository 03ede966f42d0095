"""projects.ebpo.evaluate: the all-fail measurement on a policy (GRPO's signal exactly 0, EBPO's
not) and the MSE theorem in simulation (oracle = 1-S; plug-in < 1)."""

from flax import nnx
import jax
import numpy as np
import pytest

from common import sharding
from common.models import decoder
from common.rl import loss as loss_lib
from common.rl import rollout
from projects.ebpo import evaluate
from projects.ebpo import models


def _policy():
  cfg = models.WarmupConfig(d_model=16, num_layers=1, num_heads=2, mlp_dim=32)
  with sharding.unsharded():
    return decoder.Decoder(models.decoder_config(cfg), rngs=nnx.Rngs(0))


def test_all_fail_signal_is_zero_for_grpo_and_present_for_ebpo_on_a_random_policy():
  values = evaluate.all_fail_signal(_policy(), trials=2, seed=1)
  assert len(values) == 2 * (2 + len(loss_lib.AGGREGATIONS))
  assert all(v == 0.0 for v in values.values()), values


def test_grad_max_is_zero_exactly_for_zero_advantages_only():
  rng = np.random.default_rng(0)
  prompt = rng.integers(3, 21, size=(4, 6)).astype(np.int32)
  completion = rng.integers(3, 21, size=(4, 3)).astype(np.int32)
  batch = jax.device_put(
    rollout.build_batch(prompt, np.ones_like(prompt, bool), completion, np.full(4, 3))
  )
  model = _policy()
  for agg in loss_lib.AGGREGATIONS:
    assert float(evaluate.grad_max(model, batch, np.zeros(4, np.float32), agg)) == 0.0
    adv = np.asarray([1.0, -1.0, 0.5, 0.0], np.float32)
    assert float(evaluate.grad_max(model, batch, adv, agg)) > 1e-6


@pytest.mark.parametrize('g', [2, 8])
def test_oracle_shrinkage_matches_theory_and_plugin_beats_the_group_mean(g):
  r = evaluate.baseline_mse(g, num_prompts=40_000, seed=3)
  # Monte-Carlo error of an MSE ratio over 40k prompts is about 1%.
  assert r.ratio_oracle == pytest.approx(r.theory_ratio, abs=0.03)
  assert r.ratio_plugin < 1.0
  assert 0 < r.shrinkage_plugin < 1 and 0 < r.shrinkage_oracle < 1
  # Larger groups need less shrinkage.
  assert evaluate.baseline_mse(16, num_prompts=5_000).shrinkage_oracle < r.shrinkage_oracle
