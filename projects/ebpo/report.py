"""EBPO's training-curve figure for the README: its own train metrics (reward, the fraction of
groups without a learning signal, entropy, gradient norm) drawn by common.runs.

RUNS_DIR holds run workdirs (every subdirectory with a config.json, e.g. what
experiments/ebpo/claims.py writes: g2_ebpo_seed0, g2_grpo_seed0, ...). `runs.plot` groups them by
configuration (the config minus the seed: estimator and group size here), one colour each, with
the seeds as thin lines of that colour around their mean. The command line is
`python -m experiments.ebpo.report RUNS_DIR OUT.png`; the tables of any runs are
`python -m common.runs summarize|compare RUNS_DIR`.
"""

from __future__ import annotations

import pathlib

from common import runs

KEYS = ('reward_mean', 'zero_signal_frac', 'entropy', 'grad_norm')


def figure(runs_dir: str | pathlib.Path, out: str | pathlib.Path) -> pathlib.Path:
  """The curves of `KEYS` (train split) of every run under `runs_dir`; returns the PNG's path."""
  records = runs.expand([str(runs_dir)])
  return runs.plot(records, [f'train/{k}' for k in KEYS], pathlib.Path(out))
