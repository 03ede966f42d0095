"""Launches PerSRec training. See experiments/persrec/configs/*.py for commands."""

from common import launch
from projects.persrec import train

if __name__ == '__main__':
  launch.run(train.train_and_evaluate)
