"""FuseChat launcher: python -m experiments.fusechat.main --config=... --workdir=..."""

from common import launch
from projects.fusechat import train

if __name__ == '__main__':
  launch.run(train.train_and_evaluate)
