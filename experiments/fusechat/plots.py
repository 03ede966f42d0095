"""Draws a FuseChat run's per-skill bars (projects/fusechat/plots.py) from its workdir.

  python -m experiments.fusechat.plots --run=/tmp/fusechat_lam05 --out=/tmp/fusechat.png

--run: a finished run (its results.json's final eval row is drawn).
"""

from __future__ import annotations

import argparse

import ml_collections

from common import runs
from projects.fusechat import plots
from projects.fusechat import train


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--run', required=True)
  p.add_argument('--out', required=True)
  p.add_argument('--title', default='')
  args = p.parse_args(argv)
  try:
    run = runs.load(args.run)
  except runs.RunsError as e:
    p.error(str(e))  # one line, exit 2
  if run.results is None:
    p.error(f'{args.run} has not finished (no results.json)')
  names = train.model_names(ml_collections.ConfigDict(run.config))
  fig = plots.figure(run.results['eval'], names, args.title)
  fig.savefig(args.out, metadata={'Software': None})
  print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
