"""What S'MoRE's runs and claims measure.

* `make_eval_fn`: held-out exact-match accuracy of a fine-tuned model, overall and per task, and
  the held-out reply loss. Teacher-forced: an example is correct iff the argmax prediction is
  right at every reply position (input_pipeline's loss_mask), which equals greedy decoding
  reproducing the reply, at the cost of one forward per batch.
* `param_count_differences`: the Eq. 8-9 parameter counts. For a layer stack, the S'MoRE
  module's real trainable leaves minus the closed form (`models.smore_num_params`), and its core
  minus LoRA(rank d_L) + sum_l d_l^2; both 0 when the closed forms are right.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import sharding
from common.adapters import core
from projects.smore import input_pipeline
from projects.smore import models

# ---------------------------------------------------------------------------------------------------
# Held-out accuracy.


@nnx.jit
def _eval_step(model, batch):
  logits = model(batch['inputs'], segment_ids=batch['segment_ids'], positions=batch['positions'])
  mask = batch['loss_mask'] > 0
  ok = (jnp.argmax(logits, -1) == batch['targets']) | ~mask
  row_ok = jnp.all(ok, axis=-1) & jnp.any(mask, axis=-1)
  logp = jax.nn.log_softmax(logits, -1)
  nll = -jnp.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  return row_ok, jnp.sum(nll * mask), jnp.sum(mask)


def make_eval_fn(
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  rules: sharding.Rules,
  d: input_pipeline.Data,
) -> Callable:
  """evaluate(model, step) -> {'accuracy', 'loss', 'acc_<task>'...} on d's held-out batches."""
  batches = input_pipeline.eval_batches(config, d)

  def evaluate(model, step):
    del step
    correct, tasks, nll, count = [], [], 0.0, 0.0
    for b in batches:
      g = sharding.to_global(
        {k: b[k] for k in ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')},
        mesh,
        rules,
      )
      row_ok, s, c = _eval_step(model, g)
      correct.append(np.asarray(jax.device_get(row_ok)))
      tasks.append(b['task'])
      nll, count = nll + float(s), count + float(c)
    correct, tasks = np.concatenate(correct), np.concatenate(tasks)
    real = tasks >= 0
    out = {'accuracy': float(correct[real].mean()), 'loss': nll / max(count, 1.0)}
    for i, name in enumerate(d.task_names):
      sel = tasks == i
      if sel.any():
        out[f'acc_{name}'] = float(correct[sel].mean())
    return out

  return evaluate


# ---------------------------------------------------------------------------------------------------
# Parameter counts (Eq. 8-9).


def param_count_differences(
  experts: Sequence[int], ranks: Sequence[int], d: int = 48
) -> dict[str, int]:
  """{'total': real trainable leaves - closed form, 'eq9': core - (2 d d_L + sum_{l>0} d_l^2)} of
  an S'MoRE adapter on a d x d layer (fan-out 2 per layer, gate and router input size 8)."""
  spec = models.SMoRESpec(
    experts=tuple(experts), ranks=tuple(ranks), fanouts=(2,) * len(experts), gate_dim=8, down_dim=8
  )
  with sharding.unsharded():
    m = nnx.eval_shape(lambda: models.SMoRE(d, d, spec, rngs=nnx.Rngs(0)))
  counts = models.smore_num_params(spec, d, d)
  dims = spec.dims
  return {
    'total': core.count_trainable(nnx.state(m, core.AdapterParam)) - counts['total'],
    'eq9': counts['core'] - (2 * d * dims[-1] + sum(x * x for x in dims[1:])),
  }
