"""Tests for common.metrics: metrics.jsonl, TensorBoard events, resume truncation, atomic JSON, ETA."""

import json
import math
import os
import pathlib
import time

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from common import metrics


def _scalars(events):
  return [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]


def test_writer_appends_jsonl_lines_with_step_and_split(tmp_path):
  w = metrics.MetricWriter(tmp_path, enabled=True)
  rec = w.write(1, 'train', {'loss': jnp.float32(2.5), 'n': np.int64(7), 'note': 'x'})
  w.write(2, 'eval', {'acc': np.array([0.75])})
  w.close()
  assert rec == {'step': 1, 'split': 'train', 'loss': 2.5, 'n': 7, 'note': 'x'}
  assert type(rec['loss']) is float and type(rec['n']) is int
  lines = [json.loads(ln) for ln in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  stamps = [ln.pop('time') for ln in lines]
  assert all(abs(t - time.time()) < 600 for t in stamps)  # wall clock, Unix seconds
  assert lines == [
    {'step': 1, 'split': 'train', 'loss': 2.5, 'n': 7, 'note': 'x'},
    {'step': 2, 'split': 'eval', 'acc': 0.75},
  ]
  assert metrics.read_jsonl(tmp_path / 'metrics.jsonl') == lines
  assert [
    r['time'] for r in metrics.read_jsonl(tmp_path / 'metrics.jsonl', wall_clock=True)
  ] == stamps


def test_writer_rejects_non_scalar_metrics(tmp_path):
  w = metrics.MetricWriter(tmp_path, enabled=True)
  with pytest.raises(ValueError, match='not a scalar'):
    w.write(1, 'train', {'loss': np.ones(3)})
  w.close()


def test_read_jsonl_of_missing_file_is_empty(tmp_path):
  assert metrics.read_jsonl(tmp_path / 'nope.jsonl') == []


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
  w = metrics.MetricWriter(tmp_path, enabled=True)
  w.write(1, 'train', {'loss': 3.0, 'note': 'skipped'})
  w.write(2, 'train', {'loss': 2.0})
  w.write(2, 'eval', {'loss': 2.5})
  w.flush()
  w.close()
  files = metrics.read_events(tmp_path)
  assert files and all(f.stat().st_size > 0 for f in files)
  events = [e for file_events in files.values() for e in file_events]
  assert sorted(_scalars(events)) == [
    (1, 'train/loss', 3.0),
    (2, 'eval/loss', 2.5),
    (2, 'train/loss', 2.0),
  ]


def test_resume_drops_later_lines_and_purges_tensorboard(tmp_path):
  w = metrics.MetricWriter(tmp_path, enabled=True)
  for step in range(1, 6):
    w.write(step, 'train', {'loss': float(step)})
    if step % 2 == 0:
      w.write(step, 'eval', {'loss': float(step) + 0.5})
  w.close()

  w = metrics.MetricWriter(tmp_path, resume_step=3, enabled=True)
  kept = metrics.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [(r['step'], r['split']) for r in kept] == [
    (1, 'train'),
    (2, 'train'),
    (2, 'eval'),
    (3, 'train'),
  ]
  w.write(4, 'train', {'loss': 40.0})
  w.close()
  rows = metrics.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [(r['step'], r['split'], r['loss']) for r in rows][-2:] == [
    (3, 'train', 3.0),
    (4, 'train', 40.0),
  ]
  assert not list(tmp_path.glob('*.tmp'))
  # TensorBoard purges steps >= 4 from the earlier file when it reads the second one.
  files = metrics.read_events(tmp_path)
  assert len(files) == 2  # one events file per writer process (start, then resume)
  starts = [
    e.step
    for events in files.values()
    for e in events
    if e.HasField('session_log') and e.session_log.status == event_pb2.SessionLog.START
  ]
  assert 4 in starts


def test_fresh_writer_starts_empty_and_resume_keeps_step_zero(tmp_path):
  lines = '{"step": 0, "split": "eval"}\n{"step": 5, "split": "train"}\n'
  (tmp_path / 'metrics.jsonl').write_text(lines)
  metrics.MetricWriter(tmp_path, resume_step=3, enabled=True).close()
  assert metrics.read_jsonl(tmp_path / 'metrics.jsonl') == [{'step': 0, 'split': 'eval'}]
  # A fresh start replays everything, a step-0 evaluation of the initial state included.
  (tmp_path / 'metrics.jsonl').write_text(lines)
  metrics.MetricWriter(tmp_path, enabled=True).close()
  assert metrics.read_jsonl(tmp_path / 'metrics.jsonl') == []


def test_disabled_writer_writes_nothing(tmp_path):
  existing = '{"split": "train", "step": 9}\n'
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'metrics.jsonl').write_text(existing)
  w = metrics.MetricWriter(other, resume_step=2, enabled=False)
  rec = w.write(10, 'train', {'loss': 1.0})
  w.flush()
  w.close()
  assert rec == {'step': 10, 'split': 'train', 'loss': 1.0}
  assert (other / 'metrics.jsonl').read_text() == existing  # not truncated by a non-zero process
  assert not (other / 'tensorboard').exists()

  w = metrics.MetricWriter(tmp_path / 'fresh_does_not_exist_yet', enabled=False)
  w.write(1, 'train', {'loss': 1.0})
  assert not (tmp_path / 'fresh_does_not_exist_yet').exists()


def test_writer_is_enabled_on_process_zero_by_default(tmp_path):
  w = metrics.MetricWriter(tmp_path)
  assert w.enabled
  w.close()


def test_write_json_is_atomic_and_replaces(tmp_path, monkeypatch):
  path = tmp_path / 'results.json'
  metrics.write_json(path, {'a': 1})
  seen = {}
  real_replace = os.replace

  def spy(src, dst):
    # At the moment of the rename the destination still holds the old, complete file and the
    # temporary one the complete new content.
    seen['old'] = json.loads(pathlib.Path(dst).read_text())
    seen['new'] = json.loads(pathlib.Path(src).read_text())
    real_replace(src, dst)

  monkeypatch.setattr(metrics.os, 'replace', spy)
  metrics.write_json(path, {'b': np.float32(0.5), 'c': jnp.int32(3), 'd': [1, 2]})
  assert seen == {'old': {'a': 1}, 'new': {'b': 0.5, 'c': 3, 'd': [1, 2]}}
  assert json.loads(path.read_text()) == {'b': 0.5, 'c': 3, 'd': [1, 2]}
  assert sorted(p.name for p in tmp_path.iterdir()) == ['results.json']


def test_write_json_failure_leaves_the_old_file(tmp_path):
  path = tmp_path / 'results.json'
  metrics.write_json(path, {'a': 1})
  with pytest.raises(ValueError):
    metrics.write_json(path, {'a': np.ones(3)})  # not a scalar
  assert json.loads(path.read_text()) == {'a': 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ['results.json']


def test_progress_rate_and_eta(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(metrics.time, 'perf_counter', lambda: now[0])
  p = metrics.Progress(start_step=10, num_steps=100)
  now[0] = 190.0
  first = p.update(11)  # the first step compiled for 90 s: no ETA from that
  assert first['with_compile']
  assert metrics.Progress.line(11, 100, {}, first).endswith('0.01 steps/s ETA after compilation')
  p.compiled(10)  # the first step's program is built (it may still be running)
  now[0] = 194.0
  speed = p.update(30)  # 20 steps in 4 s
  assert not speed['with_compile']
  assert speed['steps_per_sec'] == pytest.approx(5.0)
  assert speed['eta_sec'] == pytest.approx(14.0)  # 70 steps left at 5/s
  now[0] = 195.0
  speed = p.update(40)  # the rate is over the last window only: 10 steps in 1 s
  assert speed['steps_per_sec'] == pytest.approx(10.0)
  assert speed['eta_sec'] == pytest.approx(6.0)
  now[0] = 196.0
  assert math.isinf(p.update(40)['eta_sec'])
  line = metrics.Progress.line(40, 100, {'step': 40, 'loss': 1.234567, 'n': 3}, speed)
  assert line == 'step 40/100 loss=1.235 n=3 | 10.00 steps/s ETA 6s'


@pytest.mark.parametrize(
  'seconds, text',
  [
    (0, '0s'),
    (59.9, '59s'),
    (61, '1m01s'),
    (3725, '1h02m05s'),
    (float('inf'), '?'),
    (float('nan'), '?'),
  ],
)
def test_format_duration(seconds, text):
  assert metrics.format_duration(seconds) == text
