"""Figures of BlockPruner runs: held-out perplexity and MC accuracy vs removed parameters per
method, and which blocks went first (the removal order on the layer x {MHA, MLP} grid).

`figure(runs)` takes {label: workdir} of finished (or partial) runs and reads their metrics.jsonl
eval rows; experiments/blockpruner/plots.py is the command line.
"""

from __future__ import annotations

from collections.abc import Mapping
import pathlib

import numpy as np

from common import metrics
from projects.blockpruner import evaluate
from projects.blockpruner import models


def removal_order(workdir: pathlib.Path) -> list[models.Block]:
  """Blocks removed so far, in order (metrics.jsonl train rows; also for a run still going)."""
  rows = metrics.read_jsonl(workdir / 'metrics.jsonl')
  names = [n for r in rows if r.get('split') == 'train' for n in r['removed'].split('+')]
  return [(int(n[3:]), n[:3]) for n in names]


def order_grid(order: list[models.Block], num_layers: int) -> np.ndarray:
  """float [2, num_layers]: the step at which each (kind, layer) block was removed (NaN: kept)."""
  grid = np.full((2, num_layers), np.nan)
  for step, (layer, kind) in enumerate(order, start=1):
    grid[models.KINDS.index(kind), layer] = step
  return grid


def figure(runs: Mapping[str, pathlib.Path], num_layers: int, order_of: str, title: str = ''):
  """Perplexity per held-out source and MC accuracy vs removed parameters (one curve per run), and
  the removal order of run `order_of`."""
  from matplotlib import figure as mpl_figure  # noqa: PLC0415

  keys = ('rdocs/perplexity', 'chatterbot/perplexity', 'mc/mean')
  fig = mpl_figure.Figure(figsize=(20, 4.2))
  axes = fig.subplots(1, 4)
  for label, workdir in runs.items():
    rows = metrics.read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl')
    for ax, key in zip(axes[:3], keys, strict=True):
      pts = evaluate.curve(rows, key)
      if pts:
        xs, ys = zip(*pts, strict=True)
        ax.plot(np.asarray(xs) / 1e6, ys, marker='o', ms=3, label=label)
  for ax, key in zip(axes[:3], keys, strict=True):
    ax.set_xlabel('removed parameters (M)')
    ax.set_ylabel(key + (' (log scale)' if key.endswith('perplexity') else ''))
    if key.endswith('perplexity'):
      ax.set_yscale('log')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  grid = order_grid(removal_order(pathlib.Path(runs[order_of])), num_layers)
  im = axes[3].imshow(grid, aspect='auto', cmap='viridis_r')
  axes[3].set_yticks([0, 1], ['MHA', 'MLP'])
  axes[3].set_xlabel('layer')
  axes[3].set_title(f'{order_of}: removal step (blank: kept)')
  fig.colorbar(im, ax=axes[3])
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig
