"""Launches an EBPO / GRPO-family RLVR run. See experiments/ebpo/configs/base.py for commands."""

from common import launch
from projects.ebpo import train

if __name__ == '__main__':
  launch.run(train.train_and_evaluate)
