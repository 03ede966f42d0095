"""Launches adapter fine-tuning (S'MoRE and baselines). See experiments/smore/configs/base.py."""

from common import launch
from projects.smore import train

if __name__ == '__main__':
  launch.run(train.train_and_evaluate)
