"""The in-process sharing of evaluations and teachers: a memoised result is what a fresh
computation gives, a model or an input that differs in one bit is computed again, and runs that
differ only in lambda share one teacher."""

from __future__ import annotations

from flax import nnx
import jax
import numpy as np
import pytest

from projects.fusechat import evaluate
from projects.fusechat import input_pipeline
from projects.fusechat import models
from tests.fusechat import train_test


@pytest.fixture(autouse=True)
def cheap_members(monkeypatch):
  monkeypatch.setattr(models, 'TINY', train_test.CHEAP)


def _counting(monkeypatch):
  calls = []
  inner = evaluate.Evaluator._evaluate

  def counted(self, model, w):
    calls.append(evaluate.model_digest(model))
    return inner(self, model, w)

  monkeypatch.setattr(evaluate.Evaluator, '_evaluate', counted)
  return calls


def test_memoised_evaluation_equals_a_fresh_one_and_sees_every_bit(monkeypatch):
  monkeypatch.setattr(evaluate, '_MEMO', {})
  calls = _counting(monkeypatch)
  config = train_test._config()
  pivot = models.load_member('tiny:pivot')
  first = evaluate.Evaluator(config)(pivot.model, pivot.tokenizer)
  # Another Evaluator (another run) and a freshly loaded copy of the same member: shared.
  again = models.load_member('tiny:pivot')
  assert evaluate.Evaluator(config)(again.model, again.tokenizer) == first
  assert len(calls) == 1
  # Computed afresh (memo emptied): bitwise the memoised values.
  monkeypatch.setattr(evaluate, '_MEMO', {})
  assert evaluate.Evaluator(config)(pivot.model, pivot.tokenizer) == first
  assert len(calls) == 2
  # From here on only which evaluations run matters: a stub stands in for the computation.
  monkeypatch.setattr(
    evaluate.Evaluator, '_evaluate', lambda self, model, w: calls.append(0) or {'acc': 0.0}
  )
  # One weight changed by one ulp: another key, evaluated again.
  graphdef, params = nnx.split(again.model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  w = np.array(leaves[0])
  w.flat[0] = np.nextafter(w.flat[0], np.float32(np.inf))
  changed = nnx.merge(graphdef, jax.tree.unflatten(treedef, [w, *leaves[1:]]))
  assert evaluate.model_digest(changed) != evaluate.model_digest(pivot.model)
  evaluate.Evaluator(config)(changed, pivot.tokenizer)
  assert len(calls) == 3
  # Another evaluation set (config.eval): evaluated again.
  other = train_test._config('eval.num_items=3')
  evaluate.Evaluator(other)(pivot.model, pivot.tokenizer)
  assert len(calls) == 4


def test_a_teacher_is_shared_by_runs_that_differ_only_in_lambda(monkeypatch):
  monkeypatch.setattr(input_pipeline, '_TEACHERS', {})
  computed = []
  inner = input_pipeline._source_teacher
  monkeypatch.setattr(input_pipeline, '_source_teacher', lambda *a: computed.append(1) or inner(*a))
  pivot, src = models.load_member('tiny:pivot'), models.load_member('tiny:coder')
  config = train_test._config()
  data = input_pipeline.fusion_base(config, pivot)
  t = input_pipeline.add_source(config, data, pivot, src)
  clm = train_test._config('fuse.lam=1.0')
  data_clm = input_pipeline.fusion_base(clm, pivot)
  assert input_pipeline.add_source(clm, data_clm, pivot, src) is t
  assert data_clm.teachers[src.name] is t and len(computed) == 1
  assert not t.ids.flags.writeable and not t.probs.flags.writeable
  # Computed afresh: the same arrays.
  monkeypatch.setattr(input_pipeline, '_TEACHERS', {})
  fresh = input_pipeline.add_source(config, input_pipeline.fusion_base(config, pivot), pivot, src)
  assert len(computed) == 2
  for name in ('ids', 'probs', 'mapping', 'chosen'):
    np.testing.assert_array_equal(getattr(fresh, name), getattr(t, name))
  assert fresh.aligned_frac == t.aligned_frac
  # Another corpus (fuse.data_seed) or teacher choice (fuse.fusion): computed again.
  for override in ('fuse.data_seed=1', 'fuse.fusion=source'):
    c = train_test._config(override)
    input_pipeline.add_source(c, input_pipeline.fusion_base(c, pivot), pivot, src)
  assert len(computed) == 4
