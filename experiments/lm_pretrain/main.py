"""Launches LM pretraining. See experiments/lm_pretrain/configs/base.py for commands."""

from common import launch
from projects.lm_pretrain import train

if __name__ == '__main__':
  launch.run(train.train_and_evaluate)
