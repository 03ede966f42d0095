"""Training-curve figures for the README: reward, zero-signal fraction and entropy per estimator.

RUNS_DIR holds run workdirs named g{G}_{estimator}_seed{S} (what experiments/ebpo/claims.py
writes); curves are the per-step train metrics averaged over seeds. The command line is
`python -m experiments.ebpo.report RUNS_DIR OUT.png`.
"""

from __future__ import annotations

import collections
import pathlib
import re

import numpy as np

from common import metrics

KEYS = ('reward_mean', 'zero_signal_frac', 'entropy', 'grad_norm')
_NAME = re.compile(r'g(\d+)_(\w+?)_seed(\d+)$')


def mean_curves(runs_dir: str | pathlib.Path) -> dict[tuple[int, str], dict[str, tuple]]:
  """{(G, estimator): {metric: (steps, mean over seeds)}} from the run workdirs."""
  runs = collections.defaultdict(list)
  for d in sorted(pathlib.Path(runs_dir).iterdir()):
    m = _NAME.match(d.name)
    if m and (d / 'metrics.jsonl').exists():
      rows = [r for r in metrics.read_jsonl(d / 'metrics.jsonl') if r['split'] == 'train']
      runs[(int(m.group(1)), m.group(2))].append(rows)
  out = {}
  for key, seeds in sorted(runs.items()):
    steps = [r['step'] for r in seeds[0]]
    out[key] = {k: (steps, np.mean([[r[k] for r in rows] for rows in seeds], axis=0)) for k in KEYS}
  return out


def figure(runs_dir: str | pathlib.Path, out: str | pathlib.Path) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  curves = mean_curves(runs_dir)
  fig, axes = plt.subplots(1, len(KEYS), figsize=(4 * len(KEYS), 3.2))
  for (g, est), by_key in curves.items():
    for ax, k in zip(axes, KEYS, strict=True):
      steps, ys = by_key[k]
      ax.plot(steps, ys, label=f'{est} G={g}', linestyle='-' if est == 'ebpo' else '--')
      ax.set_title(k)
      ax.set_xlabel('step')
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=90)
