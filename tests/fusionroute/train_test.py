"""FusionRoute end to end through its launcher: both stages' outputs, re-run, SIGKILL + resume in
either stage (bitwise), 8 devices against 1, and one-line errors.

Each run is a real `python -m experiments.fusionroute.main` subprocess with tiny budgets: experts
trained for a few steps (cached under their own key), 6 steps per stage, 32 evaluation prompts.
Those are `slow` (minutes on 2 shared cores; the claims suite re-measures resume and sharding as
invariant claims); the default suite checks the configuration errors in-process.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

from flax import nnx
import jax
import numpy as np
import pytest

from common import config as config_lib
from common import metrics
from common import testing
from experiments.fusionroute.configs import base
from projects.fusionroute import experts
from projects.fusionroute import train

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = 'experiments/fusionroute/configs/base.py'
SMOKE = (
  'smoke',
  'experts.base_steps=20',
  'stage1.num_steps=6',
  'train.num_steps=6',
  'train.log_every=1',
  'train.eval_every=6',
  'checkpoint.every_steps=2',
  'data.eval_per_domain=8',
  'data.flaw_eval=8',
  'data.pair_prompts=16',
  'eval.batch_size=16',
)


def run(workdir, *overrides: str, devices: int = 1, check=True, timeout=900):
  arg = ','.join(SMOKE + tuple(overrides))
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': testing.xla_flags_with_devices(devices)}
  cmd = [
    sys.executable,
    '-m',
    'experiments.fusionroute.main',
    f'--config={CONFIG}:{arg}',
    f'--workdir={workdir}',
    '--config.experts.steps=(20, 20, 20)',  # a tuple: not expressible in the comma list
  ]
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f'exit {p.returncode}\n{p.stderr[-3000:]}')
  return p


def rows(workdir) -> list[dict]:
  return metrics.read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl')


def train_losses(workdir) -> list[float]:
  return [r['loss'] for r in rows(workdir) if r['split'] == 'train']


def results(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / 'results.json').read_text())


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  run(workdir)
  return workdir


@pytest.mark.slow
def test_both_stages_write_the_workdir_contract(reference):
  stage1 = reference / 'stage1'
  for d in (reference, stage1):
    for name in ('config.json', 'metrics.jsonl', 'results.json', 'run.json'):
      assert (d / name).is_file(), d / name
    assert sorted(int(p.name) for p in (d / 'checkpoints').iterdir()) == [2, 4, 6]
  assert [r['step'] for r in rows(reference) if r['split'] == 'train'] == list(range(1, 7))
  s1, s2 = results(stage1), results(reference)
  assert 'expert' in s1['train'] and 'cdpo/rewards/margins' in s2['train']
  for res in (s1, s2):
    for method in ('fusionroute', 'routing_only', 'router_lm'):
      for metric in ('math', 'code', 'instruct', 'mixed', 'flaw', 'domain_match'):
        assert 0.0 <= res['eval'][f'{method}/{metric}'] <= 1.0
  assert json.loads((stage1 / 'config.json').read_text())['train']['num_steps'] == 6
  assert list((reference / 'reference').glob('*.npz'))  # CDPO's cached reference log-probs


@pytest.mark.slow
def test_rerun_finishes_immediately(reference):
  before = (reference / 'metrics.jsonl').read_text()
  p = run(reference)
  assert 'already finished at step 6' in p.stderr
  assert (reference / 'metrics.jsonl').read_text() == before


@pytest.mark.slow
@pytest.mark.parametrize('stage', [1, 2])
def test_sigkill_then_resume_is_bitwise_identical(reference, tmp_path, stage):
  p = run(tmp_path, f'debug.stage={stage}', 'debug.kill_after_step=3', check=False)
  assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
  killed = tmp_path / 'stage1' if stage == 1 else tmp_path
  assert len(train_losses(killed)) == 3
  run(tmp_path, f'debug.stage={stage}')  # the same command again: resumes from step 2
  for sub in ('stage1', '.'):
    got, want = tmp_path / sub, reference / sub
    assert rows(got) == rows(want), sub
    assert results(got)['train'] == results(want)['train']
    assert results(got)['eval'] == results(want)['eval']


@pytest.mark.slow
def test_eight_devices_match_one(reference, tmp_path):
  run(tmp_path, 'mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2', devices=8)
  for sub in ('stage1', '.'):
    got, want = tmp_path / sub, reference / sub
    np.testing.assert_allclose(train_losses(got)[:5], train_losses(want)[:5], rtol=1e-5)
    np.testing.assert_allclose(results(got)['train']['loss'], results(want)['train']['loss'], 1e-3)
    np.testing.assert_allclose(results(got)['eval']['loss'], results(want)['eval']['loss'], 1e-3)


@pytest.mark.slow
@pytest.mark.parametrize(
  'override, message',
  [
    ('method=routed', "method='routed' is not one of"),
    ('data.flaw=nine', "data.flaw='nine'"),
    ('experts.source=smollm2', 'needs experts.lora_steps'),
  ],
)
def test_bad_input_is_a_one_line_error(tmp_path, override, message):
  p = run(tmp_path, override, check=False, timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, p.stderr[-2000:]
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize(
  'override, message',
  [
    ('method=routed', "method='routed' is not one of"),
    ('data.flaw=nine', "data.flaw='nine'"),
    ('router.init=nope', "router.init='nope'"),
    ('stage1.num_steps=0', 'stage1.num_steps=0'),
    ('experts.source=gpt', "experts.source='gpt' is not one of"),
    ('experts.source=smollm2', 'needs experts.lora_steps'),
  ],
)
def test_config_errors_are_one_line(override, message):
  with pytest.raises(Exception) as e:
    train.check_config(base.get_config(f'smoke,{override}'))
  assert message in str(e.value) and '\n' not in str(e.value)


def test_router_init_names_an_expert_of_the_configured_source():
  assert train.expert_names(base.get_config('smoke')) == ('math', 'code', 'instruct')
  assert train.expert_names(base.get_config('smollm2')) == ('math', 'string', 'general')
  with pytest.raises(config_lib.ConfigError, match="router.init='logic' is not one of "):
    train.check_config(base.get_config('smollm2,router.init=logic'))  # a domain, not an expert


SMOLLM2 = (
  'smollm2',
  'stage1.num_steps=2',
  'train.num_steps=2',
  'train.log_every=1',
  'train.eval_every=2',
  'checkpoint.every_steps=2',
  'data.eval_per_domain=2',
  'data.pair_prompts=6',
  'eval.batch_size=6',
)


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_arm_runs_both_stages_its_baselines_and_a_finished_rerun(tmp_path):
  """The real-model arm end to end on SmolLM2 with 2-step LoRA experts (their own cache key),
  2 steps per stage and 2 held-out questions per domain: every stage's contract and metric."""
  # One device (the test session's 8 fake CPU devices would hold 8 replicas of the four 135M
  # models), large buffers mmapped and returned to the system on free (the README's command).
  malloc = {'MALLOC_MMAP_THRESHOLD_': '131072', 'MALLOC_ARENA_MAX': '2'}
  env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': testing.xla_flags_with_devices(1),
    **malloc,
  }

  def launch(module, workdir):
    cmd = [
      sys.executable,
      '-m',
      f'experiments.fusionroute.{module}',
      f'--config={CONFIG}:{",".join(SMOLLM2)}',
      f'--workdir={workdir}',
      '--config.experts.lora_steps=(2, 2)',
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    assert p.returncode == 0, p.stderr[-3000:]

  launch('main', tmp_path / 'run')
  for d in (tmp_path / 'run', tmp_path / 'run' / 'stage1'):
    res = results(d)
    for method in ('fusionroute', 'routing_only', 'router_lm', 'deferral'):
      for metric in ('math', 'string', 'logic', 'mixed', 'domain_match'):
        assert 0.0 <= res['eval'][f'{method}/{metric}'] <= 1.0
      assert f'{method}/flaw' not in res['eval']  # no planted flaw in the real arm
    assert np.isfinite(res['eval']['loss'])
  assert 'cdpo/rewards/margins' in results(tmp_path / 'run')['train']
  before = (tmp_path / 'run' / 'results.json').read_text()
  launch('main', tmp_path / 'run')  # finished: returns at once, nothing rewritten
  assert (tmp_path / 'run' / 'results.json').read_text() == before
  launch('baselines', tmp_path / 'baselines')
  out = json.loads((tmp_path / 'baselines' / 'baselines.json').read_text())
  for method in ('expert_math', 'expert_string', 'expert_general', 'uniform', 'oracle'):
    assert 0.0 <= out[method]['mixed'] <= 1.0
  for method in ('sequence_selection', 'task_arithmetic', 'ties', 'dare'):
    assert method in out


def test_decoder_with_equals_a_random_decoder_overwritten_by_the_same_params():
  cfg = experts.ExpertsConfig(d_model=16, num_layers=1, num_heads=2, mlp_dim=32)
  params = experts._params(experts.new_decoder(cfg, seed=3))  # noqa: SLF001
  want = experts.load_params(experts.new_decoder(cfg, seed=0), params)
  got = experts.decoder_with(cfg, params)
  a = nnx.to_pure_dict(nnx.state(want))
  b = nnx.to_pure_dict(nnx.state(got))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert nnx.graphdef(want) == nnx.graphdef(got)
