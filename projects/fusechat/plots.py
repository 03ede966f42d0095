"""Per-skill bars of a FuseChat run: accuracy and held-out nats per byte on each skill (code-ish
string tasks, R documentation text) for the pivot, each source, each fused target and each merge.

Bars rather than a table because the question is one of ordering per skill: does a fused target
move towards its source's strong skill, and does a merge keep both. `figure(eval_metrics, names)` takes a
run's final eval row (results.json's 'eval'); experiments/fusechat/plots.py is the command line.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np

from projects.fusechat import corpora
from projects.fusechat import evaluate

CHANCE = 1 / len(corpora.OPS)  # a code item offers one result per operation; text items as many


def figure(eval_metrics: Mapping[str, float], names: Sequence[str], title: str = ''):
  """Two panels over `names` (train.model_names): accuracy per skill (chance dashed), nats per byte per skill."""
  from matplotlib import figure as mpl_figure  # noqa: PLC0415

  missing = [n for n in names if f'{n}/code/acc' not in eval_metrics]
  if missing:
    raise ValueError(
      f'no per-skill accuracy (<model>/code/acc) for {missing} in these eval metrics'
    )
  x = np.arange(len(names))
  fig = mpl_figure.Figure(figsize=(12, 3.8))
  axes = fig.subplots(1, 2)
  for ax, (metric, label) in zip(
    axes, (('acc', 'accuracy'), ('nll_byte', 'held-out nats per byte')), strict=True
  ):
    for i, skill in enumerate(evaluate.SKILLS):
      values = [eval_metrics[f'{n}/{skill}/{metric}'] for n in names]
      ax.bar(x + 0.4 * i - 0.2, values, 0.4, label=skill)
    ax.set_xticks(x, [n.removeprefix('fused_').removeprefix('source_') for n in names])
    ax.tick_params(axis='x', rotation=35)
    for tick, name in zip(ax.get_xticklabels(), names, strict=True):
      tick.set_ha('right')
      tick.set_fontweight('bold' if name.startswith('fused_') else 'normal')
      tick.set_style('italic' if name.startswith('source_') else 'normal')
    ax.set_ylabel(label)
  axes[0].axhline(CHANCE, color='gray', lw=0.8, ls='--')
  axes[0].set_ylim(0, 1)
  fig.legend(*axes[0].get_legend_handles_labels(), loc='upper right', ncol=2, fontsize=8)
  fig.suptitle(
    title or 'FuseChat: per-skill accuracy and loss (sources italic, fused targets bold)'
  )
  fig.tight_layout()
  return fig
