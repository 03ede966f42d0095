"""Launches an OmniOPD / baseline run. See experiments/omniopd/configs/base.py for commands."""

from common import launch
from projects.omniopd import train

if __name__ == '__main__':
  launch.run(train.train_and_evaluate)
