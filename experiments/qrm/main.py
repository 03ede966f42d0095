"""Launches one Q-RM arm (reward model, then RL). See experiments/qrm/configs/base.py for commands."""

from common import launch
from projects.qrm import train

if __name__ == '__main__':
  launch.run(train.train_and_evaluate)
