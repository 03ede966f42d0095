"""Prints the README's results table of a set of adapter runs and draws their training curves
(projects/smore/report.py).

    python -m experiments.smore.report RUNS_DIR [OUT.png]

RUNS_DIR: run workdirs named {name}_seed{S}, e.g. the smoke suite's
~/.cache/meta-jax-monorepo/reproduce/smoke/smore.
"""

import sys

from projects.smore import report

if __name__ == '__main__':
  if len(sys.argv) not in (2, 3):
    sys.exit('usage: python -m experiments.smore.report RUNS_DIR [OUT.png]')
  text, summaries = report.runs_table(sys.argv[1])
  print(text)
  if len(sys.argv) > 2:
    report.figure(summaries, sys.argv[2])
