"""A toy RL task for the loop's tests: copy the prompt's last token with a tiny random decoder.

Also a script, so the multi-process test can run the same loop as 2 processes on localhost:

    python -m tests.common.rl.toy --workdir=DIR [--estimator=grpo] [--steps=2] \
        [--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I]
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
import json

from flax import nnx
import jax
import numpy as np
import optax

from common import config as config_lib
from common import sharding
from common import train_loop
from common.models import decoder
from common.rl import advantages as adv_lib
from common.rl import curriculum
from common.rl import loop
from common.rl import rollout

VOCAB = 16
EOS = 2


def model(seed=0):
  cfg = decoder.DecoderConfig(
    vocab_size=VOCAB,
    d_model=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    mlp_dim=64,
  )
  with sharding.unsharded():
    return decoder.Decoder(cfg, rngs=nnx.Rngs(seed))


def prompts(n, offset=0):
  # Prompt [1, (1,) x]: ragged lengths; the answer is to copy x.
  return [
    curriculum.Prompt(
      uid=offset + i,
      tokens=(1,) * (1 + i % 2) + (3 + i % 8,),
      cluster=f'c{i % 2}',
      payload=3 + i % 8,
    )
    for i in range(n)
  ]


def verifier(prompt, completion):
  return float(len(completion) > 0 and int(completion[0]) == prompt.payload)


class RunningMeanBaseline:
  """A stateful estimator for the tests: A = r - (running mean of every reward so far, this batch
  included). Its state must survive a resume exactly (float64 through JSON)."""

  def __init__(self):
    self.total, self.count = 0.0, 0

  def advantages(self, rewards, mask, prompts):
    del prompts
    valid = np.asarray(rewards, np.float64)[np.asarray(mask, bool)]
    self.total += float(valid.sum())
    self.count += int(valid.size)
    mean = self.total / max(self.count, 1)
    a = np.where(mask, rewards - mean, 0.0).astype(np.float32)
    return adv_lib.Advantages(a, a, {'running_mean': mean})

  def group_filter(self, rewards):
    del rewards

  def state_dict(self):
    return {'running_mean': json.dumps([self.total, self.count])}

  def load_state_dict(self, state: Mapping):
    if 'running_mean' in state:
      self.total, self.count = json.loads(state['running_mean'])


ESTIMATORS = {**adv_lib.ESTIMATORS, 'running_mean': RunningMeanBaseline}


def setup(estimator='grpo', seed=0, **kw):
  return loop.RLSetup(
    create_model=lambda: model(seed),
    tx=optax.adam(3e-2),
    train_prompts=prompts(32),
    eval_prompts=prompts(8, offset=100),
    rewards=rollout.VerifierRewards(verifier),
    estimator=ESTIMATORS[estimator](),
    stop_tokens=(EOS,),
    pad_id=0,
    **kw,
  )


def config(**rl):
  c = config_lib.base_config()
  c.rl = loop.rl_config()
  c.rl.update(prompts_per_step=8, group_size=2, prompt_len=4, max_new_tokens=3, eval_batch=8)
  c.rl.update(**rl)
  c.train.update(num_steps=4, log_every=1, eval_every=2)
  c.checkpoint.update(every_steps=2, async_save=False)
  return config_lib.finalize(c, {})


def one_device_mesh():
  return sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])


def train(cfg, workdir, the_setup, *, mesh=None, **kw):
  with train_loop.Run(
    cfg, workdir, mesh=mesh or one_device_mesh(), checks=[loop.check_config]
  ) as run:
    return loop.train(run, the_setup, **kw)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--estimator', default='grpo')
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--coordinator_address')
  parser.add_argument('--num_processes', type=int)
  parser.add_argument('--process_id', type=int)
  args = parser.parse_args()
  if args.coordinator_address:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  cfg = config(estimator=args.estimator)
  with cfg.unlocked():
    cfg.train.num_steps = args.steps
    cfg.mesh.update(data=2, fsdp=2, tensor=2)
  with train_loop.Run(cfg, args.workdir, checks=[loop.check_config]) as run:
    loop.train(run, setup(args.estimator))


if __name__ == '__main__':
  main()
