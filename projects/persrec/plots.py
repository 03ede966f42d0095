"""The README figure: test recall@10 and serving time per request vs history length.

Left: test recall_10 of finished runs (results.json) against the history window they read (full
and recent: P + R; persrec: P + R with P compressed into k tokens): the mean over the runs (seeds)
at each window with their range as error bars (runs of experiments/persrec/sweep.py). Right: the
measured per-request serving time (benchmarks/persrec_serving.py --json) against P, for the full
model, PerSRec's cached request and the recent-only model. The command line is
experiments/persrec/plots.py.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import pathlib
import statistics
from typing import Any


def run_points(runs: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """{arm: [(window P + R, test recall_10)]} from every finished run under `runs` (one per run)."""
  out: dict[str, list[tuple[int, float]]] = {}
  for res in sorted(runs.glob('*/results.json')):
    cfg = json.loads((res.parent / 'config.json').read_text())
    if cfg['data']['source'] != 'synthetic' or cfg['arm'] not in ('full', 'recent', 'persrec'):
      continue
    window = cfg['model']['old_len'] + cfg['model']['recent_len']
    out.setdefault(cfg['arm'], []).append(
      (window, json.loads(res.read_text())['eval']['test/recall_10'])
    )
  return {k: sorted(v) for k, v in out.items()}


def by_window(points: list[tuple[int, float]]) -> list[tuple[int, float, float, float, int]]:
  """(window, mean, min, max, n) over the runs (seeds) at each window."""
  groups: dict[int, list[float]] = {}
  for w, r in points:
    groups.setdefault(w, []).append(r)
  return [(w, statistics.mean(v), min(v), max(v), len(v)) for w, v in sorted(groups.items())]


def figure(
  points: dict[str, list[tuple[int, float]]],
  serving: Sequence[dict[str, Any]],
  title: str = 'synthetic histories: recall vs window',
):
  """The two-panel matplotlib figure from `run_points(...)` and the serving benchmark's JSON rows."""
  from matplotlib import figure as mpl_figure  # noqa: PLC0415
  import matplotlib.ticker  # noqa: PLC0415

  fig = mpl_figure.Figure(figsize=(10, 4), dpi=100)
  left, right = fig.subplots(1, 2)
  for arm, pts in points.items():
    rows = by_window(pts)
    xs, means = [r[0] for r in rows], [r[1] for r in rows]
    err = [
      [m - r[2] for m, r in zip(means, rows, strict=True)],
      [r[3] - m for m, r in zip(means, rows, strict=True)],
    ]
    n = max(r[4] for r in rows)
    left.errorbar(
      xs,
      means,
      yerr=err,
      fmt='o' if arm == 'recent' else '.-',
      capsize=3,
      label=f'{arm} (mean, range of {n} seeds)',
    )
  left.set(xscale='log', xlabel='history window P + R (items)', ylabel='test recall@10')
  left.set_title(title)
  for arm in ('full', 'persrec', 'recent'):
    pts = sorted(
      (r['old_len'], statistics.median(r['times']) * 1e3) for r in serving if r['arm'] == arm
    )
    if arm == 'recent':
      right.axhline(pts[0][1], linestyle='--', color='C2', label='recent (R only)')
    else:
      right.plot([x for x, _ in pts], [y for _, y in pts], '.-', label=arm)
  right.set(xscale='log', yscale='log', xlabel='old items P (R = 256)', ylabel='ms per request')
  right.tick_params(axis='x', labelrotation=45)
  right.set_title('serving time per request (median)')
  for ax in (left, right):  # ticks at the measured x values, in plain numbers
    xs = sorted(
      {
        round(x)
        for line in ax.get_lines()
        if line.get_linestyle() != '--'
        for x in line.get_xdata()
      }
    )  # '--': the recent-only reference line
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig
