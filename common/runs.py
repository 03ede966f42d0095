"""Look at runs of any paper: a results table, what differs between runs, and curves.

    python -m common.runs summarize RUN [RUN ...] [--metrics=eval/pass_at_1,train/loss]
    python -m common.runs compare RUN [RUN ...]
    python -m common.runs plot RUN [RUN ...] --metrics=train/loss,eval/pass_at_1 --out=curves.png

A RUN is a workdir (or a directory holding workdirs: each subdirectory with a config.json counts).
Everything is read from what every run writes (common.train_loop.Run): config.json, run.json,
metrics.jsonl (with wall-clock stamps) and results.json, so no paper needs its own report script
for these views.

  summarize  one row per run: status, steps done / planned, wall time (run.json), steady-state
             seconds per step (the median gap between consecutive train lines of one start, with
             the first line of a start (compilation) and gaps spanning an evaluation left out),
             and the final metrics (results.json, else the last logged values).
  compare    the config keys whose values differ between the runs (seed included), then the
             summary with those columns: what changed and what it did.
  plot       one panel per metric, one colour per configuration (the runs' configs minus the
             seed), seeds of one configuration as thin lines of that colour around their mean.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import json
import math
import os
import pathlib
import statistics
import sys
from typing import Any

from common import config as config_lib
from common import metrics as metrics_lib

SEED_KEYS = ('seed',)


@dataclasses.dataclass
class RunRecord:
  """What one workdir holds."""

  path: pathlib.Path
  config: dict
  provenance: dict
  rows: list[dict]  # metrics.jsonl lines, wall-clock stamps included
  results: dict | None

  @property
  def name(self) -> str:
    return self.path.name

  def final(self, split: str, key: str) -> float | None:
    """results.json's value, else the last logged one."""
    if self.results and key in self.results.get(split, {}):
      return self.results[split][key]
    values = [r[key] for r in self.rows if r.get('split') == split and key in r]
    return values[-1] if values else None

  def curve(self, split: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r['step'], r[key]) for r in self.rows if r.get('split') == split and key in r]
    return [s for s, _ in points], [v for _, v in points]


class RunsError(ValueError):
  """A path that is not a run (one line, exit 2)."""


def load(path: str | os.PathLike) -> RunRecord:
  p = pathlib.Path(path)
  if not (p / 'config.json').is_file():
    raise RunsError(f'{p} is not a run directory (no config.json)')
  read = lambda name: json.loads((p / name).read_text()) if (p / name).is_file() else None  # noqa: E731
  return RunRecord(
    path=p,
    config=read('config.json'),
    provenance=read('run.json') or {},
    rows=metrics_lib.read_jsonl(p / 'metrics.jsonl', wall_clock=True),
    results=read('results.json'),
  )


def final_eval(path: str | os.PathLike) -> dict | None:
  """The eval metrics a finished run wrote (results.json's 'eval'); None while it has not finished
  or never started, so seed tables can tabulate what exists while other seeds still run."""
  p = pathlib.Path(path)
  if not (p / 'results.json').is_file():
    return None
  return load(p).results['eval']


def expand(paths: Sequence[str]) -> list[RunRecord]:
  """Runs named directly, or every run one level below a directory that is not itself a run."""
  out = []
  for path in paths:
    p = pathlib.Path(path)
    if (p / 'config.json').is_file():
      out.append(load(p))
    elif p.is_dir() and (subs := sorted(d for d in p.iterdir() if (d / 'config.json').is_file())):
      out.extend(load(d) for d in subs)
    else:
      raise RunsError(f'{p} is neither a run nor a directory of runs')
  if not out:
    raise RunsError('no runs given')
  return out


# ---------------------------------------------------------------------------------------------------
# Derived numbers.


def differing_keys(runs: Sequence[RunRecord], *, ignore: Sequence[str] = ()) -> list[str]:
  """Config keys (dotted) whose values are not the same in every run."""
  flat = [config_lib.flatten(r.config) for r in runs]
  keys = sorted(set().union(*flat))
  return [
    k
    for k in keys
    if k not in ignore and len({json.dumps(f.get(k, '<absent>'), sort_keys=True) for f in flat}) > 1
  ]


def seconds_per_step(run: RunRecord) -> float | None:
  """Median wall seconds per step between consecutive train lines of one start, leaving out each
  start's first line (it includes compilation) and gaps that contain an evaluation."""
  starts = sorted(
    _timestamp(s['start']) for s in run.provenance.get('starts', []) if s.get('start') is not None
  )
  gaps, previous, seen_eval = [], None, False
  for r in run.rows:
    t = r.get(metrics_lib.WALL_CLOCK)
    if t is None:
      continue
    if r.get('split') != 'train':
      seen_eval = True
      continue
    if previous is not None and not seen_eval and r['step'] > previous[0]:
      restarted = any(previous[1] < s <= t for s in starts)
      if not restarted:
        gaps.append((t - previous[1]) / (r['step'] - previous[0]))
    previous, seen_eval = (r['step'], t), False
  return statistics.median(gaps) if gaps else None


def _timestamp(iso: str) -> float:
  import datetime  # noqa: PLC0415

  return datetime.datetime.fromisoformat(iso).timestamp()


def last_step(run: RunRecord) -> int:
  if run.results:
    return int(run.results['step'])
  return max((int(r['step']) for r in run.rows), default=0)


def default_metrics(runs: Sequence[RunRecord]) -> list[str]:
  """eval/* of the first run's results (else its last eval line), plus train/loss."""
  first = runs[0]
  evals = list((first.results or {}).get('eval', {}))
  if not evals:
    evals = [k for r in first.rows if r.get('split') == 'eval' for k in r][-8:]
  keys = [f'eval/{k}' for k in dict.fromkeys(evals) if k not in ('step', 'split', 'time')]
  return keys[:6] + ['train/loss']


# ---------------------------------------------------------------------------------------------------
# Views.


def _fmt(v: Any) -> str:
  if v is None:
    return '-'
  if isinstance(v, float):
    if not math.isfinite(v):
      return str(v)
    return f'{v:.4g}'
  return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(_fmt(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def summarize(
  runs: Sequence[RunRecord], metric_keys: Sequence[str], extra: Sequence[str] = ()
) -> str:
  """A markdown table, one row per run (see the module docstring)."""
  header = ['run', *extra, 'status', 'steps', 'wall', 's/step', *metric_keys]
  rows = []
  for r in runs:
    flat = config_lib.flatten(r.config)
    planned = flat.get('train.num_steps')
    wall = r.provenance.get('wall_time_sec')
    rows.append(
      [
        r.name,
        *[flat.get(k) for k in extra],
        r.provenance.get('status', 'finished' if r.results else '?'),
        f'{last_step(r)}/{planned}',
        metrics_lib.format_duration(wall) if wall is not None else None,
        seconds_per_step(r),
        *[r.final(*k.split('/', 1)) for k in metric_keys],
      ]
    )
  return _table(header, rows)


def compare(runs: Sequence[RunRecord], metric_keys: Sequence[str]) -> str:
  keys = differing_keys(runs)
  head = 'configs differ in: ' + (', '.join(keys) if keys else 'nothing (same config)')
  return head + '\n\n' + summarize(runs, metric_keys, extra=keys)


def groups(runs: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
  """Runs by configuration (config minus seed), labelled by the keys that tell them apart."""
  keys = differing_keys(runs, ignore=SEED_KEYS)
  out: dict[str, list[RunRecord]] = {}
  for r in runs:
    flat = config_lib.flatten(r.config)
    label = ', '.join(f'{k}={flat.get(k)}' for k in keys) or 'all runs'
    out.setdefault(label, []).append(r)
  return out


def draw(ax: Any, grouped: Mapping[str, Sequence[RunRecord]], key: str) -> None:
  """One panel of `plot` on a matplotlib Axes: metric `key` ('split/name') of each configuration
  of `grouped` (`groups`), the i-th in the i-th colour of matplotlib's cycle, its seeds as thin
  lines of that colour around their mean (a curve of one point is drawn as a marker)."""
  import matplotlib  # noqa: PLC0415

  colours = matplotlib.rcParams['axes.prop_cycle'].by_key()['color']
  split, name = key.split('/', 1)
  for i, (label, members) in enumerate(grouped.items()):
    colour = colours[i % len(colours)]
    curves = [m.curve(split, name) for m in members]
    for steps, values in curves:
      if len(members) > 1:
        ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8, marker=_dot(steps))
    common_steps = sorted(set.intersection(*(set(s) for s, _ in curves))) if curves else []
    if common_steps:
      mean = [statistics.fmean(v[s.index(x)] for s, v in curves) for x in common_steps]
      seeds = f' ({len(members)} seeds)' if len(members) > 1 else ''
      ax.plot(
        common_steps, mean, color=colour, linewidth=1.8, label=label + seeds, marker=_dot(mean)
      )
  ax.set_title(key)
  ax.set_xlabel('step')


def _dot(points: Sequence) -> str | None:
  return 'o' if len(points) == 1 else None


def plot(runs: Sequence[RunRecord], metric_keys: Sequence[str], out: pathlib.Path) -> pathlib.Path:
  from matplotlib import figure as mpl_figure  # noqa: PLC0415

  grouped = groups(runs)
  fig = mpl_figure.Figure(figsize=(4.2 * len(metric_keys), 3.2))
  axes = fig.subplots(1, len(metric_keys), squeeze=False)
  for ax, key in zip(axes[0], metric_keys, strict=True):
    draw(ax, grouped, key)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m common.runs', description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument('command', choices=('summarize', 'compare', 'plot'))
  parser.add_argument('runs', nargs='+', help='run workdirs, or directories of runs')
  parser.add_argument('--metrics', default='', help='split/key,... (default: eval/*, train/loss)')
  parser.add_argument('--out', default='runs.png', help='plot: the PNG to write')
  args = parser.parse_args(argv)
  try:
    runs = expand(args.runs)
  except RunsError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  keys = [k.strip() for k in args.metrics.split(',') if k.strip()] or default_metrics(runs)
  bad = [k for k in keys if '/' not in k]
  if bad:
    print(
      f'error: --metrics wants split/key (e.g. eval/pass_at_1), got {bad[0]!r}', file=sys.stderr
    )
    return 2
  if args.command == 'summarize':
    print(summarize(runs, keys))
  elif args.command == 'compare':
    print(compare(runs, keys))
  else:
    print(plot(runs, keys, pathlib.Path(args.out)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
