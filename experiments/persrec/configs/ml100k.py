"""PerSRec on real MovieLens: ML-100K (default) or ml-latest-small, leave-last-out, full ranking.

COMMAND:
  python -m common.assets fetch ml100k   # once: the recbole wheel's MovieLens-100K, ~2 MB
  python -m experiments.persrec.main \
    --config=experiments/persrec/configs/ml100k.py:persrec --workdir=/tmp/persrec_ml100k

Variants (the issue's ml100k_{sasrec,hstu,persrec}):
  sasrec:  SASRec over the last P + R = 160 items (arm=full, backbone=sasrec)
  hstu:    HSTU over the last 160 items (arm=full)
  persrec: HSTU with k=4 tokens between the old P=128 and the recent R=32 items (the default)
  smoke:   a 1-layer d=16 PerSRec for 20 steps (under a minute after the data set is built).
  Other arms (the key `arm`, also --config.arm=...): ml100k.py:arm=recent (HSTU over the last R=32
  items), arm=mean_pool, arm=noblock, arm=per_user, arm=multiseg. Second data set: add
  data.source=ml_latest_small.
Budget: 2-layer d=64 models, 1500 steps of 32 users (about 50 epochs of the 943 training windows):
about 40 min wall per run on the 2 shared CPU cores (arm=recent is cheaper: a 32-item window).
Expected (persrec, seed 0): test Recall@10 about 0.19, NDCG@10 0.09, MRR 0.08 (projects/persrec/
README.md; measurements in reports/persrec/history.md).
MovieLens histories are short (median 65 items), so the value of old history is small here.
"""

import ml_collections

from common import config as config_lib
from experiments.persrec.configs import base
from projects.persrec import arms


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = config_lib.parse_arg(arg, variants=('smoke', 'sasrec', 'hstu', 'persrec'))
  c = base.defaults()
  c.model.update(
    d_model=64,
    num_heads=2,
    head_dim=32,
    mlp_dim=128,
    dropout=0.2,
    old_len=128,
    recent_len=32,
    tokens_per_segment=4,
  )
  c.loss.num_negatives = 512
  c.data.update(source='ml100k', batch_size=32, eval_batch_size=128, exclude_seen=True)
  c.data.final_target_weight = 1.0
  c.optimizer.update(lr=1e-3, warmup_steps=100)
  c.train.update(num_steps=1500, log_every=50, eval_every=500)
  c.checkpoint.every_steps = 500
  if variant == 'sasrec':
    c.model.backbone = 'sasrec'
    c.arm = 'full'
  elif variant == 'hstu':
    c.arm = 'full'
  elif variant == 'smoke':
    c.model.update(d_model=16, num_layers=1, num_heads=1, head_dim=16, old_len=16, recent_len=8)
    c.model.tokens_per_segment = 2
    c.loss.num_negatives = 64
    c.data.update(batch_size=16, eval_batch_size=128)
    c.optimizer.warmup_steps = 5
    c.train.update(num_steps=20, log_every=10, eval_every=20)
    c.checkpoint.every_steps = 10
  arms.derive(c, segments=4 if variant != 'smoke' else 2)
  return config_lib.finalize(c, overrides)
