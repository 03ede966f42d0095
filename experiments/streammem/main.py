"""Launches a StreamMem evaluation. See experiments/streammem/configs/base.py for commands."""

from common import launch
from projects.streammem import train

if __name__ == '__main__':
  launch.run(train.train_and_evaluate)
