"""The README's seed table of a vanilla-vs-CRM pair of arms: each run's test metrics per seed, then
CRM - vanilla paired by seed as mean ± 95% t half-width (the reproduction suite's summary).

    python -m experiments.causal_rewards.seeds_table --crm_runs=/tmp/crm_full \
      [--crm_seeds=0,1,2] [--crm_arms=0,1.0]

CRM_RUNS holds one workdir per (lambda, seed), named lam{L}_s{S}: the README's commands
(`...:smollm2,crm.lam=L` with `seed=S,data.seed=S` for S > 0). Why a script and not the claims
suite: a full `smollm2` run takes 36 min on 2 cores, so the seeds are run one by one (each a
resumable launcher run) and tabulated when they exist; a seed missing either arm is left out and
named.
"""

from __future__ import annotations

from collections.abc import Sequence
import pathlib

from absl import app
from absl import flags

from common import runs as runs_lib
from experiments import reproduce

_RUNS = flags.DEFINE_string('crm_runs', None, 'directory of the lam{L}_s{S} workdirs')
_SEEDS = flags.DEFINE_list('crm_seeds', ['0', '1', '2'], 'seeds to tabulate')
_ARMS = flags.DEFINE_list('crm_arms', ['0', '1.0'], 'crm.lam of the vanilla arm, then of CRM')

# (column, metric key(s) in results.json's eval; a pair is printed "a / b")
COLUMNS = (
  ('acc decorrelated', ('acc_decorrelated',)),
  ('acc clean', ('acc_clean',)),
  ('P(cue preferred)', ('cue_pref',)),
  ('bias (sd)', ('bias',)),
  ('Spearman', ('spearman',)),
  ('Best-of-4 cue wins', ('bon_cue_wins',)),
  ('length-penalty acc decorrelated / P(cue preferred)', ('lp_acc_decorrelated', 'lp_cue_pref')),
)


def runs(
  root: pathlib.Path, arms: Sequence[str], seeds: Sequence[int]
) -> tuple[list[int], dict[str, list[dict]]]:
  """(seeds with every arm finished, {lambda: [eval metrics per such seed]})."""
  found = {lam: {s: runs_lib.final_eval(root / f'lam{lam}_s{s}') for s in seeds} for lam in arms}
  done = [s for s in seeds if all(found[lam][s] is not None for lam in arms)]
  return done, {lam: [found[lam][s] for s in done] for lam in arms}


def _cell(e: dict, keys: Sequence[str]) -> str:
  return ' / '.join(f'{e[k]:.3f}' for k in keys)


def _difference(crm: Sequence[dict], vanilla: Sequence[dict], key: str) -> str:
  s = reproduce.summarize([c[key] - v[key] for c, v in zip(crm, vanilla, strict=True)])
  return f'{s.mean:+.3f} ± {s.spread:.3f}' if len(crm) > 1 else f'{s.mean:+.3f}'


def table(root: pathlib.Path, arms: Sequence[str], seeds: Sequence[int]) -> list[str]:
  """The markdown rows; a ValueError when no seed has every arm finished (main says it as usage)."""
  done, by_arm = runs(root, arms, seeds)
  if not done:
    raise ValueError(f'no seed of {list(seeds)} has every arm {list(arms)} finished under {root}')
  vanilla, crm = arms
  lines = [
    '| run | seed | ' + ' | '.join(name for name, _ in COLUMNS) + ' |',
    '|---|---|' + '---|' * len(COLUMNS),
  ]
  for lam in arms:
    name = 'vanilla BT' if lam == vanilla else 'conditional CRM on the reward'
    for s, e in zip(done, by_arm[lam], strict=True):
      lines.append(
        f'| {name} (`crm.lam={lam}`) | {s} | '
        + ' | '.join(_cell(e, keys) for _, keys in COLUMNS)
        + ' |'
      )
  n = len(done)
  label = f'mean ± 95% t half-width ({n} seeds)' if n > 1 else f'(seed {done[0]})'
  diffs = [_difference(by_arm[crm], by_arm[vanilla], keys[0]) for _, keys in COLUMNS[:-1]]
  lines.append(f'| CRM - vanilla, per seed, {label} | | ' + ' | '.join(diffs) + ' | |')
  missing = sorted(set(seeds) - set(done))
  if missing:
    lines.append('')
    lines.append(f'(seeds {missing} left out: not every arm has results.json)')
  return lines


def main(argv):
  del argv
  if not _RUNS.value:
    raise app.UsageError('--crm_runs is required')
  try:
    lines = table(pathlib.Path(_RUNS.value), _ARMS.value, [int(s) for s in _SEEDS.value])
  except ValueError as e:  # runs_lib.RunsError included
    raise app.UsageError(str(e)) from e
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
