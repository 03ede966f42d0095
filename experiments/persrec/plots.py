"""Draws the PerSRec README figure (projects/persrec/plots.py): recall and serving time vs history.

  python -m experiments.persrec.plots --runs=/tmp/persrec_sweep --serving=/tmp/persrec_serving.json \
    --out=reports/persrec/history_length.png

--runs: a root of finished runs (experiments/persrec/sweep.py); --serving: the JSON rows of
benchmarks/persrec_serving.py --json.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from projects.persrec import plots


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--runs', required=True)
  p.add_argument('--serving', required=True)
  p.add_argument('--out', required=True)
  p.add_argument('--title', default='synthetic histories: recall vs window')
  args = p.parse_args(argv)
  fig = plots.figure(
    plots.run_points(pathlib.Path(args.runs)),
    json.loads(pathlib.Path(args.serving).read_text()),
    args.title,
  )
  fig.savefig(args.out, metadata={'Software': None})
  print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
