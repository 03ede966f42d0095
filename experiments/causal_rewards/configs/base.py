"""Causal Rewards (CRM, arXiv 2501.09620): reward models invariant to a spurious cue.

COMMANDS:
  python -m experiments.causal_rewards.main \
    --config=experiments/causal_rewards/configs/base.py:smoke --workdir=/tmp/crm_smoke
  python -m experiments.causal_rewards.main \
    --config=experiments/causal_rewards/configs/base.py:smoke,crm.lam=1.0 --workdir=/tmp/crm_l1
  python -m experiments.causal_rewards.main \
    --config=experiments/causal_rewards/configs/base.py:smollm2 --workdir=/tmp/crm_smollm2

Data (projects/causal_rewards/input_pipeline.py): reasoning-gym 'chain_sum' (a +/- b, 1-digit)
answered correctly (chosen) or wrongly (rejected, verified by the task's scorer), with a spurious
cue (data.cue: sycophancy | length | format) on the chosen response with probability
data.train_correlation in training and on either side equally at test. No human-preference data.

Methods (one run each; crm.lam = 0 is vanilla Bradley-Terry):
  vanilla BT         crm.lam=0
  data balancing     crm.lam=0,data.balance=True
  length penalty     the vanilla run's lp_* evaluation metrics (a post-hoc penalty, no training)
  unconditional CRM  crm.mode=unconditional,crm.lam=L
  conditional CRM    crm.mode=conditional,crm.lam=L (the default mode)
Knobs: crm.representation (features | reward), crm.bandwidth (0: median heuristic),
crm.unbiased, data.length_bins (Z's quantile bins for the length cue).

Variants (times on the shared 2-core machine):
  smoke: a 2-layer d_model 64 character-level decoder (LM warm-up, then the reward head), 100
         steps of 32 pairs (3,200 pairs, 6,400 responses of at most 8 + 32 characters), evaluation
         on 128 test quads (512 responses) at the end. No model weights. About 15-30 s of training
         per run on the shared 2-core machine once the data are built (the first run builds the
         reasoning-gym set, reads the corpus and warms the backbone up once per machine).
  smollm2: SmolLM2-135M-Instruct (python -m common.assets fetch smollm2), frozen, with a trained
         linear head on the last response token (model.trainable=head; lora also works), the CRM
         penalty on the reward (crm.representation=reward: frozen features cannot move), English
         questions in its chat template and "The answer is N." responses; 200 steps of 16 pairs
         (3,200 pairs, prompts <= 48 and responses <= 40 tokens), evaluation on 128 quads at steps
         100 and 200. Measured on the shared 2-core machine at load average ~20: ~100 s to compile,
         ~20 s per step, ~4 min per evaluation of 32 quads (+ the 256 length-penalty fit pairs), so
         the full variant is ~1.5 h per run there; the measured run used train.num_steps=40,
         data.num_test=32 (~17 min).
  (default): the smoke model and data at 600 steps (19,200 pairs), 512 test quads.
Override any key: base.py:smoke,crm.lam=3.0,data.cue=length or --config.seed=2.
"""

import ml_collections

from common import config as config_lib
from projects.causal_rewards import losses


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = config_lib.parse_arg(arg, variants=('smoke', 'smollm2'))
  c = config_lib.base_config()
  c.model = ml_collections.ConfigDict(
    dict(
      kind='tiny',  # tiny | pretrained
      name='',  # the pretrained model's asset name
      pool='last',  # last | mean
      trainable='all',  # all | head | lora
      lora_rank=8,
      d_model=64,
      num_layers=2,
      num_heads=4,
      mlp_dim=256,
      warmup_steps=400,  # tiny: LM warm-up on correct 'expr=answer' strings (0: none)
    )
  )
  c.data = ml_collections.ConfigDict(
    dict(
      cue='sycophancy',  # sycophancy | length | format
      train_correlation=0.9,  # P(cue on the chosen response) in training
      balance=False,  # data balancing: reweight pairs so the cue is independent of the label
      seed=0,
      batch_size=32,  # pairs per step
      eval_batch=64,  # responses per evaluation forward
      num_test=512,  # test quads (4 responses each)
      prompt_len=8,
      response_len=32,
      length_bins=4,
    )
  )
  c.crm = losses.crm_config()
  c.optimizer = ml_collections.ConfigDict(
    dict(
      lr=2e-3, warmup_steps=20, final_lr_frac=0.1, b1=0.9, b2=0.99, weight_decay=0.0, clip_norm=1.0
    )
  )
  c.train.num_steps = 600
  c.train.log_every = 50
  c.train.eval_every = 300
  c.checkpoint.every_steps = 100
  if variant == 'smoke':
    c.data.update(num_test=128)
    c.train.update(num_steps=100, log_every=10, eval_every=100)
    c.checkpoint.every_steps = 50
  if variant == 'smollm2':
    c.model.update(kind='pretrained', name='smollm2', trainable='head')
    # A frozen backbone's features do not move: the penalty acts on the reward it can change.
    c.crm.representation = 'reward'
    c.data.update(batch_size=16, eval_batch=64, num_test=128, prompt_len=48, response_len=40)
    c.optimizer.update(lr=1e-3, warmup_steps=10)
    c.train.update(num_steps=200, log_every=10, eval_every=100)
    c.checkpoint.every_steps = 50
  return config_lib.finalize(c, overrides)
