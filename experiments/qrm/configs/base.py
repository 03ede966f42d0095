"""Q-RM (arXiv 2505.23363): token-level reward models (Q-RM; DPO-implicit) and RL with their
token rewards against the outcome verifier, on reasoning-gym math.

COMMANDS:
  python -m experiments.qrm.main \
    --config=experiments/qrm/configs/base.py:smoke --workdir=/tmp/qrm_smoke
  python -m experiments.qrm.main \
    --config=experiments/qrm/configs/base.py:smoke,reward.kind=orm --workdir=/tmp/qrm_smoke_orm
  python -m experiments.qrm.main \
    --config=experiments/qrm/configs/base.py:smoke,algo=reinforce --workdir=/tmp/qrm_smoke_rf
  python -m experiments.qrm.main \
    --config=experiments/qrm/configs/base.py:smollm2 --workdir=/tmp/qrm_smollm2

Variants:
  smoke: the shared RL warm-up policy (common.rl.policies: a 2-layer d_model 64 character decoder,
         SFT-warmed once per machine and cached) on the shared smoke task set (reasoning-gym
         'chain_sum' a +/- b and 'basic_arithmetic' a +/- b +/- c, prompts '36-38=', answers
         '-2<EOS>'). Its starting held-out pass rate is in the 10-60% window (measured: greedy
         0.33, 0.25 at temperature 1; logged as eval/pass_at_1 at step 0). Reward model: the same
         network, 150 steps of batch 32 (Adam 1e-4) on 1000 corrupted pairs (one answer digit
         replaced) plus the starting policy's wrong samples on 256 prompts (4 samples each at
         temperature 1, up to 2 wrong ones per prompt); its held-out pair metrics on 200 corrupted
         test pairs and the wrong samples of 96 test prompts. One arm about 50 s on 2 cores
         (first in a process); the claims (6 reward models, 15 RL runs) 137 s of CPU. RL: PPO-style (2 epochs x 2
         minibatches, clip 0.2) with GRPO group advantages, 16 prompts x G=4, up to 6 new tokens,
         40 steps, Adam 1e-4, evaluation (greedy pass@1 on 256 held-out prompts) at 0, 20, 40.
  smollm2: SmolLM2-135M-Instruct (python -m common.assets fetch smollm2) on the shared
         'smollm2_easy' task set (common.rl.tasks: one +/- operation on 1-2 digit operands; 99
         held-out questions) in its chat template, the policy after EAD's SFT warm-up (40 steps
         on worked answers, common.rl.policies.PretrainedWarmup: pass@1 0.399 at T = 1, in the
         10-60% window); reference traces are those worked answers ('15 - 43 = -28. The answer
         is -28.'); 40 RL steps of 8 prompts x G=4, up to 32 new tokens, Adam
         rl_config.WARMED_START_LR (3e-6, EAD's sweep on the same start); the reward model 100
         steps of batch 8.
         The harder mix ('smollm2', pass@1 0.025 at T = 1) stays reachable with
         data.task_set=smollm2. Starting pass rate and per-step cost: projects/qrm/README.md
         ("SmolLM2").
  (default): the smoke setup at 80 RL steps.
Arms: reward.kind = orm | dpo | qrm; algo = ppo | reinforce (sets rl.num_iterations and
  rl.num_minibatches: reinforce 1 and 1, ppo ppo.epochs and ppo.minibatches). rm.workdir shares one
  trained reward model between arms (the claims do: one per seed and kind).
"""

import ml_collections

from common import config as config_lib
from common.rl import config as rl_config
from projects.qrm import losses


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = config_lib.parse_arg(arg, variants=('smoke', 'smollm2'))
  c = config_lib.base_config()
  rl_config.tiny_policy(c, max_eval=256)
  c.pairs = ml_collections.ConfigDict(
    dict(
      corrupted=1000,  # train examples turned into corrupted pairs
      policy_prompts=256,  # train prompts sampled for the policy's wrong answers
      policy_samples=4,
      wrong_per_prompt=2,
      sample_batch=64,  # prompts per sampling call
      eval_corrupted=200,
      eval_policy_prompts=96,
    )
  )
  c.reward = ml_collections.ConfigDict(dict(kind='qrm', credit='immediate'))
  c.rm = losses.rm_config()
  c.rm.update(steps=150, batch_size=32, lr=1e-4)
  c.algo = 'ppo'
  c.debug.rm_sigterm_after_step = -1  # fault injection for the reward-model run (tests)
  c.ppo = ml_collections.ConfigDict(dict(epochs=2, minibatches=2))
  c.rl = rl_config.rl(clip_low=0.2, clip_high=0.2)
  c.optimizer = rl_config.optimizer(lr=1e-4)
  c.train.update(num_steps=80, log_every=1, eval_every=40)
  c.checkpoint.every_steps = 20
  if variant == 'smoke':
    c.train.update(num_steps=40, log_every=1, eval_every=20)
    c.checkpoint.every_steps = 20
  if variant == 'smollm2':
    rl_config.smollm2(
      c,
      max_new_tokens=32,
      task_set='smollm2_easy',
      log_every=1,
      warmup_steps=40,
      lr=rl_config.WARMED_START_LR,
    )
    c.pairs.update(
      corrupted=400,
      policy_prompts=64,
      sample_batch=16,
      eval_corrupted=100,
      eval_policy_prompts=32,
    )
    c.rm.update(steps=100, batch_size=8, lr=1e-5)
  return config_lib.finalize(c, overrides)
