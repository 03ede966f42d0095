"""The starting point of an RL config: held-out pass@1 / pass@k of the initial policy per temperature.

    python -m experiments.ead.start_rates --config=experiments/ead/configs/base.py:smollm2 \
      --temperatures=0.3,0.6,1.0 --samples=4

Measured before any training claim (the 10-60% window of the RL issues): which sampling
temperature (and, for a pretrained policy, which SFT warm-up: warmup.steps) leaves enough
successful rollouts per group to learn from, and how long the responses are (mean and longest in
tokens, the fraction cut at rl.max_new_tokens). `mixed` is the fraction of prompts whose k samples
are neither all right nor all wrong: with k = rl.group_size, the share of GRPO groups with a
nonzero advantage at that temperature (pass@1 alone can sit in the window while the prompts split
into always-solved and never-solved ones). Uses the config's policy,
held-out prompts, verifier and rollout length exactly as the run would (`train.build_setup`), with
k samples per prompt at each fixed temperature and the same keys for every temperature. Prints
one line per temperature and writes them as JSON to --out if given. --split=train measures as many
of the run's train prompts instead (a gap to the held-out rate is what the warm-up memorised).
"""

import argparse
import dataclasses
import json
import time

from absl import logging
import numpy as np

from common import config as config_lib
from common import sharding
from common.rl import evaluate as evaluate_lib
from common.rl import loop
from projects.ead import train


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='experiments/ead/configs/base.py:smollm2')
  p.add_argument('--temperatures', default='0.6,1.0', help='comma-separated fixed temperatures')
  p.add_argument('--samples', type=int, default=4, help='k: samples per prompt')
  p.add_argument(
    '--split',
    default='test',
    choices=('test', 'train'),
    help="test: the held-out prompts; train: as many of the RL run's train prompts (to compare)",
  )
  p.add_argument('--out', default='', help='optional JSON file for the results')
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  logging.set_verbosity(logging.INFO)
  config = config_lib.load(args.config)
  mesh = sharding.make_mesh(config_lib.mesh_spec(config))
  rules = sharding.rules_of(config)
  setup = train.build_setup(config, mesh, rules)
  model = setup.create_model()
  base = loop.sampling_of(config.rl, setup)
  prompts = setup.eval_prompts
  if args.split == 'train':
    prompts = list(setup.train_prompts)[: len(setup.eval_prompts)]
  results = []
  for temp in (float(t) for t in args.temperatures.split(',') if t):
    t0 = time.perf_counter()
    out = evaluate_lib.samples(
      model,
      prompts,
      args.samples,
      batch=config.rl.eval_batch * args.samples,
      sampling=dataclasses.replace(base, temperature=temp),
      rewards=setup.rewards,
      mesh=mesh,
      rules=rules,
      seed=config.seed,
    )
    r = np.asarray([out[p.uid][0] >= 1.0 for p in prompts]).mean(-1)
    n = np.concatenate([out[p.uid][1] for p in prompts])
    row = {
      'split': args.split,
      'temperature': temp,
      'prompts': len(r),
      'samples': args.samples,
      'pass_at_1': float(r.mean()),
      f'pass_at_{args.samples}': float((r > 0).mean()),
      'mixed': float(((r > 0) & (r < 1)).mean()),  # prompts whose k samples disagree: signal
      'mean_len': float(n.mean()),
      'max_len': int(n.max()),
      'truncated': float((n >= base.max_new_tokens).mean()),
      'seconds': round(time.perf_counter() - t0, 1),
    }
    results.append(row)
    logging.info('%s', row)
    print(json.dumps(row), flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'config': args.config, 'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
