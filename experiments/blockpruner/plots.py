"""Draws a BlockPruner figure (projects/blockpruner/plots.py) from run workdirs.

  python -m experiments.blockpruner.plots --runs=blockpruner=/tmp/bp_a,layer_ppl=/tmp/bp_b \
    --order_of=blockpruner --out=/tmp/blockpruner.png

--runs: label=workdir pairs (finished or partial runs); --order_of: whose removal order to draw.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from projects.blockpruner import plots


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--runs', required=True)
  p.add_argument('--order_of', required=True)
  p.add_argument('--out', required=True)
  p.add_argument('--title', default='')
  args = p.parse_args(argv)
  runs = dict(item.split('=', 1) for item in args.runs.split(','))
  if args.order_of not in runs:
    raise SystemExit(f'--order_of={args.order_of}: not one of {sorted(runs)}')
  config = json.loads((pathlib.Path(runs[args.order_of]) / 'config.json').read_text())
  from common.models import loader  # noqa: PLC0415

  if config['model']['pretrained']:
    num_layers = loader.load_config(config['model']['pretrained']).num_layers
  else:
    num_layers = config['model']['num_layers']
  fig = plots.figure(
    {k: pathlib.Path(v) for k, v in runs.items()}, num_layers, args.order_of, args.title
  )
  fig.savefig(args.out, metadata={'Software': None})
  print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
