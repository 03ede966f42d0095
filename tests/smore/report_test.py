"""projects.smore.report: the table's step time is common.runs' steady-state one (sub-second steps
shown, evaluations and restarts left out); one row per eval; the constant-answer floor only for
reasoning-gym runs; the figure colours by configuration and never joins tasks with a line."""

import json

import pytest

from common import runs
from projects.smore import report


def _run(path, preset, seed, times, evals, starts=None):
  """A workdir as a run writes it: train lines at `times` ({step: wall clock}), evals {step: acc}."""
  path.mkdir(parents=True)
  config = {
    'seed': seed,
    'adapter': {'preset': preset},
    'data': {'source': 'token_tasks'},
    'train': {'num_steps': max(times), 'eval_every': 20},
  }
  (path / 'config.json').write_text(json.dumps(config))
  (path / 'adapter_plan.json').write_text(json.dumps({'real_count': 1234}))
  (path / 'run.json').write_text(json.dumps({'starts': starts or [], 'status': 'finished'}))
  rows = [{'step': s, 'split': 'train', 'ce': 1.0 / s, 'time': t} for s, t in times.items()]
  for s, acc in evals.items():
    row = {'step': s, 'split': 'eval', 'accuracy': acc, 'acc_x': acc, 'acc_y': acc / 2}
    rows.append({**row, 'time': times[s] + 50.0})
  rows.sort(key=lambda r: (r['step'], r['split'] == 'eval'))
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))


def test_table_step_time_is_the_steady_state_one_and_shows_fast_steps(tmp_path):
  # 5 ms per step, except that the evaluation after step 20 costs 50 s: no longer printed as 0.0.
  times = {10: 1000.0, 20: 1000.05, 30: 1050.1, 40: 1050.15}
  _run(tmp_path / 'lora_seed0', 'lora', 0, times, {20: 0.25, 40: 0.5})
  text, records = report.runs_table(tmp_path)
  assert report.summarize(records[0])['sec_per_step'] == pytest.approx(0.005)
  assert runs.seconds_per_step(records[0]) == pytest.approx(0.005)
  lines = text.splitlines()
  assert lines[0] == '| run | trainable | s/step | eval step | accuracy | x | y |'
  assert lines[2:] == [
    '| lora_seed0 | 1,234 | 0.005 | 20 | 0.250 | 0.25 | 0.12 |',
    '| lora_seed0 | 1,234 | 0.005 | 40 | 0.500 | 0.50 | 0.25 |',
  ]


def test_step_time_does_not_pair_logs_across_a_resume(tmp_path):
  # Killed after step 10, resumed an hour later from a checkpoint at step 9: 2 s/step in each
  # start; the hour between step 10 and step 12 is not training time.
  starts = [{'start': '2026-01-01T00:00:00+00:00'}, {'start': '2026-01-01T01:00:00+00:00'}]
  t0 = 1767225600.0  # 2026-01-01T00:00:00Z
  times = {8: t0 + 10, 10: t0 + 14, 12: t0 + 3610, 14: t0 + 3614}
  _run(tmp_path / 'lora_seed0', 'lora', 0, times, {}, starts=starts)
  (record,) = runs.expand([str(tmp_path)])
  assert report.summarize(record)['sec_per_step'] == pytest.approx(2.0)


def test_constant_answer_is_each_tasks_most_common_train_answer():
  train = [('a', 'Yes'), ('a', 'Yes'), ('a', 'No'), ('b', '3'), ('b', '1'), ('b', '1')]
  test = [('a', 'Yes'), ('a', 'No'), ('a', 'Yes'), ('a', 'Yes'), ('b', '1'), ('b', '2')]
  out = report.constant_answer(train, test)
  assert out == {'accuracy': 4 / 6, 'acc_a': 0.75, 'acc_b': 0.5}


def test_runs_table_has_no_constant_row_for_token_task_runs(tmp_path):
  _run(tmp_path / 'lora_seed0', 'lora', 0, {10: 1000.0, 20: 1020.0}, {20: 0.25})
  text, records = report.runs_table(tmp_path)
  assert [r.name for r in records] == ['lora_seed0']
  assert text == report.table({'lora_seed0': report.summarize(records[0])})


def test_figure_one_colour_per_configuration_and_tasks_are_not_joined(tmp_path, saved_figures):
  for preset in ('lora', 'smore22'):
    for seed in (0, 1):
      acc = 0.5 + 0.1 * seed + (0.2 if preset == 'lora' else 0.0)
      _run(tmp_path / f'{preset}_seed{seed}', preset, seed, {10: 0.0, 20: 1.0}, {20: acc})
  records = runs.expand([str(tmp_path)])
  assert report.final_task_accuracy(records) == {
    'adapter.preset=lora': {'x': pytest.approx([0.7, 0.8]), 'y': pytest.approx([0.35, 0.4])},
    'adapter.preset=smore22': {'x': pytest.approx([0.5, 0.6]), 'y': pytest.approx([0.25, 0.3])},
  }
  out = report.figure(records, tmp_path / 'plots' / 'curves.png')
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  ce, accuracy, tasks = saved_figures[0].axes
  assert [ce.get_title(), accuracy.get_title()] == ['train/ce', 'eval/accuracy']
  # Per configuration: two seeds (thin) and their mean, all in the configuration's colour.
  colours = [line.get_color() for line in ce.lines]
  assert len(colours) == 6 and len(set(colours[:3])) == 1 and len(set(colours[3:])) == 1
  assert colours[0] != colours[3]
  assert [t.get_text() for t in ce.get_legend().get_texts()] == [
    'adapter.preset=lora (2 seeds)',
    'adapter.preset=smore22 (2 seeds)',
  ]
  # The task axis: a bar per configuration and task, seeds as dots, no line between tasks.
  assert len(tasks.patches) == 4
  assert all(line.get_linestyle() == 'None' for line in tasks.lines)
  assert [t.get_text() for t in tasks.get_xticklabels()] == ['x', 'y']
  assert {line.get_color() for line in tasks.lines} == set(colours)
