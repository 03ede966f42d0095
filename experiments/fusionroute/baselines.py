"""FusionRoute's router-free baselines on a config's experts, written to WORKDIR/baselines.json.

    python -m experiments.fusionroute.baselines \
      --config=experiments/fusionroute/configs/base.py:smollm2 --workdir=/tmp/fusionroute_smollm2_baselines

Each expert alone, uniform logit averaging, oracle domain routing, sequence selection and the
task-arithmetic / TIES / DARE merges of the experts (projects/fusionroute/evaluate.baselines), on
the same held-out questions and decoding as the run's evaluation. They need no trained router, so
one run serves every seed of a config (the smoke claims call the same function). A finished
baselines.json is read back, not recomputed.
"""

from common import launch
from projects.fusionroute import train

if __name__ == '__main__':
  launch.run(train.evaluate_baselines)
