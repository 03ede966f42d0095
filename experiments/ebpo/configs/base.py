"""EBPO (arXiv 2602.05165) and its GRPO-family baselines: RLVR on reasoning-gym tasks.

COMMANDS:
  python -m experiments.ebpo.main \
    --config=experiments/ebpo/configs/base.py:smoke --workdir=/tmp/ebpo_smoke
  python -m experiments.ebpo.main \
    --config=experiments/ebpo/configs/base.py:smollm2 --workdir=/tmp/ebpo_smollm2

Variants:
  smoke: the character-level tiny decoder (2 layers, d_model 64) after a cached SFT warm-up
         (common/rl/policies.py) on reasoning-gym 'chain_sum' (a +/- b, 1-2 digits) and
         'basic_arithmetic' (three 1-digit terms), prompts rendered '36-38='. RL: 16 prompts x G=4
         samples per step, up to 4 new tokens, 60 steps (3,840 sampled responses), greedy held-out
         pass@1 on the deduplicated test split every 20 steps. No model weights. About a minute on
         2 cores once the warm-up is cached (the first run on a machine trains it: 1000 SFT steps,
         1-10 minutes depending on load).
  smollm2: SmolLM2-135M-Instruct (python -m common.assets fetch smollm2) on short arithmetic
         (chain_sum, basic_arithmetic with + - *) and leg-counting questions in its chat template
         with a step-by-step instruction (prompts 51-94 tokens, left-padded to 96), G=4, 8 prompts
         per step, up to 24 new tokens, 40 steps: 1,280 sampled responses, at most 30,720
         generated tokens and 40 updates of 32 sequences of 119 positions; greedy pass@1 on 100
         held-out questions at steps 0, 20, 40. Learning rate 1e-5, not the paper's 1e-6: the
         paper's is for 8B-14B models over up to 1000 steps, and Adam at 1e-6 moves no weight by
         more than 4e-5 in 40 steps (chosen before any run, not tuned on results). Expected time on
         2 quiet cores: ~40 s per step (rollout 5-8 s, update 23-30 s), about 30 minutes per run
         with compilation and three evaluations, so G=4 EBPO + GRPO is about 1 hour. Results:
         projects/ebpo/README.md.
  smoke_dapo: the smoke setup trained with DAPO (arXiv 2503.14476) as a whole: dynamic sampling
         (estimator dapo), clip-higher 0.28, token-level loss, and the soft overlong punishment
         with L_max = 8 generated tokens and L_cache = 4 (the longest correct answer is 3
         characters + EOS = 4 tokens, which is never penalised; 5-8 tokens get -0.25 .. -1).
  (default): the smoke setup at 300 steps.
Ablation knobs: rl.estimator (grpo | dr_grpo | rloo | dapo | ebpo), rl.group_size,
  rl.curriculum (shuffled | clustered | difficulty), ebpo.mode (cumulative | cluster | ewm),
  ebpo.half_life, ebpo.ddof, ebpo.standardize (projects/ebpo/losses.py),
  rl.loss_agg, rl.clip_high, rl.kl_coef, rl.num_iterations, rl.overlong_shaping (DAPO's soft
  overlong punishment: rl.overlong_cache_len, rl.overlong_max_len; off by default); e.g.
  base.py:smoke,rl.estimator=grpo,rl.group_size=2.
"""

import ml_collections

from common import config as config_lib
from common.rl import config as rl_config
from projects.ebpo import losses


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = config_lib.parse_arg(arg, variants=('smoke', 'smoke_dapo', 'smollm2'))
  c = config_lib.base_config()
  rl_config.tiny_policy(c)
  c.rl = rl_config.rl(estimator='ebpo', max_new_tokens=4)  # kl_coef 0.001: the paper's beta
  c.ebpo = losses.ebpo_config()
  c.optimizer = rl_config.optimizer(lr=3e-5)
  c.train.num_steps = 300
  c.train.log_every = 10
  c.train.eval_every = 50
  c.checkpoint.every_steps = 50
  if variant == 'smoke_dapo':
    c.rl.update(
      estimator='dapo',
      clip_high=0.28,
      loss_agg='token-mean',
      max_new_tokens=8,
      overlong_shaping=True,
      overlong_cache_len=4,
      overlong_max_len=8,
    )
  if variant in ('smoke', 'smoke_dapo'):
    c.train.update(num_steps=60, log_every=5, eval_every=20)
    c.checkpoint.every_steps = 20
  if variant == 'smollm2':
    # Adam at 1e-5: the paper's constant 1e-6 is for 8B-14B, up to 1000 steps.
    rl_config.smollm2(c, max_new_tokens=24)
  return config_lib.finalize(c, overrides)
