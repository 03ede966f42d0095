"""End to end on cheap members (the smoke recipes shrunk): stage 1 + merges + the evaluation rows,
the source == pivot case (identity alignment through the whole pipeline), a preempted fusion run
resumed bitwise in process, and a SIGKILLed one resumed with the same command (slow)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from common import metrics
from common import train_loop
from experiments.fusechat.configs import base
from projects.fusechat import input_pipeline
from projects.fusechat import models
from projects.fusechat import train

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHEAP = {
  name: dataclasses.replace(
    r, steps=8, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32
  )
  for name, r in models.TINY.items()
}
SMALL = (
  'smoke',
  'fuse.num_examples=16',
  'fuse.seq_len=16',
  'fuse.chars=64',
  'fuse.batch_size=8',
  'fuse.topk=4',
  'eval.num_items=4',
  'eval.ppl_docs=2',
  'eval.ppl_chars=48',
  'eval.ppl_seq_len=32',
  'eval.batch_size=8',
  'train.num_steps=4',
  'checkpoint.every_steps=2',
  'checkpoint.async_save=False',
)


@pytest.fixture(autouse=True)
def cheap_members(monkeypatch):
  monkeypatch.setattr(models, 'TINY', CHEAP)


def _config(*overrides):
  return base.get_config(','.join(SMALL + overrides))


def _rows(workdir):  # read_jsonl drops the wall-clock stamps a replay cannot reproduce
  return metrics.read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl')


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('fusechat') / 'run'
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(models, 'TINY', CHEAP)
    train.train_and_evaluate(_config(), str(workdir))
  return workdir


def test_a_run_fuses_merges_and_evaluates_everything(finished):
  rows = _rows(finished)
  steps = [r for r in rows if r['split'] == 'train']
  evals = [r for r in rows if r['split'] == 'eval']
  assert [r['step'] for r in steps] == [1, 2, 3, 4]
  assert all({'fused_coder/loss', 'fused_general/fuse', 'loss'} <= set(r) for r in steps)
  final = evals[-1]
  names = ['pivot', 'fused_coder', 'fused_general', 'source_coder', 'source_general']
  names += ['sce', 'linear', 'task_arithmetic', 'ties', 'dare']
  for n in names:
    for k in ('code/acc', 'text/acc', 'acc', 'code/nll_byte', 'text/nll_byte'):
      assert np.isfinite(final[f'{n}/{k}']), (n, k)
    assert 0 <= final[f'{n}/acc'] <= 1
  assert 0 < final['fused_coder/aligned_frac'] < 1  # different tokenizers: partly aligned


def test_source_equal_to_pivot_aligns_one_to_one():
  config = _config('fuse.fusion=source')
  config.model.sources = ('tiny:pivot',)
  pivot = models.load_member('tiny:pivot')
  data = input_pipeline.make_fusion_data(config, pivot, [pivot])
  t = data.teachers[pivot.name]
  assert t.aligned_frac == 1.0
  np.testing.assert_array_equal(t.mapping, np.arange(pivot.tokenizer.vocab_size))
  # The teacher is then the pivot's own top-k (renormalised) at every scored position.
  own = input_pipeline.cached_topk(pivot, data.texts, config.fuse.topk, config.eval.batch_size)
  scored = data.mask[:, 1:]
  p = np.exp(own.logp.astype(np.float64))
  p /= p.sum(-1, keepdims=True)
  width = own.ids.shape[1]
  np.testing.assert_array_equal(t.ids[:, :width][scored[:, :width]], own.ids[scored[:, :width]])
  np.testing.assert_allclose(t.probs[:, :width][scored[:, :width]], p[scored[:, :width]], rtol=1e-5)


def test_a_preempted_fusion_run_resumes_bitwise(finished, tmp_path):
  workdir = tmp_path / 'preempted'
  with pytest.raises(train_loop.Preempted):
    train.train_and_evaluate(_config('debug.sigterm_after_step=3'), str(workdir))
  train.train_and_evaluate(_config(), str(workdir))
  assert _rows(workdir) == _rows(finished)


def test_bad_settings_are_one_line_errors(tmp_path):
  from common import config as config_lib  # noqa: PLC0415

  for bad in ('fuse.lam=1.5', 'fuse.fusion=avg', 'merge.dare_drop=1.0', 'merge.sce_density=0'):
    with pytest.raises(config_lib.ConfigError, match=bad.split('=')[0]):
      train.train_and_evaluate(_config(bad), str(tmp_path / 'x'))
  config = _config()
  config.merge.methods = ('sce', 'mean')
  with pytest.raises(config_lib.ConfigError, match='merge.methods'):
    train.train_and_evaluate(config, str(tmp_path / 'x'))
  assert not (tmp_path / 'x').exists()


@pytest.mark.slow
def test_a_sigkilled_run_resumes_bitwise_with_the_same_command(finished, tmp_path):
  """The real members (cached smoke recipes), killed right after step 3 of 4 (checkpoint at 2)."""
  arg = ','.join([*SMALL, 'checkpoint.async_save=True'])
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}

  def launch(workdir, *extra):
    cmd = [
      sys.executable,
      '-m',
      'experiments.fusechat.main',
      f'--config=experiments/fusechat/configs/base.py:{",".join([arg, *extra])}',
      f'--workdir={workdir}',
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)

  ref = launch(tmp_path / 'ref')
  assert ref.returncode == 0, ref.stderr[-2000:]
  killed = launch(tmp_path / 'killed', 'debug.kill_after_step=3')
  assert killed.returncode == -9, killed.stderr[-2000:]
  again = launch(tmp_path / 'killed')
  assert again.returncode == 0, again.stderr[-2000:]
  assert _rows(tmp_path / 'killed') == _rows(tmp_path / 'ref')
