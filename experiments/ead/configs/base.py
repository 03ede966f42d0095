"""EAD (arXiv 2510.05251): annealed within-sequence rollout temperatures + truncated importance
sampling, against fixed-temperature GRPO, on reasoning-gym tasks.

COMMANDS:
  python -m experiments.ead.main \
    --config=experiments/ead/configs/base.py:smoke --workdir=/tmp/ead_smoke
  python -m experiments.ead.main \
    --config=experiments/ead/configs/base.py:smoke,ead.mode=fixed,ead.temperature=0.6 \
    --workdir=/tmp/ead_smoke_t06
  python -m experiments.ead.main \
    --config=experiments/ead/configs/base.py:smollm2 --workdir=/tmp/ead_smollm2

Variants:
  smoke: the character-level tiny decoder (2 layers, d_model 64) after a cached SFT warm-up
         (projects/ead/models.py; the first run on a machine trains it: 1000 SFT steps, 1-10
         minutes depending on load) on reasoning-gym 'chain_sum' (a +/- b, 1-2 digits) and
         'basic_arithmetic' (three 1-digit terms), prompts rendered '36-38='. Starting pass rate
         on the held-out prompts (measured): pass@1 0.254 at temperature 1, pass@8 0.594, greedy
         0.329 (in the 10-60% window; logged as eval/pass_at_1_t1 at step 0). GRPO, 16 prompts x
         G=4 per step, up to 6 new tokens, 60 steps (3,840 sampled responses), Adam 1e-4 (3e-4
         and 1e-3 collapse the fixed-1.0 arm: projects/ead/README.md); evaluation at steps 0, 20,
         40, 60 on the 234 held-out prompts:
         greedy pass@1 and 8 samples at temperature 1 (pass@1, pass@8). EAD scaled to the
         responses' length (answers are 1-3 characters + EOS, the paper's thousands of tokens):
         c = 0, tau_max = 1.2, tau_min = 0.1, d_0 = 3 (tau = 1.2, 0.80, 0.25, 0.1 at t = 0..3),
         d growing 0.005 per step (the paper's 5 per step relative to responses of ~4k tokens),
         cap 40000; TIS cap C = 2 for every arm. About 5-30 s per run on 2 cores once compiled.
  smollm2: SmolLM2-135M-Instruct (python -m common.assets fetch smollm2) on the shared
         'smollm2_easy' task set (common.rl.tasks: reasoning-gym chain_sum and basic_arithmetic,
         one +/- operation on 1-2 digit operands; 99 held-out questions) in its chat template
         (prompts left-padded to 96 tokens), after a cached SFT warm-up of 40 steps on worked
         answers ('15 - 43 = -28. The answer is -28.'; common.rl.policies.PretrainedWarmup: 4
         packed rows of train questions per step; the first run on a machine trains it, ~10 min
         on 2 cores). The released model starts at pass@1 0.013 at T = 1; the warmed one at
         0.399 (pass@4 0.616, responses 18.7 tokens on average, at most 21): in the 10-60%
         window. G=4, 8 prompts per step, up to 32 new tokens, 40 steps, Adam
         rl_config.WARMED_START_LR (3e-6); EAD scaled to the ~19-token responses as the smoke
         is to its 1-3 characters: c = 0 (the chat template's tokens are all in the prompt),
         tau_max = 1.2, tau_min = 0.1, d_0 = 24 (tau 1.2 at t = 0, 1.02 at 4, 0.80 at 8 where the
         answer is written, 0.33 at 15, the floor from t ~ 18), +0.03 per step. The harder mix ('smollm2': three terms,
         '*', leg counting) stays reachable with data.task_set=smollm2. Starting pass rates and
         per-step cost: projects/ead/README.md ("SmolLM2").
  (default): the smoke setup at 120 steps.
Arms: ead.mode=ead (the default) or ead.mode=fixed with ead.temperature in {0.6, 1.0, 1.2};
  knobs: ead.tau_max, ead.tau_min, ead.warmup_tokens (c), ead.d0, ead.decay_per_step,
  ead.decay_cap, ead.tis_cap (C; 0 = off), rl.estimator (grpo | dr_grpo | rloo | dapo),
  eval.samples (k of pass@k; 0 = greedy only).
"""

import ml_collections

from common import config as config_lib
from common.rl import config as rl_config
from projects.ead import losses


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = config_lib.parse_arg(arg, variants=('smoke', 'smollm2'))
  c = config_lib.base_config()
  rl_config.tiny_policy(c)
  c.eval = ml_collections.ConfigDict(dict(samples=8))
  c.rl = rl_config.rl()
  c.ead = losses.ead_config()
  c.ead.update(warmup_tokens=0, d0=3.0, decay_per_step=0.005)
  c.optimizer = rl_config.optimizer(lr=1e-4)
  c.train.update(num_steps=120, log_every=5, eval_every=40)
  c.checkpoint.every_steps = 40
  if variant == 'smoke':
    c.train.update(num_steps=60, log_every=5, eval_every=20)
    c.checkpoint.every_steps = 20
  if variant == 'smollm2':
    rl_config.smollm2(
      c, max_new_tokens=32, task_set='smollm2_easy', warmup_steps=40, lr=rl_config.WARMED_START_LR
    )
    c.ead.update(warmup_tokens=0, d0=24.0, decay_per_step=0.03)
    c.eval.samples = 8
  return config_lib.finalize(c, overrides)
