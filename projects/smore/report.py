"""Results table and training curves of a set of adapter runs, for the README (command line:
`python -m experiments.smore.report RUNS_DIR [OUT.png]`).

RUNS_DIR holds run workdirs named {name}_seed{S} (what experiments/smore/claims.py writes, e.g.
lora_seed0, smore22_seed0). The table has one markdown row per run and evaluation: trainable
parameters (the real leaf count from adapter_plan.json), training step time, and held-out exact-match
accuracy (overall and per task) at each evaluation. Step time comes from the wall-clock stamps
of the TensorBoard events of consecutive train logs, leaving out intervals that contain an
evaluation or the first compile, so it is the steady-state median (and range) of one run on its
own machine: compare runs only when they ran under the same load (a resumed run's processes are
timed apart, never across the restart). For reasoning-gym runs the first row is the
constant-answer floor on the same questions (`constant_answer`).
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
import statistics

from common import metrics

_NAME = re.compile(r'(\w+?)_seed(\d+)$')


def event_times(workdir: pathlib.Path, tag: str = 'train/loss') -> list[dict[int, float]]:
  """{step: wall time} of a scalar tag, one dict per writer process (TensorBoard events file).

  A resumed run has one events file per process: pairing a log of the killed process with the
  resumed one's would time the gap between them (hours) as training.
  """
  segments = [
    {int(e.step): float(e.wall_time) for e in events if any(v.tag == tag for v in e.summary.value)}
    for events in metrics.read_events(workdir).values()
  ]
  return [seg for seg in segments if seg]


def step_seconds(workdir: pathlib.Path) -> list[float]:
  """Seconds per train step between consecutive train logs of one process, without an evaluation
  in between."""
  train = json.loads((workdir / 'config.json').read_text())['train']
  out = []
  for times in event_times(workdir):
    steps = sorted(times)
    for a, b in zip(steps, steps[1:], strict=False):
      if any(s % train['eval_every'] == 0 for s in range(a, b)):
        continue  # the evaluation after step a (and its compile) is in this interval
      out.append((times[b] - times[a]) / (b - a))
  return out


def summarize(workdir: pathlib.Path) -> dict:
  rows = metrics.read_jsonl(workdir / 'metrics.jsonl')
  plan = json.loads((workdir / 'adapter_plan.json').read_text())
  secs = step_seconds(workdir)
  return {
    'trainable': plan['real_count'],
    'sec_per_step': (statistics.median(secs), min(secs), max(secs)) if secs else None,
    'evals': {r['step']: r for r in rows if r['split'] == 'eval'},
    'train': [r for r in rows if r['split'] == 'train'],
  }


def runs(runs_dir: str | pathlib.Path) -> dict[str, dict]:
  return {
    d.name: summarize(d)
    for d in sorted(pathlib.Path(runs_dir).iterdir())
    if _NAME.match(d.name) and (d / 'metrics.jsonl').exists() and (d / 'adapter_plan.json').exists()
  }


def constant_answer(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> dict:
  """Exact-match accuracy of answering every question of a task with that task's most common
  train answer: the floor a fine-tuned adapter must beat to have learned more than the format.

  Returns {'accuracy': over all test questions, 'acc_<task>': per task}, as the runs' evals.
  """
  by_task: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for task, answer in train:
    by_task[task][answer] += 1
  guess = {t: c.most_common(1)[0][0] for t, c in by_task.items()}
  hits: dict[str, list[bool]] = collections.defaultdict(list)
  for task, answer in test:
    hits[task].append(guess.get(task) == answer)
  out = {'accuracy': sum(sum(h) for h in hits.values()) / max(1, len(test))}
  out.update({f'acc_{t}': sum(h) / len(h) for t, h in hits.items()})
  return out


def constant_row(workdir: pathlib.Path) -> dict | None:
  """The constant-answer summary for a reasoning-gym run's data (None for other data)."""
  import ml_collections  # noqa: PLC0415

  from projects.smore import input_pipeline  # noqa: PLC0415

  config = ml_collections.ConfigDict(json.loads((workdir / 'config.json').read_text()))
  if config.data.source != 'reasoning_gym':
    return None
  train, test = (input_pipeline.rg_answers(config, split) for split in ('train', 'test'))
  return {
    'trainable': 0,
    'sec_per_step': None,
    'evals': {'-': constant_answer(train, test)},
    'train': [],
  }


def table(summaries: dict[str, dict]) -> str:
  tasks = sorted(
    {k[4:] for s in summaries.values() for e in s['evals'].values() for k in e if k[:4] == 'acc_'}
  )
  head = ['run', 'trainable', 's/step (median, range)', 'eval step', 'accuracy', *tasks]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, s in summaries.items():
    t = s['sec_per_step']
    time_cell = f'{t[0]:.1f} ({t[1]:.1f}-{t[2]:.1f})' if t else '-'
    for step, e in sorted(s['evals'].items()) or [('-', {})]:
      acc = f'{e["accuracy"]:.3f}' if e else '-'
      cells = [name, f'{s["trainable"]:,}', time_cell, str(step), acc]
      cells += [f'{e[f"acc_{k}"]:.2f}' if f'acc_{k}' in e else '-' for k in tasks]
      lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def runs_table(runs_dir: str | pathlib.Path) -> tuple[str, dict[str, dict]]:
  """(the markdown table of the runs in `runs_dir`, headed by the constant-answer floor of their
  data when it is reasoning-gym, and the runs' summaries)."""
  summaries = runs(runs_dir)
  constant = constant_row(pathlib.Path(runs_dir) / next(iter(summaries))) if summaries else None
  rows = ({'constant (most common train answer)': constant} if constant else {}) | summaries
  return table(rows), summaries


def figure(summaries: dict[str, dict], out: str | pathlib.Path) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, (ax_ce, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.4))
  for name, s in summaries.items():
    ax_ce.plot([r['step'] for r in s['train']], [r['ce'] for r in s['train']], label=name)
    last = s['evals'][max(s['evals'])] if s['evals'] else {}
    tasks = sorted(k for k in last if k.startswith('acc_'))
    ax_acc.plot([k[4:] for k in tasks], [last[k] for k in tasks], marker='o', label=name)
  ax_ce.set(title='train cross-entropy (reply tokens)', xlabel='step')
  ax_acc.set(title='held-out exact match, final', ylim=(0, 1))
  ax_acc.tick_params(axis='x', labelrotation=20, labelsize=8)
  ax_ce.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=90)
