"""PerSRec serving cost vs history length: FLOPs and measured time, full vs recent-only vs PerSRec.

The paper's efficiency claim (PerSRec §3.3, abstract: >75% faster inference at comparable recall):
with the old history compressed into k tokens' K/V once per user, a request runs only the R recent
items, so its cost is flat in P, while a full-history model's grows quadratically. For each P this
prints the analytic FLOPs per request (projects/persrec/models.serving_flops) and the measured time
(jit, block_until_ready, medians and ranges of interleaved repetitions; projects/persrec/cost.py),
plus the per-user compression cost that is paid once per cache refresh.

  python -m benchmarks.persrec_serving                                  # P in 256..4096, R=256
  python -m benchmarks.persrec_serving --old_lens=1024 --reps=20 --d_model=64

Timings on the shared 2-core VMs swing ~2x between runs: compare rows of one run, not across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

from projects.persrec import cost  # noqa: E402
from projects.persrec import models  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--old_lens', default='256,512,1024,2048,4096', help='comma-separated P values')
  p.add_argument('--recent_len', type=int, default=256, help='R')
  p.add_argument('--tokens', type=int, default=4, help='k')
  p.add_argument('--d_model', type=int, default=32)
  p.add_argument('--layers', type=int, default=2)
  p.add_argument('--heads', type=int, default=2)
  p.add_argument('--num_items', type=int, default=2000)
  p.add_argument('--backbone', default='hstu', choices=models.BACKBONES)
  p.add_argument('--batch', type=int, default=1, help='users per call (a request is one user)')
  p.add_argument('--reps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument(
    '--json', default='', help='also write the rows here (for experiments.persrec.plots)'
  )
  p.add_argument(
    '--from_json', default='', help='print the tables of a saved --json run instead of measuring'
  )
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  base = models.ModelConfig(
    num_items=args.num_items,
    backbone=args.backbone,
    d_model=args.d_model,
    num_layers=args.layers,
    num_heads=args.heads,
    head_dim=args.d_model // args.heads,
    mlp_dim=2 * args.d_model,
    recent_len=args.recent_len,
    tokens_per_segment=args.tokens,
  )
  if args.from_json:
    with open(args.from_json) as f:
      rows = [cost.Row(**r) for r in json.load(f)]
    print(cost.table(rows, args.batch) + '\n\n' + cost.ratio_table(rows))
    return 0
  old_lens = [int(x) for x in args.old_lens.split(',') if x]
  t0 = time.perf_counter()
  rows = cost.measure(base, old_lens, batch=args.batch, reps=args.reps, warmup=args.warmup)
  print(f'measured in {time.perf_counter() - t0:.0f}s', file=sys.stderr)
  print(
    f'\nPerSRec serving ({args.backbone}, {args.layers} layers, d={args.d_model}, {args.heads} '
    f'heads, R={args.recent_len}, k={args.tokens}, {args.num_items} items scored; batch '
    f'{args.batch}; {args.warmup} warm-up + {args.reps} interleaved reps; python '
    f'{platform.python_version()}, jax {jax.__version__}, {os.cpu_count()} CPUs). "compress" is '
    f'the per-user cache refresh, paid once per refresh, not per request.\n'
  )
  print(cost.table(rows, args.batch))
  print('\n' + cost.ratio_table(rows))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
