"""FuseChat (arXiv 2408.07990): pairwise cross-tokenizer fusion into a pivot, then SCE merging.

Stage 1 fine-tunes one full copy of the pivot per source on L = fuse.lam * L_CLM + (1 - fuse.lam)
* L_fuse against the source's top-k distributions (cached on disk once), aligned to the pivot's
tokens and vocabulary (projects/fusechat/align.py), MinCE choosing between the source's and the
pivot's own distribution per text (fuse.fusion). Stage 2 merges the fused targets (merge.methods:
sce, linear, task_arithmetic, ties, dare). The final eval row holds per-skill accuracy (code-ish
string tasks, R documentation cloze) and nats per byte of the pivot, every source, every fused
target and every merge.

COMMAND:
  python -m experiments.fusechat.main \
    --config=experiments/fusechat/configs/base.py:smoke --workdir=/tmp/fusechat_smoke

Variants (times on the shared 2-core CPU machine, with other jobs running):
  smoke: tiny decoders pretrained here (no weights fetched; once per machine, cached): pivot
         (BPE 384, mixed corpus, 120 steps), coder (BPE 260 ~ characters, code-ish string tasks,
         400 steps), general (BPE 768, R documentation, 400 steps); all d=64, 4 layers. Fusion:
         256 texts of <= 48 pivot tokens, top-8, 80 steps of batch 16, lambda 0.9.
  (default) real: pivot SmolLM2-135M-Instruct, sources Qwen2.5-Coder-0.5B-Instruct and
         Gemma-3-270M (assets smollm2, qwen2_5_coder_0_5b, gemma3_270m). Fusion: 128 texts of <= 64
         pivot tokens, top-10, 60 steps of batch 8, full fine-tuning at lr 1e-5; evaluation 32
         items per skill, 16 documents per skill, evaluation batches of 4 (memory). Measured
         (projects/fusechat/README.md): top-k passes and alignment ~30 min wall (once, cached),
         then 32 CPU-min and 50 min wall at load 6-12 for fine-tuning and evaluation; peak RSS
         15 GB, so run it with MALLOC_MMAP_THRESHOLD_=131072 MALLOC_ARENA_MAX=2 and little else
         beside it (resumable).
Override any key: base.py:smoke,fuse.lam=1.0 (the CLM-only control) or --config.merge.sce_density=0.5.
"""

import ml_collections

from common import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = config_lib.parse_arg(arg, variants=('smoke', 'real'))
  variant = variant or 'real'
  c = config_lib.base_config()
  c.model = ml_collections.ConfigDict(
    dict(pivot='smollm2', sources=('qwen2_5_coder_0_5b', 'gemma3_270m'))
  )
  c.fuse = ml_collections.ConfigDict(
    dict(
      lam=0.9,  # L = lam * CLM + (1 - lam) * fuse (FuseLLM / FuseChat's lambda)
      fusion='mince',  # mince (per text: the teacher of lower NLL per character) | source
      topk=10,  # top-k of each distribution kept (FuseLLM: 10)
      num_examples=128,
      seq_len=64,  # pivot tokens per text (at most)
      chars=320,  # characters drawn per text before the cut
      batch_size=8,
      data_seed=0,  # the fusion corpus (the run seed orders the batches)
    )
  )
  c.merge = ml_collections.ConfigDict(
    dict(
      methods=('sce', 'linear', 'task_arithmetic', 'ties', 'dare'),
      sce_density=0.1,  # SCE select: top 10% of positions by variance
      ties_density=0.5,
      dare_drop=0.5,
      ta_scale=1.0,  # task arithmetic and DARE: base + ta_scale * sum of deltas
      dare_seed=0,
    )
  )
  c.eval = ml_collections.ConfigDict(
    dict(num_items=32, ppl_docs=16, ppl_chars=512, ppl_seq_len=128, batch_size=4, seed=0)
  )
  c.optimizer = ml_collections.ConfigDict(
    dict(lr=1e-5, warmup_steps=6, clip_norm=1.0, weight_decay=0.0)
  )
  c.train.num_steps = 60
  c.train.log_every = 1
  c.train.eval_every = 0  # the final evaluation only
  c.checkpoint.every_steps = 10
  if variant == 'smoke':
    c.model.update(pivot='tiny:pivot', sources=('tiny:coder', 'tiny:general'))
    c.fuse.update(topk=8, num_examples=256, seq_len=48, chars=160, batch_size=16)
    c.eval.update(num_items=64, ppl_docs=24, ppl_chars=384, ppl_seq_len=64, batch_size=32)
    c.optimizer.update(lr=1e-3, warmup_steps=8)
    c.train.num_steps = 80
    c.checkpoint.every_steps = 20
  return config_lib.finalize(c, overrides)
