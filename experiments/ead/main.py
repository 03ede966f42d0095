"""Launches an EAD / fixed-temperature RLVR run. See experiments/ead/configs/base.py for commands."""

from common import launch
from projects.ead import train

if __name__ == '__main__':
  launch.run(train.train_and_evaluate)
