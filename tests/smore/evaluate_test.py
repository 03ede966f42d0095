"""projects.smore.evaluate: held-out exact match against a per-example reference loop, per task and
with padding rows ignored; the Eq. 8-9 parameter counts hold for several layer stacks."""

from flax import nnx
import jax
import numpy as np
import pytest

from common import sharding
from common.models import decoder
from experiments.smore.configs import base
from projects.smore import evaluate
from projects.smore import input_pipeline
from projects.smore import train


def _model(config):
  a = config.adapter
  dcfg = train.base_model(config, abstract=True)[0]
  p = train.plan(a, train.target_shapes(dcfg, a))
  with sharding.unsharded():
    model = decoder.Decoder(dcfg, rngs=nnx.Rngs(0))
    train.add_adapters(model, a, p, 0, 'float32')
  return model


def _forward(model, ex):
  logits = model(
    ex['inputs'][None], segment_ids=ex['segment_ids'][None], positions=ex['positions'][None]
  )
  return np.asarray(logits[0], np.float64)


def test_accuracy_and_loss_equal_a_per_example_reference():
  """Rows whose targets are made the model's own argmax are right by construction (every third
  row, and one more reply position wrong in a third of those); padding rows do not count."""
  config = base.get_config(
    'smoke,adapter.preset=lora,data.eval_examples=50,data.eval_batch_size=16'
  )
  d = input_pipeline.make_data(config)
  model = _model(config)
  rows, expect_ok = [], []
  for i in range(len(d.test)):
    ex = dict(d.test[i])
    mask = ex['loss_mask'] > 0
    if i % 3 == 0:
      pred = _forward(model, ex).argmax(-1)
      ex['targets'] = np.where(mask, pred, ex['targets']).astype(ex['targets'].dtype)
      if i % 9 == 0:  # one reply position wrong: the whole example is wrong
        j = np.flatnonzero(mask)[-1]
        ex['targets'][j] = (ex['targets'][j] + 1) % model.cfg.vocab_size
    rows.append(ex)
    logits = _forward(model, ex)
    expect_ok.append(bool(np.all(logits.argmax(-1)[mask] == ex['targets'][mask])))
  assert any(expect_ok) and not all(expect_ok)
  data = input_pipeline.Data(d.train, rows, d.task_names)
  mesh = sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])
  out = evaluate.make_eval_fn(config, mesh, sharding.DEFAULT_RULES, data)(model, 0)

  nll, count = 0.0, 0
  for ex in rows:
    logits = _forward(model, ex)
    mask = ex['loss_mask'] > 0
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll -= logp[np.arange(len(mask)), ex['targets']][mask].sum()
    count += int(mask.sum())
  ok, task = np.asarray(expect_ok), np.asarray([int(ex['task']) for ex in rows])
  assert out['accuracy'] == pytest.approx(ok.mean(), abs=1e-12)
  assert out['loss'] == pytest.approx(nll / count, rel=1e-4)
  for t, name in enumerate(d.task_names):
    if (task == t).any():
      assert out[f'acc_{name}'] == pytest.approx(ok[task == t].mean(), abs=1e-12)


@pytest.mark.parametrize(
  ('experts', 'ranks'), [((4, 4), (8, 8)), ((2, 2), (4, 4)), ((4, 2, 3), (2, 3, 1)), ((3,), (5,))]
)
def test_parameter_counts_equal_the_closed_forms(experts, ranks):
  assert evaluate.param_count_differences(experts, ranks, d=32) == {'total': 0, 'eq9': 0}
