"""Draws the README's training curves of a set of EBPO / GRPO runs (projects/ebpo/report.py).

    python -m experiments.ebpo.report RUNS_DIR OUT.png

RUNS_DIR: run workdirs (each subdirectory with a config.json), e.g. the smoke suite's
~/.cache/meta-jax-monorepo/reproduce/smoke/ebpo.
"""

import sys

from common import runs
from projects.ebpo import report


def main(argv: list[str]) -> int:
  if len(argv) != 3:
    print('usage: python -m experiments.ebpo.report RUNS_DIR OUT.png', file=sys.stderr)
    return 2
  try:
    print(report.figure(argv[1], argv[2]))
  except runs.RunsError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
