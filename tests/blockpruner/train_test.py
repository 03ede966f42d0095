"""End to end: a small BlockPruner run on the run skeleton (metrics, removal order, the pruned model
saved and restorable, equal to the masked model), a preempted search resumed in process, and a
SIGKILLed one resumed with the same command (slow)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from common import metrics
from common import testing
from common import train_loop
from common.models import spec
from experiments.blockpruner.configs import base
from projects.blockpruner import input_pipeline
from projects.blockpruner import models
from projects.blockpruner import train

ROOT = pathlib.Path(__file__).resolve().parents[2]
# A 3-layer model trained for 30 steps (cached), tiny sets: seconds per run.
SMALL = (
  'smoke',
  'model.d_model=16',
  'model.num_layers=3',
  'model.num_heads=2',
  'model.num_kv_heads=1',
  'model.head_dim=8',
  'model.mlp_dim=32',
  'model.steps=30',
  'calib.num_samples=8',
  'calib.batch_size=8',
  'calib.seq_len=32',
  'eval.ppl_docs=4',
  'eval.ppl_windows=8',
  'eval.ppl_seq_len=32',
  'eval.mc_items=4',
  'eval.batch_size=8',
  'train.num_steps=4',
  'checkpoint.every_steps=1',
  'checkpoint.async_save=False',
)


def _config(*overrides):
  return base.get_config(','.join(SMALL + overrides))


def _rows(workdir):  # read_jsonl drops the wall-clock stamps a replay cannot reproduce
  return metrics.read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl')


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('blockpruner') / 'run'
  train.train_and_evaluate(_config(), str(workdir))
  return workdir


def test_a_run_removes_blocks_logs_curves_and_saves_the_pruned_model(finished):
  removed = train.removed_order(finished)
  assert len(removed) == 4 and len(set(removed)) == 4
  rows = _rows(finished)
  steps = [r for r in rows if r['split'] == 'train']
  evals = [r for r in rows if r['split'] == 'eval']
  assert [r['step'] for r in steps] == [1, 2, 3, 4]
  assert [r['step'] for r in evals] == [0, 1, 2, 3, 4]
  assert [r['removed'] for r in steps] == [models.block_name(b) for b in removed]
  assert evals[0]['removed_params'] == 0 and 'mc/mean' in evals[-1]
  assert all(0 <= r['mc/mean'] <= 1 for r in evals if 'mc/mean' in r)
  params = [r['removed_params'] for r in steps]
  assert params == sorted(params) and steps[-1]['mha_removed'] + steps[-1]['mlp_removed'] == 4
  # The saved model is structurally smaller and computes what the masked model computes.
  small, _ = spec.restore(finished / 'pruned')
  config = _config()
  model, tok = models.load(config)
  assert models.num_params(model) - models.num_params(small) == steps[-1]['removed_params']
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 500, (2, 12)), jnp.int32)
  mask = jnp.asarray(models.mask_of(removed, 3))
  np.testing.assert_allclose(small(tokens), model(tokens, block_mask=mask), rtol=1e-5, atol=2e-5)
  # The last held-out perplexity is the pruned model's, through the shared function.
  from common.models import perplexity  # noqa: PLC0415

  w = input_pipeline.make_data(config, tok).held_out['rdocs']
  got = perplexity.evaluate(small, w, batch_size=8)['perplexity']
  np.testing.assert_allclose(got, evals[-1]['rdocs/perplexity'], rtol=1e-4)


def test_a_preempted_search_resumes_from_the_blocks_already_removed(finished, tmp_path):
  workdir = tmp_path / 'preempted'
  with pytest.raises(train_loop.Preempted):
    train.train_and_evaluate(_config('debug.sigterm_after_step=2'), str(workdir))
  assert len(json.loads((workdir / 'run.json').read_text())) > 0
  train.train_and_evaluate(_config(), str(workdir))
  assert train.removed_order(workdir) == train.removed_order(finished)
  assert _rows(workdir) == _rows(finished)


def test_too_many_steps_and_bad_methods_are_one_line_errors(tmp_path):
  from common import config as config_lib  # noqa: PLC0415

  with pytest.raises(config_lib.ConfigError, match='at most 3 layers'):
    train.train_and_evaluate(
      _config('prune.method=layer_ppl', 'train.num_steps=4'), str(tmp_path / 'a')
    )
  with pytest.raises(config_lib.ConfigError, match='prune.method'):
    train.train_and_evaluate(_config('prune.method=magnitude'), str(tmp_path / 'b'))
  assert not (tmp_path / 'b').exists()


def _launch(workdir, *overrides, check=True):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': testing.xla_flags_with_devices(1)}
  cmd = [
    sys.executable,
    '-m',
    'experiments.blockpruner.main',
    f'--config=experiments/blockpruner/configs/base.py:{",".join(SMALL + overrides)}',
    f'--workdir={workdir}',
  ]
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  if check and p.returncode != 0:
    raise AssertionError(f'exit {p.returncode}\n{p.stderr[-3000:]}')
  return p


@pytest.mark.slow
@pytest.mark.parametrize('method', ['blockpruner', 'shortgpt'])
def test_sigkill_then_resume_replays_the_search(tmp_path, method):
  """Checkpoints every 2 steps, killed after step 3: the resumed run redoes step 3 from the blocks
  removed by step 2 and writes exactly the uninterrupted run's metrics and removal order."""
  args = (f'prune.method={method}', 'train.num_steps=3', 'checkpoint.every_steps=2')
  _launch(tmp_path / 'full', *args)
  p = _launch(tmp_path / 'killed', *args, 'debug.kill_after_step=3', check=False)
  assert p.returncode != 0
  _launch(tmp_path / 'killed', *args)
  assert _rows(tmp_path / 'killed') == _rows(tmp_path / 'full')
  assert train.removed_order(tmp_path / 'killed') == train.removed_order(tmp_path / 'full')
