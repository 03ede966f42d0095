"""End-to-end tests of the launch contract through lm_pretrain, the template experiment.

Each run is a real `python -m experiments.lm_pretrain.main` subprocess (as a user would launch it),
with its own device count: outputs, re-run, SIGKILL + resume (bitwise), SIGTERM, 8-device sharding
and 2-process multi-host runs against the 1-device run, and one-line errors for bad input.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from common import export
from common import metrics
from common import testing
from common.models import hf
from common.models import spec

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = 'experiments/lm_pretrain/configs/base.py'
# 20 steps, per-step metrics, checkpoints every 5 steps, two evaluations, on the procedural Markov
# language (its exact optimum bounds the loss; the real-text default is covered by
# input_pipeline_test.py and the smoke command).
SMOKE = (
  'smoke',
  'data.source=markov',
  'data.vocab_size=64',
  'train.num_steps=20',
  'train.log_every=1',
  'train.eval_every=10',
  'checkpoint.every_steps=5',
)


def run(workdir, *overrides: str, devices: int = 1, flags=(), timeout=300, check=True, env=None):
  """Runs the experiment in a fresh process with `devices` fake CPU devices."""
  arg = ','.join(SMOKE + tuple(overrides))
  full_env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': testing.xla_flags_with_devices(devices),
    **(env or {}),
  }
  cmd = [
    sys.executable,
    '-m',
    'experiments.lm_pretrain.main',
    f'--config={CONFIG}:{arg}',
    f'--workdir={workdir}',
    *flags,
  ]
  p = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f'exit {p.returncode}\n{p.stderr[-3000:]}')
  return p


def train_losses(workdir) -> list[float]:
  rows = metrics.read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl')
  return [r['loss'] for r in rows if r['split'] == 'train']


def results(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / 'results.json').read_text())


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted 1-device run every other run is compared with."""
  workdir = tmp_path_factory.mktemp('reference')
  run(workdir)
  return workdir


def test_run_writes_the_workdir_contract(reference):
  for name in ('config.json', 'metrics.jsonl', 'results.json'):
    assert (reference / name).is_file(), name
  assert sorted(int(p.name) for p in (reference / 'checkpoints').iterdir()) == [10, 15, 20]
  assert list((reference / 'tensorboard').glob('events.out.tfevents.*'))
  rows = metrics.read_jsonl(reference / 'metrics.jsonl')
  assert [r['step'] for r in rows if r['split'] == 'train'] == list(range(1, 21))
  assert [r['step'] for r in rows if r['split'] == 'eval'] == [10, 20]
  res = results(reference)
  assert res['step'] == 20
  # The model learns: eval loss below the unigram level of this language (~4.1 nats) and above the
  # exact optimum, which no model can beat.
  assert res['eval']['optimal_loss'] < res['eval']['loss'] < 4.2
  assert json.loads((reference / 'config.json').read_text())['train']['num_steps'] == 20


def test_the_run_records_its_model_for_export(reference, tmp_path, capsys):
  s = spec.read(reference)
  assert s.tokenizer is None and s.context_length == 64  # the Markov language: token ids only
  done = export.export(reference, out=tmp_path)
  assert done.step == 20 and 'tokenizer.json' not in done.files
  back, _, _ = hf.load(tmp_path)
  x = np.arange(16, dtype=np.int32)[None] % 64
  np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(spec.restore(reference)[0](x)))
  assert export.main([str(reference), '--format=gguf']) == 2  # GGUF carries a tokenizer
  assert 'carry their tokenizer' in capsys.readouterr().err


def test_rerun_finishes_immediately(reference):
  before = (reference / 'metrics.jsonl').read_text()
  p = run(reference)
  assert 'already finished at step 20' in p.stderr
  assert (reference / 'metrics.jsonl').read_text() == before


def test_sigkill_then_resume_is_bitwise_identical(reference, tmp_path):
  p = run(tmp_path, 'debug.kill_after_step=12', check=False)
  assert p.returncode == -signal.SIGKILL
  assert max(train_losses(tmp_path)) and len(train_losses(tmp_path)) == 12
  run(tmp_path)  # resumes from step 10; lines for steps 11-12 are dropped and redone
  assert results(tmp_path)['train'] == results(reference)['train']
  assert results(tmp_path)['eval'] == results(reference)['eval']
  assert train_losses(tmp_path) == train_losses(reference)


def test_sigterm_saves_the_current_step(tmp_path):
  p = run(tmp_path, 'debug.sigterm_after_step=7', check=False)
  assert p.returncode == 143, p.stderr[-2000:]
  assert 'saved a checkpoint at step 7' in p.stderr
  assert (tmp_path / 'checkpoints' / '7').is_dir()


def _assert_matches(losses, ref_losses, res, ref_res):
  np.testing.assert_allclose(losses[:5], ref_losses[:5], rtol=1e-5)
  np.testing.assert_allclose(res['train']['loss'], ref_res['train']['loss'], rtol=1e-3)
  np.testing.assert_allclose(res['eval']['loss'], ref_res['eval']['loss'], rtol=1e-3)


def test_eight_devices_match_one(reference, tmp_path):
  run(tmp_path, 'mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2', devices=8)
  _assert_matches(
    train_losses(tmp_path), train_losses(reference), results(tmp_path), results(reference)
  )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_match_one(reference, tmp_path):
  port = _free_port()
  arg = ','.join(SMOKE + ('mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2'))
  env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': testing.xla_flags_with_devices(4),
  }
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        'experiments.lm_pretrain.main',
        f'--config={CONFIG}:{arg}',
        f'--workdir={tmp_path}',
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  assert 'process 0/2' in outs[0][1] and 'process 1/2' in outs[1][1]
  _assert_matches(
    train_losses(tmp_path), train_losses(reference), results(tmp_path), results(reference)
  )


@pytest.mark.parametrize(
  'overrides, flags, message',
  [
    ((), ('--config.train.num_stepz=3',), 'unknown config key'),
    ((), ('--config.train.num_steps=abc',), 'num_steps'),
    (('seed=abc',), (), "config key 'seed' expects int"),
    (('mesh.data=3',), (), 'mesh'),
  ],
)
def test_bad_input_is_one_line_error(tmp_path, overrides, flags, message):
  p = run(tmp_path, *overrides, flags=flags, check=False)
  assert p.returncode == 2
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, p.stderr[-2000:]
  assert 'Traceback' not in p.stderr


def test_workdir_of_a_different_model_is_refused(reference):
  before = sorted(p.name for p in (reference / 'checkpoints').iterdir())
  p = run(reference, 'model.d_model=32', check=False)
  assert p.returncode == 2
  last = p.stderr.strip().splitlines()[-1]
  assert 'different config' in last and 'model.d_model' in last
  assert sorted(p.name for p in (reference / 'checkpoints').iterdir()) == before
