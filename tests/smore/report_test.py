"""projects.smore.report: step times from TensorBoard stamps skip evaluations; one row per eval;
the constant-answer floor only for reasoning-gym runs."""

import json

import tensorboardX

from projects.smore import report


def _run(path, times, evals, resumed_times=None):
  path.mkdir()
  (path / 'config.json').write_text(json.dumps({'train': {'eval_every': 20}}))
  (path / 'adapter_plan.json').write_text(json.dumps({'real_count': 1234}))
  rows = [{'step': s, 'split': 'train', 'ce': 1.0 / s} for s in times]
  rows += [{'step': s, 'split': 'eval', 'accuracy': a, 'acc_x': a} for s, a in evals.items()]
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  w = tensorboardX.SummaryWriter(str(path / 'tensorboard'))
  for step, t in times.items():
    w.add_scalar('train/loss', 1.0, step, walltime=t)
  w.close()
  if resumed_times:  # a second process (killed, then resumed): its own events file
    w = tensorboardX.SummaryWriter(str(path / 'tensorboard'), filename_suffix='.resumed')
    for step, t in resumed_times.items():
      w.add_scalar('train/loss', 1.0, step, walltime=t)
    w.close()


def test_step_time_leaves_out_intervals_with_an_evaluation(tmp_path):
  # 2 s/step, except that the evaluation after step 20 costs 100 s.
  times = {10: 1000.0, 20: 1020.0, 30: 1140.0, 40: 1160.0}
  _run(tmp_path / 'lora_seed0', times, {20: 0.25, 40: 0.5})
  assert report.step_seconds(tmp_path / 'lora_seed0') == [2.0, 2.0]
  s = report.runs(tmp_path)['lora_seed0']
  assert s['sec_per_step'] == (2.0, 2.0, 2.0) and s['trainable'] == 1234
  lines = report.table({'lora_seed0': s}).splitlines()
  assert lines[0].endswith('| x |') and len(lines) == 4
  assert lines[3] == '| lora_seed0 | 1,234 | 2.0 (2.0-2.0) | 40 | 0.500 | 0.50 |'


def test_step_time_does_not_pair_logs_across_a_resume(tmp_path):
  # Killed after step 10, resumed an hour later from a checkpoint at step 9: 2 s/step in each
  # process; the hour between step 10 and step 12 is not training time.
  _run(tmp_path / 'lora_seed0', {8: 1000.0, 10: 1004.0}, {}, resumed_times={12: 4600.0, 14: 4604.0})
  assert report.step_seconds(tmp_path / 'lora_seed0') == [2.0, 2.0]


def test_constant_answer_is_each_tasks_most_common_train_answer():
  train = [('a', 'Yes'), ('a', 'Yes'), ('a', 'No'), ('b', '3'), ('b', '1'), ('b', '1')]
  test = [('a', 'Yes'), ('a', 'No'), ('a', 'Yes'), ('a', 'Yes'), ('b', '1'), ('b', '2')]
  out = report.constant_answer(train, test)
  assert out == {'accuracy': 4 / 6, 'acc_a': 0.75, 'acc_b': 0.5}


def test_runs_table_has_no_constant_row_for_token_task_runs(tmp_path):
  _run(tmp_path / 'lora_seed0', {10: 1000.0, 20: 1020.0}, {20: 0.25})
  config = json.loads((tmp_path / 'lora_seed0' / 'config.json').read_text())
  config['data'] = {'source': 'token_tasks'}
  (tmp_path / 'lora_seed0' / 'config.json').write_text(json.dumps(config))
  text, summaries = report.runs_table(tmp_path)
  assert list(summaries) == ['lora_seed0']
  assert text == report.table(summaries)
