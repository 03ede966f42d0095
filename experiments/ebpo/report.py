"""Draws the README's training curves of a set of EBPO / GRPO runs (projects/ebpo/report.py).

    python -m experiments.ebpo.report RUNS_DIR OUT.png

RUNS_DIR: the run workdirs named g{G}_{estimator}_seed{S}, e.g. the smoke suite's
~/.cache/meta-jax-monorepo/reproduce/smoke/ebpo.
"""

import sys

from projects.ebpo import report

if __name__ == '__main__':
  if len(sys.argv) != 3:
    sys.exit('usage: python -m experiments.ebpo.report RUNS_DIR OUT.png')
  report.figure(sys.argv[1], sys.argv[2])
