"""The README's multi-seed table of FusionRoute runs: per-domain accuracy as seed means, mixed per
seed, and FusionRoute's paired differences from each method, read from finished workdirs.

    python -m experiments.fusionroute.seeds_table --runs=/tmp/fr_sm2 [--seeds=0,1,2]

RUNS holds the workdirs as the claims suite names them: fusionroute_seed{S} (its stage1/ inside),
finetuned_seed{S} (method=finetuned) and baselines (experiments.fusionroute.baselines; the
router-free methods do not depend on the seed). A seed whose fusionroute run has not finished is
left out and named; a finetuned run that has not finished leaves that row's seed blank. Why a
script and not the claims suite: the SmolLM2 arm takes 1-1.5 h per run on 2 cores, so its seeds
are run one by one (each a resumable launcher run) and tabulated when they exist.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import pathlib

from absl import app
from absl import flags
import ml_collections
import numpy as np

from common import runs as runs_lib
from experiments import reproduce
from projects.fusionroute import evaluate
from projects.fusionroute import train

_RUNS = flags.DEFINE_string('runs', None, 'directory of the runs (see the module docstring)')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'seeds to tabulate')

# The router-free baselines besides the experts alone (rows 'expert_<name>', best first).
BASELINE_NAMES = {
  'uniform': 'uniform logit averaging',
  'oracle': 'oracle domain routing',
  'sequence_selection': 'sequence selection',
  'task_arithmetic': 'task arithmetic merge',
  'ties': 'TIES merge',
  'dare': 'DARE merge',
}
# (row name, run kind, stage directory or '', method prefix in that run's eval metrics)
ROUTED = (
  ('FusionRoute, stage 1', 'fusionroute', train.STAGE1_DIR, 'fusionroute'),
  ('routing-only, stage 1', 'fusionroute', train.STAGE1_DIR, 'routing_only'),
  ('router LM alone, stage 1', 'fusionroute', train.STAGE1_DIR, 'router_lm'),
  ('deferral, stage 1', 'fusionroute', train.STAGE1_DIR, 'deferral'),
  ('fine-tuned (method=finetuned), stage 1', 'finetuned', train.STAGE1_DIR, 'router_lm'),
  ('FusionRoute', 'fusionroute', '', 'fusionroute'),
  ('routing-only', 'fusionroute', '', 'routing_only'),
  ('router LM alone', 'fusionroute', '', 'router_lm'),
  ('deferral', 'fusionroute', '', 'deferral'),
  ('fine-tuned (method=finetuned)', 'finetuned', '', 'router_lm'),
)


def rows(root: pathlib.Path, seeds: Sequence[int]) -> tuple[list[int], dict[str, list]]:
  """(finished seeds, {row name: [summary dict or None per finished seed]})."""
  done = [s for s in seeds if runs_lib.final_eval(root / f'fusionroute_seed{s}') is not None]
  table: dict[str, list] = {}
  base = root / 'baselines' / train.BASELINES_FILE
  if base.is_file():
    fixed = json.loads(base.read_text())
    experts = sorted(
      (k for k in fixed if k.startswith('expert_')), key=lambda k: -fixed[k]['mixed']
    )
    for key in experts:
      table[f'{key.removeprefix("expert_")} expert alone'] = [fixed[key]] * len(done)
    for key, name in BASELINE_NAMES.items():
      if key in fixed:
        table[name] = [fixed[key]] * len(done)
  for name, kind, stage, prefix in ROUTED:
    per_seed = []
    for s in done:
      res = runs_lib.final_eval(root / f'{kind}_seed{s}' / stage)
      per_seed.append(evaluate.method_metrics(res, prefix) if res is not None else None)
    table[name] = per_seed
  return done, table


def _mean(xs: Sequence[float]) -> str:
  return f'{np.mean(xs):.3f}' if xs else ''


def _mean_sd(xs: Sequence[float]) -> str:
  if not xs:
    return ''
  if len(xs) == 1:
    return f'{xs[0]:.3f}'
  return f'{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}'


def markdown(done: Sequence[int], table: dict[str, list], domains: Sequence[str]) -> str:
  """Per-domain (and planted-flaw, where evaluated) seed means, mixed per seed and mean ± sd
  (n - 1), FusionRoute minus the row."""
  fr = table['FusionRoute']
  if any('flaw' in r for r in fr if r is not None):
    domains = [*domains, 'flaw']
  head = ['method', *domains, *(f'mixed, seed {s}' for s in done), 'mixed', 'FusionRoute - it']
  out = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, per_seed in table.items():
    have = [r for r in per_seed if r is not None]
    if not have:
      continue
    doms = [_mean([r[d] for r in have if d in r]) for d in domains]
    mixed = ['' if r is None else f'{r["mixed"]:.3f}' for r in per_seed]
    diffs = [f['mixed'] - r['mixed'] for f, r in zip(fr, per_seed, strict=True) if r is not None]
    diff = '' if name == 'FusionRoute' else _mean_sd(diffs)
    out.append(
      '| ' + ' | '.join([name, *doms, *mixed, _mean_sd([r['mixed'] for r in have]), diff]) + ' |'
    )
  return '\n'.join(out)


def intervals(table: dict[str, list]) -> list[str]:
  """FusionRoute's mixed minus each row's, paired by seed, as mean ± 95% t half-width (the
  reproduction suite's summary), for rows with at least two finished seeds."""
  fr, out = table['FusionRoute'], []
  for name, per_seed in table.items():
    diffs = [f['mixed'] - r['mixed'] for f, r in zip(fr, per_seed, strict=True) if r is not None]
    if name != 'FusionRoute' and len(diffs) > 1:
      s = reproduce.summarize(diffs)
      per = ' / '.join(f'{d:+.3f}' for d in diffs)
      out.append(f'FusionRoute - {name}: {s.mean:+.3f} ± {s.spread:.3f} (per seed {per})')
  return out


def main(argv: Sequence[str]) -> None:
  del argv
  root = pathlib.Path(_RUNS.value)
  seeds = [int(s) for s in _SEEDS.value]
  done, table = rows(root, seeds)
  missing = sorted(set(seeds) - set(done))
  if not done:
    raise app.UsageError(f'no finished fusionroute_seed{{S}} run under {root} for seeds {seeds}')
  config = runs_lib.load(root / f'fusionroute_seed{done[0]}').config
  print(markdown(done, table, train.domains(ml_collections.ConfigDict(config))))
  print('\nMixed accuracy, paired by seed, mean ± 95% t half-width:')
  print('\n'.join(intervals(table)))
  if missing:
    print(f'\n(seeds {missing}: no finished fusionroute run under {root}; left out)')


if __name__ == '__main__':
  flags.mark_flag_as_required('runs')
  app.run(main)
