"""Launches a BlockPruner search. See experiments/blockpruner/configs/base.py for commands."""

from common import launch
from projects.blockpruner import train

if __name__ == '__main__':
  launch.run(train.train_and_evaluate)
