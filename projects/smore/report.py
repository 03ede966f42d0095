"""S'MoRE's results table and figure of a set of adapter runs, for the README (command line:
`python -m experiments.smore.report RUNS_DIR [OUT.png]`).

RUNS_DIR holds run workdirs (every subdirectory with a config.json, e.g. what
experiments/smore/claims.py writes: lora_seed0, smore22_seed0, ...). Only what is S'MoRE's own is
here; the rest is common.runs, as for every paper:
  * the table: one markdown row per run and evaluation with the trainable parameters (the real leaf
    count from adapter_plan.json), the steady-state seconds per step (`runs.seconds_per_step`:
    the median gap between train logs of one start, without compilation, evaluations or restarts;
    compare runs only when they ran under the same load), held-out exact-match accuracy and the
    accuracy of each task. For reasoning-gym runs the first row is the constant-answer floor on
    the same questions (`constant_answer`).
  * the figure: the training cross-entropy and held-out accuracy per configuration (`runs.draw`:
    one colour per configuration, its seeds as thin lines around their mean) and the final
    accuracy of each task, a category axis: each configuration's seed mean as a bar, its seeds as
    dots, in the same colours and never joined across tasks.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import json
import pathlib
import statistics

from common import runs as runs_lib

CURVES = ('train/ce', 'eval/accuracy')


def _plan(run: runs_lib.RunRecord) -> dict:
  path = run.path / 'adapter_plan.json'
  return json.loads(path.read_text()) if path.is_file() else {}


def evals(run: runs_lib.RunRecord) -> dict[int, dict]:
  """{step: eval metrics} of a run's evaluations (metrics.jsonl)."""
  return {
    r['step']: {k: v for k, v in r.items() if k not in ('step', 'split')}
    for r in run.rows
    if r.get('split') == 'eval'
  }


def tasks_of(summaries: dict[str, dict]) -> list[str]:
  """The task names of every 'acc_<task>' key in the summaries' evaluations, sorted."""
  return sorted(
    {k[4:] for s in summaries.values() for e in s['evals'].values() for k in e if k[:4] == 'acc_'}
  )


def summarize(run: runs_lib.RunRecord) -> dict:
  """A table row group: trainable count, steady-state s/step, evaluations by step."""
  return {
    'trainable': _plan(run).get('real_count'),
    'sec_per_step': runs_lib.seconds_per_step(run),
    'evals': evals(run),
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


def constant_row(run: runs_lib.RunRecord) -> dict | None:
  """The constant-answer summary for a reasoning-gym run's data (None for other data)."""
  import ml_collections  # noqa: PLC0415

  from projects.smore import input_pipeline  # noqa: PLC0415

  config = ml_collections.ConfigDict(run.config)
  if config.data.source != 'reasoning_gym':
    return None
  train, test = (input_pipeline.rg_answers(config, split) for split in ('train', 'test'))
  return {'trainable': 0, 'sec_per_step': None, 'evals': {'-': constant_answer(train, test)}}


def table(summaries: dict[str, dict]) -> str:
  tasks = tasks_of(summaries)
  head = ['run', 'trainable', 's/step', 'eval step', 'accuracy', *tasks]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, s in summaries.items():
    t = s['sec_per_step']
    trainable = f'{s["trainable"]:,}' if s['trainable'] is not None else '-'
    for step, e in sorted(s['evals'].items()) or [('-', {})]:
      acc = f'{e["accuracy"]:.3f}' if e else '-'
      cells = [name, trainable, f'{t:.3g}' if t is not None else '-', str(step), acc]
      cells += [f'{e[f"acc_{k}"]:.2f}' if f'acc_{k}' in e else '-' for k in tasks]
      lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def runs_table(runs_dir: str | pathlib.Path) -> tuple[str, list[runs_lib.RunRecord]]:
  """(the markdown table of the runs in `runs_dir`, headed by the constant-answer floor of their
  data when it is reasoning-gym, and the runs)."""
  records = runs_lib.expand([str(runs_dir)])
  summaries = {r.name: summarize(r) for r in records}
  constant = constant_row(records[0])
  rows = ({'constant (most common train answer)': constant} if constant else {}) | summaries
  return table(rows), records


def final_task_accuracy(records: Sequence[runs_lib.RunRecord]) -> dict[str, dict[str, list]]:
  """{configuration (runs.groups' label): {task: [final accuracy of each seed]}}."""
  out = {}
  for label, members in runs_lib.groups(records).items():
    per_task = collections.defaultdict(list)
    for run in members:
      by_step = evals(run)
      last = by_step[max(by_step)] if by_step else {}
      for k, v in last.items():
        if k.startswith('acc_'):
          per_task[k[4:]].append(v)
    out[label] = dict(per_task)
  return out


def figure(records: Sequence[runs_lib.RunRecord], out: str | pathlib.Path) -> pathlib.Path:
  """The README's figure (see the module docstring); returns its path."""
  import matplotlib  # noqa: PLC0415
  from matplotlib import figure as mpl_figure  # noqa: PLC0415

  grouped = runs_lib.groups(records)
  finals = final_task_accuracy(records)
  tasks = sorted({t for per_task in finals.values() for t in per_task})
  fig = mpl_figure.Figure(figsize=(4.2 * len(CURVES) + max(4.0, 0.9 * len(tasks)), 3.6))
  axes = fig.subplots(1, len(CURVES) + 1)
  for ax, key in zip(axes, CURVES, strict=False):
    runs_lib.draw(ax, grouped, key)
  ax = axes[-1]
  colours = matplotlib.rcParams['axes.prop_cycle'].by_key()['color']  # runs.draw's colours
  width = 0.8 / max(1, len(finals))
  for i, per_task in enumerate(finals.values()):
    colour = colours[i % len(colours)]
    for j, task in enumerate(tasks):
      x = j - 0.4 + width * (i + 0.5)
      values = per_task.get(task, [])
      if values:
        ax.bar(x, statistics.fmean(values), width=width * 0.9, color=colour, alpha=0.5)
        ax.plot([x] * len(values), values, 'o', color=colour, markersize=3)
  ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha='right', fontsize=8)
  ax.set(title='held-out exact match per task, final', ylim=(0, 1))
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=100)
  return out
