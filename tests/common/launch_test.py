"""The launch contract's failure paths, end to end through `python -m experiments.lm_pretrain.main`
(the template experiment) in fresh processes: every defect here once ended in a traceback, a lost
or duplicated result, or a workdir left behind by bad input.

  * bad input: one line `error: ...`, exit 2, no traceback, and no workdir created;
  * stopped after the last step but before results.json (SIGKILL): the re-run completes it with
    the uninterrupted run's results;
  * Ctrl-C: a checkpoint at the current step, one line, exit 130; the resumed run is bitwise the
    uninterrupted one;
  * a second run of the same command on a busy workdir stops at once (exit 2) and writes nothing.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from common import metrics
from common import testing

CONFIG = 'experiments/lm_pretrain/configs/base.py'
SMOKE = (
  'smoke',
  'data.source=markov',
  'data.vocab_size=64',
  'train.num_steps=20',
  'train.log_every=1',
  'train.eval_every=10',
  'checkpoint.every_steps=5',
)


def _cmd(workdir, *overrides, flags=()):
  return [
    sys.executable,
    '-m',
    'experiments.lm_pretrain.main',
    f'--config={CONFIG}:{",".join(SMOKE + tuple(overrides))}',
    f'--workdir={workdir}',
    *flags,
  ]


def _env():
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': testing.xla_flags_with_devices(1)}


def run(workdir, *overrides, flags=(), timeout=300):
  return subprocess.run(
    _cmd(workdir, *overrides, flags=flags),
    cwd=testing.REPO_ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _files(workdir: pathlib.Path) -> dict[str, object]:
  """What a replay must reproduce: every metric line (without its wall-clock stamp), results.json
  and config.json, as written."""
  return {
    'metrics': metrics.read_jsonl(workdir / 'metrics.jsonl'),
    **{name: (workdir / name).read_text() for name in ('results.json', 'config.json')},
  }


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  p = run(workdir)
  assert p.returncode == 0, p.stderr[-3000:]
  return workdir


@pytest.mark.parametrize(
  'overrides, flags, message',
  [
    (('data.batch_size=0',), (), 'data.batch_size=0 must be >= 1'),
    (('data.source=nosuch',), (), "data.source='nosuch' is neither 'markov' nor"),
    (('dtype=float17',), (), "dtype='float17' is not one of"),
    (('mesh.data=3',), (), 'mesh'),
    (('checkpoint.keep=0',), (), 'checkpoint.keep=0 must be >= 1'),
    (('train.log_every=0',), (), 'train.log_every=0 must be >= 1'),
    (('train.num_steps=0',), (), 'train.num_steps=0 must be >= 1'),
    ((), ('--config.trian.num_steps=3',), "unknown config key 'trian' in --config.trian"),
    ((), ('--config.train.num_stepz=3',), "did you mean 'train.num_steps'"),
    ((), ('extra_argument',), "unexpected argument 'extra_argument'"),
  ],
)
def test_bad_input_is_one_line_and_leaves_no_workdir(tmp_path, overrides, flags, message):
  workdir = tmp_path / 'w'
  p = run(workdir, *overrides, flags=flags)
  assert p.returncode == 2, p.stderr[-2000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, p.stderr[-2000:]
  assert 'Traceback' not in p.stderr and last[-1] not in '\'"'
  assert not workdir.exists()


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  (tmp_path / 'f').write_text('')
  p = run(tmp_path / 'f')
  assert p.returncode == 2 and 'is a file, not a directory' in p.stderr.strip().splitlines()[-1]


def test_killed_after_the_last_step_completes_on_rerun(reference, tmp_path):
  p = run(tmp_path, 'debug.kill_after_step=20')
  assert p.returncode == -signal.SIGKILL
  assert (tmp_path / 'checkpoints' / '20').is_dir() and not (tmp_path / 'results.json').exists()
  p = run(tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  assert _files(tmp_path) == _files(reference)  # results.json included: real train and eval


def test_ctrl_c_saves_exits_130_and_resumes_bitwise(reference, tmp_path):
  p = run(tmp_path, 'debug.sigint_after_step=7')
  assert p.returncode == 130, p.stderr[-2000:]
  assert p.stderr.strip().splitlines()[-1].startswith('Ctrl-C: saved a checkpoint at step 7')
  assert 'Traceback' not in p.stderr and (tmp_path / 'checkpoints' / '7').is_dir()
  assert run(tmp_path).returncode == 0
  assert _files(tmp_path) == _files(reference)
  starts = json.loads((tmp_path / 'run.json').read_text())['starts']
  assert [s['status'] for s in starts] == ['interrupted', 'finished']


def test_a_second_run_on_a_busy_workdir_stops_at_once(tmp_path):
  first = subprocess.Popen(
    _cmd(tmp_path, 'train.num_steps=100000', 'checkpoint.every_steps=0'),
    cwd=testing.REPO_ROOT,
    env=_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.monotonic() + 120
    while not (tmp_path / 'run.json').exists():  # the first run holds the lock by now
      assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
      time.sleep(0.2)
    before = (tmp_path / 'config.json').read_text()
    p = run(tmp_path, 'train.num_steps=100000', 'checkpoint.every_steps=0')
    assert p.returncode == 2, p.stderr[-2000:]
    assert 'is in use by another run (pid' in p.stderr.strip().splitlines()[-1]
    assert (tmp_path / 'config.json').read_text() == before
  finally:
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
  assert first.returncode == 143  # SIGTERM: checkpoint at the current step, then exit


def test_help_lists_the_config_keys_with_their_values(tmp_path):
  p = run(tmp_path / 'w', flags=('--help',))
  assert p.returncode == 0, p.stderr[-2000:]
  assert 'usage: python -m experiments.lm_pretrain.main --config=' in p.stdout
  assert '  train.num_steps' in p.stdout and '  data.source ' in p.stdout
  assert '"markov"' in p.stdout  # the variant's overrides are applied in the listing
  assert not (tmp_path / 'w').exists()
