"""Prints the README's results table of a set of adapter runs and draws their figure
(projects/smore/report.py; the generic views of any runs: python -m common.runs).

    python -m experiments.smore.report RUNS_DIR [OUT.png]

RUNS_DIR: run workdirs (each subdirectory with a config.json), e.g. the smoke suite's
~/.cache/meta-jax-monorepo/reproduce/smoke/smore.
"""

import sys

from common import runs
from projects.smore import report


def main(argv: list[str]) -> int:
  if len(argv) not in (2, 3):
    print('usage: python -m experiments.smore.report RUNS_DIR [OUT.png]', file=sys.stderr)
    return 2
  try:
    text, records = report.runs_table(argv[1])
  except runs.RunsError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(text)
  if len(argv) > 2:
    print(report.figure(records, argv[2]))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
