"""experiments/causal_rewards/seeds_table.py: per-seed rows of each arm, CRM - vanilla paired by
seed (mean ± 95% t half-width), seeds missing an arm left out, nothing finished an error."""

import json

import numpy as np
import pytest

from experiments.causal_rewards import seeds_table

KEYS = [k for _, keys in seeds_table.COLUMNS for k in keys]


def _write(root, lam: str, seed: int, value: float) -> None:
  run = root / f'lam{lam}_s{seed}'
  run.mkdir(parents=True)
  ev = {k: value + 0.01 * i for i, k in enumerate(KEYS)}
  (run / 'config.json').write_text(json.dumps({'crm': {'lam': float(lam)}, 'seed': seed}))
  (run / 'results.json').write_text(json.dumps({'step': 200, 'train': {}, 'eval': ev}))


def test_differences_are_paired_by_seed_with_a_t_interval(tmp_path):
  vanilla, crm = {0: 0.5, 1: 0.6, 2: 0.9}, {0: 0.4, 1: 0.3, 2: 0.8, 3: 0.1}  # seed 3: CRM only
  for s, v in vanilla.items():
    _write(tmp_path, '0', s, v)
  for s, v in crm.items():
    _write(tmp_path, '1.0', s, v)

  done, by_arm = seeds_table.runs(tmp_path, ['0', '1.0'], [0, 1, 2, 3])
  assert done == [0, 1, 2]
  assert [e['acc_clean'] for e in by_arm['1.0']] == pytest.approx([0.41, 0.31, 0.81])

  lines = seeds_table.table(tmp_path, ['0', '1.0'], [0, 1, 2, 3])
  assert len([ln for ln in lines if ln.startswith('| vanilla BT')]) == 3
  diff = np.array([crm[s] - vanilla[s] for s in (0, 1, 2)])  # the same for every metric here
  half = 4.303 * diff.std(ddof=1) / np.sqrt(3)  # t(0.975, df=2)
  summary = next(ln for ln in lines if ln.startswith('| CRM - vanilla'))
  assert f'{diff.mean():+.3f} ± {half:.3f}' in summary
  assert '3 seeds' in summary
  assert lines[-1] == '(seeds [3] left out: not every arm has results.json)'


def test_one_seed_prints_the_difference_without_an_interval(tmp_path):
  _write(tmp_path, '0', 0, 0.5)
  _write(tmp_path, '1.0', 0, 0.25)
  summary = seeds_table.table(tmp_path, ['0', '1.0'], [0])[-1]
  assert summary.startswith('| CRM - vanilla, per seed, (seed 0) | | -0.250 |')
  assert '±' not in summary


def test_no_finished_seed_is_an_error_naming_the_directory(tmp_path):
  _write(tmp_path, '0', 0, 0.5)  # the CRM arm never finished
  with pytest.raises(ValueError, match='no seed of \\[0\\] has every arm'):
    seeds_table.table(tmp_path, ['0', '1.0'], [0])
