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
  smollm2: SmolLM2-135M-Instruct (python -m common.assets fetch smollm2) on the shared smollm2
         task set in its chat template; reference traces 'The answer is N.'; 40 RL steps of 8
         prompts x G=4, up to 64 new tokens; the reward model 100 steps of batch 8. Piloted for
         function only on CPU (reduced sizes, projects/qrm/README.md: about 85 s per reward-model
         step at batch 8 on 2 loaded cores); the shared EAD measurement puts its starting pass@1
         at 0.025 at T = 1, below the 10-60% window: re-measure and pick the task mix first.
  (default): the smoke setup at 80 RL steps.
Arms: reward.kind = orm | dpo | qrm; algo = ppo | reinforce (sets rl.num_iterations and
  rl.num_minibatches: reinforce 1 and 1, ppo ppo.epochs and ppo.minibatches). rm.workdir shares one
  trained reward model between arms (the claims do: one per seed and kind).
"""

import ml_collections

from common import config as config_lib
from common.rl import loop
from projects.qrm import losses


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = config_lib.parse_arg(arg, variants=('smoke', 'smollm2'))
  c = config_lib.base_config()
  c.model = ml_collections.ConfigDict(dict(kind='tiny', name=''))
  # The tiny policy's SFT warm-up (common.rl.policies.WarmupConfig; the RL papers' shared cache).
  c.warmup = ml_collections.ConfigDict(
    dict(
      d_model=64,
      num_layers=2,
      num_heads=4,
      mlp_dim=256,
      sft_examples=4000,
      steps=1000,
      batch_size=32,
      seq_len=64,
      lr=3e-3,
      seed=0,
      data_seed=0,
    )
  )
  c.data = ml_collections.ConfigDict(dict(task_set='smoke', seed=0, max_train=-1, max_eval=256))
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
  c.rl = loop.rl_config()
  c.rl.update(
    estimator='grpo',
    group_size=4,
    prompts_per_step=16,
    prompt_len=12,
    max_new_tokens=6,
    temperature=1.0,
    kl_coef=0.001,
    clip_low=0.2,
    clip_high=0.2,
    eval_batch=128,
  )
  c.optimizer = ml_collections.ConfigDict(
    dict(lr=1e-4, b1=0.9, b2=0.99, weight_decay=0.0, clip_norm=1.0)
  )
  c.train.update(num_steps=80, log_every=1, eval_every=40)
  c.checkpoint.every_steps = 20
  if variant == 'smoke':
    c.train.update(num_steps=40, log_every=1, eval_every=20)
    c.checkpoint.every_steps = 20
  if variant == 'smollm2':
    c.model.update(kind='pretrained', name='smollm2')
    c.data.update(task_set='smollm2', max_eval=100)
    c.pairs.update(
      corrupted=400,
      policy_prompts=64,
      sample_batch=16,
      eval_corrupted=100,
      eval_policy_prompts=32,
    )
    c.rm.update(steps=100, batch_size=8, lr=1e-5)
    c.rl.update(group_size=4, prompts_per_step=8, prompt_len=96, max_new_tokens=64, eval_batch=50)
    c.optimizer.update(lr=1e-5)
    c.train.update(num_steps=40, log_every=1, eval_every=20)
    c.checkpoint.every_steps = 10
  return config_lib.finalize(c, overrides)
