"""Launches GEM training. See experiments/gem/configs/base.py for commands."""

from common import launch
from projects.gem import train

if __name__ == '__main__':
  launch.run(train.train_and_evaluate)
