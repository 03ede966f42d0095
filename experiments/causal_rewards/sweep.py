"""The lambda sweep of Causal Rewards: one smoke run per (mode, lambda), then the Pareto front of
decorrelated-test accuracy against |Spearman(reward, cue)| (and P(cue preferred)).

  python -m experiments.causal_rewards.sweep --root=/tmp/crm_sweep \
    --lams=0,0.3,1,3,10 --modes=conditional,unconditional --seed=0 [--variant=smoke]

Runs are ordinary workdirs under --root (a finished one is reused; an interrupted one resumes).
Writes <root>/sweep.md (one row per run, Pareto-optimal rows marked) and <root>/pareto.png.
"""

from __future__ import annotations

import json
import pathlib

from absl import app
from absl import flags

from experiments.causal_rewards.configs import base
from projects.causal_rewards import train

ROOT = flags.DEFINE_string('root', '/tmp/crm_sweep', 'directory of the runs and outputs')
LAMS = flags.DEFINE_list('lams', ['0', '0.3', '1', '3', '10'], 'crm.lam values')
MODES = flags.DEFINE_list('modes', ['conditional', 'unconditional'], 'crm.mode values')
SEED = flags.DEFINE_integer('seed', 0, 'seed and data.seed')
VARIANT = flags.DEFINE_string('variant', 'smoke', 'config variant ("" for the default config)')
CUE = flags.DEFINE_string('cue', 'sycophancy', 'data.cue')


def pareto(points: list[tuple[float, float]]) -> list[bool]:
  """Which (accuracy, |spearman|) points no other point beats on both (higher acc, lower rho)."""
  out = []
  for i, (a, r) in enumerate(points):
    dominated = any(
      (b >= a and s <= r) and (b > a or s < r) for j, (b, s) in enumerate(points) if j != i
    )
    out.append(not dominated)
  return out


def main(argv):
  del argv
  root = pathlib.Path(ROOT.value)
  rows = []
  for mode in MODES.value:
    for lam in LAMS.value:
      if float(lam) == 0 and mode != MODES.value[0]:
        continue  # lambda = 0 is the vanilla model whatever the mode
      workdir = root / f'{CUE.value}_{mode}_lam{lam}_seed{SEED.value}'
      args = [VARIANT.value] if VARIANT.value else []
      args += [f'crm.mode={mode}', f'crm.lam={lam}', f'seed={SEED.value}']
      args += [f'data.seed={SEED.value}', f'data.cue={CUE.value}']
      if not (workdir / 'results.json').is_file():
        train.train_and_evaluate(base.get_config(','.join(args)), str(workdir))
      ev = json.loads((workdir / 'results.json').read_text())['eval']
      rows.append((mode if float(lam) else 'vanilla', float(lam), ev))
  front = pareto([(e['acc_decorrelated'], abs(e['spearman'])) for _, _, e in rows])
  lines = [
    f'cue {CUE.value}, seed {SEED.value}, variant {VARIANT.value or "default"}',
    '',
    '| mode | lambda | acc decorrelated | acc clean | abs Spearman | P(cue preferred) | bias (sd) '
    '| BoN cue wins | Pareto |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for (mode, lam, e), p in zip(rows, front, strict=True):
    lines.append(
      f'| {mode} | {lam:g} | {e["acc_decorrelated"]:.3f} | {e["acc_clean"]:.3f} | '
      f'{abs(e["spearman"]):.3f} | {e["cue_pref"]:.3f} | {e["bias"]:.3f} | '
      f'{e["bon_cue_wins"]:.3f} | {"*" if p else ""} |'
    )
  (root / 'sweep.md').write_text('\n'.join(lines) + '\n')
  print('\n'.join(lines))

  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(5, 4))
  for mode in dict.fromkeys(m for m, _, _ in rows):
    pts = [(abs(e['spearman']), e['acc_decorrelated'], lam) for m, lam, e in rows if m == mode]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], 'o-', label=mode)
    for x, y, lam in pts:
      ax.annotate(f'{lam:g}', (x, y), fontsize=7)
  ax.set_xlabel('|Spearman(reward, cue)| (lower: more invariant)')
  ax.set_ylabel('decorrelated test accuracy')
  ax.set_title(f'CRM lambda sweep ({CUE.value}, seed {SEED.value})')
  ax.legend()
  fig.tight_layout()
  fig.savefig(root / 'pareto.png', dpi=120)


if __name__ == '__main__':
  app.run(main)
