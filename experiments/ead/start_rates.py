"""The starting point of an RL config: held-out pass@1 / pass@k of the initial policy per temperature.

    python -m experiments.ead.start_rates --config=experiments/ead/configs/base.py:smollm2 \
      --temperatures=0.3,0.6,1.0 --samples=4

Measured before any training claim (the 10-60% window of the RL issues): which sampling
temperature leaves enough successful rollouts per group to learn from. Uses the config's policy,
held-out prompts, verifier and rollout length exactly as the run would (`train.build_setup`), with
k samples per prompt at each fixed temperature and the same keys for every temperature. Prints
one line per temperature and writes them as JSON to --out if given.
"""

import dataclasses
import json
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from common import config as config_lib
from common import sharding
from common.rl import evaluate as evaluate_lib
from common.rl import loop
from projects.ead import train

flags.DEFINE_string('config', 'experiments/ead/configs/base.py:smollm2', 'config file:variant,...')
flags.DEFINE_list('temperatures', ['0.6', '1.0'], 'fixed sampling temperatures to measure')
flags.DEFINE_integer('samples', 4, 'k: samples per prompt at each temperature')
flags.DEFINE_string('out', '', 'optional JSON file for the results')
FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  config = config_lib.load(FLAGS.config)
  mesh = sharding.make_mesh(config_lib.mesh_spec(config))
  rules = sharding.rules_of(config)
  setup = train.build_setup(config, mesh, rules)
  model = setup.create_model()
  base = loop.sampling_of(config.rl, setup)
  results = []
  for temp in (float(t) for t in FLAGS.temperatures):
    t0 = time.perf_counter()
    rates = evaluate_lib.pass_rates(
      model,
      setup.eval_prompts,
      FLAGS.samples,
      batch=config.rl.eval_batch * FLAGS.samples,
      sampling=dataclasses.replace(base, temperature=temp),
      rewards=setup.rewards,
      mesh=mesh,
      rules=rules,
      seed=config.seed,
    )
    r = np.asarray([rates[p.uid] for p in setup.eval_prompts])
    row = {
      'temperature': temp,
      'prompts': len(r),
      'samples': FLAGS.samples,
      'pass_at_1': float(r.mean()),
      f'pass_at_{FLAGS.samples}': float((r > 0).mean()),
      'seconds': round(time.perf_counter() - t0, 1),
    }
    results.append(row)
    logging.info('%s', row)
    print(json.dumps(row), flush=True)
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump({'config': FLAGS.config, 'results': results}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
