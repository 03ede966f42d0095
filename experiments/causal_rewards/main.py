"""Launches Causal Rewards reward-model training. See experiments/causal_rewards/configs/base.py."""

from common import launch
from projects.causal_rewards import train

if __name__ == '__main__':
  launch.run(train.train_and_evaluate)
