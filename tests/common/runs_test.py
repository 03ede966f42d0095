"""common.runs: tables, config differences, steady-state step times and plots from run workdirs."""

from __future__ import annotations

import json

import pytest

from common import runs
from tests.common import fit_test


@pytest.fixture(scope='module')
def three_runs(tmp_path_factory):
  """Two seeds of one configuration and one run of another (log_every differs)."""
  root = tmp_path_factory.mktemp('runs')
  for name, overrides in (
    ('a_seed0', {'seed': 0}),
    ('a_seed1', {'seed': 1}),
    ('b_seed0', {'seed': 0, 'train.log_every': 5}),
  ):
    fit_test.fit(fit_test.make_config(**overrides), root / name, fit_test.Regression())
  return root


def test_summarize_reads_every_run_of_a_directory(three_runs, capsys):
  assert runs.main(['summarize', str(three_runs), '--metrics=train/loss']) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == '| run | status | steps | wall | s/step | train/loss |'
  assert [line.split(' | ')[0] for line in out[2:]] == ['| a_seed0', '| a_seed1', '| b_seed0']
  assert all(' finished | 20/20 | ' in line for line in out[2:])
  got = {r.name: r.final('train', 'loss') for r in runs.expand([str(three_runs)])}
  assert (
    got['a_seed0'] == json.loads((three_runs / 'a_seed0/results.json').read_text())['train']['loss']
  )


def test_compare_names_the_differing_keys(three_runs):
  rs = runs.expand([str(three_runs)])
  assert runs.differing_keys(rs) == ['seed', 'train.log_every']
  assert runs.compare(rs, ['train/loss']).startswith('configs differ in: seed, train.log_every')
  grouped = runs.groups(rs)
  assert {k: [r.name for r in v] for k, v in grouped.items()} == {
    'train.log_every=10': ['a_seed0', 'a_seed1'],
    'train.log_every=5': ['b_seed0'],
  }


def test_plot_writes_a_png(three_runs, tmp_path):
  out = runs.plot(runs.expand([str(three_runs)]), ['train/loss'], tmp_path / 'p.png')
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_seconds_per_step_skips_compilation_evaluations_and_restarts():
  rows = [
    {'step': 5, 'split': 'train', 'time': 100.0},  # first line of the start: compiled, no gap
    {'step': 10, 'split': 'train', 'time': 110.0},  # 2 s/step
    {'step': 10, 'split': 'eval', 'time': 150.0},
    {'step': 15, 'split': 'train', 'time': 170.0},  # spans the evaluation: left out
    {'step': 20, 'split': 'train', 'time': 180.0},  # 2 s/step
    {'step': 25, 'split': 'train', 'time': 5000.0},  # after a restart at t=4000: left out
    {'step': 30, 'split': 'train', 'time': 5015.0},  # 3 s/step
  ]
  prov = {
    'starts': [{'start': '1970-01-01T00:01:00+00:00'}, {'start': '1970-01-01T01:06:40+00:00'}]
  }
  record = runs.RunRecord(runs.pathlib.Path('x'), {}, prov, rows, None)
  assert runs.seconds_per_step(record) == 2.0  # median of [2, 2, 3]


def test_not_a_run_is_one_line(tmp_path, capsys):
  assert runs.main(['summarize', str(tmp_path)]) == 2
  assert capsys.readouterr().err.startswith('error: ')


def test_final_eval_is_the_finished_runs_eval_and_none_before(tmp_path):
  run = tmp_path / 'finished'
  run.mkdir()
  (run / 'config.json').write_text('{}')
  (run / 'results.json').write_text(json.dumps({'step': 3, 'eval': {'acc': 0.5}}))
  assert runs.final_eval(run) == {'acc': 0.5}
  assert runs.final_eval(tmp_path / 'never_started') is None
  (tmp_path / 'unfinished').mkdir()
  (tmp_path / 'unfinished' / 'config.json').write_text('{}')
  assert runs.final_eval(tmp_path / 'unfinished') is None
  (tmp_path / 'no_config').mkdir()
  (tmp_path / 'no_config' / 'results.json').write_text('{"eval": {}}')
  with pytest.raises(runs.RunsError, match='not a run directory'):
    runs.final_eval(tmp_path / 'no_config')
