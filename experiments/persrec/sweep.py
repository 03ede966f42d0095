"""History-length sweep: test recall of full-history, PerSRec and recent-only models vs P, per seed.

  python -m experiments.persrec.sweep --data=synthetic \
    --config_arg=smoke,train.num_steps=200,data.eval_users=512 --old_lens=8,16,32 --seeds=0,1,2 \
    --root=/tmp/persrec_sweep

For each seed: one recent-only run (the last R items) and, for each P in --old_lens, a full-history
run over P + R items and a PerSRec run with the P old items compressed into k tokens. Every run is
an ordinary training run (projects/persrec/train.py) in <root>/<arm>_P<P>_seed<S>, so re-running
the command reuses finished runs and resumes interrupted ones. Runs in this process (compiled code
is shared through the persistent compilation cache). The figure: python -m experiments.persrec.plots
--runs=<root>.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from experiments.persrec.configs import base
from experiments.persrec.configs import ml100k
from experiments.persrec.configs import synthetic_long
from projects.persrec import train

CONFIGS = {'synthetic': base, 'synthetic_long': synthetic_long, 'ml100k': ml100k}


def runs(old_lens: list[int], seeds: list[int]) -> list[tuple[str, int, int]]:
  """(arm, P, seed) in the order they run: per seed, recent first, then full and PerSRec by P."""
  out = []
  for seed in seeds:
    out.append(('recent', 0, seed))
    out += [(arm, p, seed) for p in old_lens for arm in ('full', 'persrec')]
  return out


def run_one(data: str, config_arg: str, arm: str, p: int, seed: int, root: pathlib.Path) -> dict:
  workdir = root / f'{arm}_P{p}_seed{seed}'
  done = workdir / 'results.json'
  if not done.is_file():
    extra = [f'arm={arm}', f'seed={seed}'] + ([f'model.old_len={p}'] if arm != 'recent' else [])
    arg = ','.join([a for a in config_arg.split(',') if a] + extra)
    train.train_and_evaluate(CONFIGS[data].get_config(arg), str(workdir))
  res = json.loads(done.read_text())
  cfg = json.loads((workdir / 'config.json').read_text())
  return {
    'arm': arm,
    'old_len': cfg['model']['old_len'],
    'recent_len': cfg['model']['recent_len'],
    'seed': seed,
    'eval': res['eval'],
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--data', default='synthetic', choices=sorted(CONFIGS))
  p.add_argument('--config_arg', default='smoke', help="the config's variant and overrides")
  p.add_argument('--old_lens', default='8,16,32', help='comma-separated P values')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--root', required=True, help='one workdir per run under here')
  args = p.parse_args(argv)
  old_lens = [int(x) for x in args.old_lens.split(',') if x]
  seeds = [int(x) for x in args.seeds.split(',') if x]
  if not old_lens or min(old_lens) <= 0:
    print(f'error: --old_lens needs positive P values, got {args.old_lens!r}', file=sys.stderr)
    return 2
  root = pathlib.Path(args.root)
  rows = []
  for arm, old_len, seed in runs(old_lens, seeds):
    rows.append(run_one(args.data, args.config_arg, arm, old_len, seed, root))
    r = rows[-1]
    print(
      f'{arm} P={r["old_len"]} R={r["recent_len"]} seed={seed}: test/recall_10 '
      f'{r["eval"]["test/recall_10"]:.4f}',
      flush=True,
    )
  out = root / 'sweep.json'
  out.write_text(
    json.dumps({'config_arg': args.config_arg, 'data': args.data, 'rows': rows}, indent=1)
  )
  print(f'wrote {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
