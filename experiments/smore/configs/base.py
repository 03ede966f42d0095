"""S'MoRE vs MixLoRA vs HydraLoRA vs LoRA adapters at an equal trainable-parameter budget.

Every run fine-tunes adapters on the FFN projections (gate/up/down, as in the paper's configs) of a
frozen LM; the adapter preset's rank is chosen so its trainable count equals a LoRA of rank
adapter.budget_rank on the same layers within adapter.tolerance (2%); the plan is logged and written
to WORKDIR/adapter_plan.json, and a budget that cannot be met stops the run at start-up.

COMMAND:
  python -m experiments.smore.main \
    --config=experiments/smore/configs/base.py:smoke --workdir=/tmp/smore_smoke

Variants:
  smoke: the shared tiny LM (common.models.tiny_lm: 2 layers, d_model 64, vocab 64; trained
    once and cached), 8 procedural token-map tasks in 2 families (input_pipeline.TokenTasks), preset
    smore22 by default (adapter.preset=lora|mixlora|hydralora|smore22|smore44), budget = LoRA rank 16
    on the 6 FFN projections (18,432 parameters; S'MoRE's router uses d_down = m = 4 at this
    width, still about 12% of its budget), 200 steps of 32 sequences of 17 tokens, eval on
    512 held-out sequences at the end, one checkpoint at the end. No weights are fetched. Well
    under a minute on 2 cores once compiled.
  smollm2_{lora,mixlora,hydralora,smore22,smore44}: SmolLM2-135M-Instruct (30 layers, d_model 576,
    FFN 1536; `python -m common.assets fetch smollm2`), budget = LoRA rank 32 on the 90 FFN
    projections (6,082,560 parameters; S'MoRE d_down = m = 16), a reasoning-gym instruction mix of
    5 task families (basic_arithmetic, leg_counting as the word problem, syllogism as the logic
    task, spell_backward and letter_counting as string manipulations; 400 train / 50 test each,
    246 test questions left after the builder's train/test de-duplication) as chat prompts, 200
    steps of 8 single-example rows of 160 tokens (256k token slots), eval on the held-out
    questions every 100 steps. Expected time on 2 quiet cores: 5-11 s per step, so 20-40 minutes
    of training plus ~2 minutes per evaluation and a few minutes of compilation (the full suite
    compiles without the persistent cache). Launch to step 10 of smollm2_smore22, 2026-12-05,
    2 cores shared with other jobs: median 5.4 min (3.8-6.1, 3 runs), was 8.7 min (5.8-8.8)
    while building the adapters inside abstract_state's trace was quadratic in their number
    (fixed by models.KeyStream); results in projects/smore/README.md.
  smollm2_smore22_identity: the identity-activation ablation (the S'MoRE gain should vanish).
Override any key: --config.train.num_steps=500 or base.py:smoke,adapter.preset=lora,seed=3.
"""

import ml_collections

from common import config as config_lib

PRESETS = ('lora', 'mixlora', 'hydralora', 'smore22', 'smore44')
VARIANTS = ('smoke', *[f'smollm2_{p}' for p in PRESETS], 'smollm2_smore22_identity')

FFN = r'layers/\d+/mlp/(gate|up|down)_proj'

# reasoning-gym tasks of the SmolLM2 mix: (name, train, test, generator kwargs).
RG_TASKS = (
  ('basic_arithmetic', 400, 50, {'min_terms': 2, 'max_terms': 2, 'min_digits': 1, 'max_digits': 2}),
  ('leg_counting', 400, 50, {}),
  ('syllogism', 400, 50, {}),  # Yes/No; propositional_logic has no gold answer
  ('spell_backward', 400, 50, {}),
  ('letter_counting', 400, 50, {}),
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = config_lib.parse_arg(arg, variants=VARIANTS)
  c = config_lib.base_config()
  c.model = ml_collections.ConfigDict({'source': 'smollm2'})  # 'tiny_lm' or a GGUF asset name
  c.adapter = ml_collections.ConfigDict(
    dict(
      preset='smore22',
      pattern=FFN,
      exclude='',
      budget_rank=16,  # the budget: a LoRA of this rank on the same layers
      tolerance=0.02,
      experts=4,  # MixLoRA experts / HydraLoRA heads
      top_k=2,
      gate='switch',  # switch | noisy_topk | dense
      gate_dim=32,  # S'MoRE: key/query size m
      down_dim=32,  # S'MoRE: router input projection d_down
      activation='tanh',  # tanh | relu | identity
      position='all',  # all (S'MoRE) | child (S'MoRE*)
      shared_pool=False,  # S'MoRE#
      init='w_final_zero',
      balance_weight=1e-2,
    )
  )
  c.data = ml_collections.ConfigDict(
    dict(
      source='reasoning_gym',
      seed=0,
      triples=6,  # token_tasks: (task, x, y) triples per sequence
      batch_size=8,
      eval_batch_size=8,
      eval_examples=250,
      seq_len=160,
      rg_tasks=RG_TASKS,
    )
  )
  c.optimizer = ml_collections.ConfigDict(
    dict(lr=1e-3, warmup_steps=30, weight_decay=0.0, clip_norm=1.0)
  )
  c.train.num_steps = 200
  c.train.log_every = 10
  c.train.eval_every = 100
  c.checkpoint.every_steps = 50
  c.checkpoint.keep = 1  # the frozen base is part of the state: keep one copy on disk
  if variant == 'smoke':
    c.model.source = 'tiny_lm'
    c.adapter.update(budget_rank=16, gate_dim=4, down_dim=4)
    c.data.update(source='token_tasks', batch_size=32, eval_batch_size=128, eval_examples=512)
    c.optimizer.update(lr=1e-2, warmup_steps=20)
    c.train.update(num_steps=200, log_every=50, eval_every=200)
    c.checkpoint.update(every_steps=200, keep=1)
  if variant.startswith('smollm2_'):
    c.adapter.update(budget_rank=32, gate_dim=16, down_dim=16)
    preset = variant[len('smollm2_') :]
    if preset == 'smore22_identity':
      c.adapter.update(preset='smore22', activation='identity')
    else:
      c.adapter.preset = preset
  return config_lib.finalize(c, overrides)
