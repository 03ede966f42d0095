"""Launches FusionRoute (stage 1 SFT + routing, then stage 2 SFT + CDPO). See configs/base.py."""

from common import launch
from projects.fusionroute import train

if __name__ == '__main__':
  launch.run(train.train_and_evaluate)
