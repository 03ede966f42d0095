"""PerSRec on procedural long histories (spec §6(e), scaled to the shared 2-core CPU budget).

COMMAND:
  python -m experiments.persrec.main \
    --config=experiments/persrec/configs/base.py:smoke --workdir=/tmp/persrec_smoke

Variants and arms (the key `arm` selects the compared model; see projects/persrec/arms.py):
  smoke: 300-item catalogue, histories of 48 items (P=32, R=16, k=2), 1-layer d=16 HSTU, 30 steps of
         16 users; about 20-40 s on 2 CPU cores, no downloads. Expected: finite loss, recall_50
         above the 50/300 of a random ranking, serving_max_abs_diff ~1e-7.
  (default): 2000 items in 20 categories, histories of 256 (the last 64 late), 1-2 long-term
         categories with 2 favourites each (p_old=0.5, p_late=0.02, rho=0.5), 2-layer d=32 HSTU,
         P=224, R=32, k=4; 1000 steps of 16 synthetic users (16k users), 1000 held-out users per
         split. About 5-15 min per full/persrec run and 2-4 min per recent run on 2 shared CPU cores.
         Expected: test recall_10 full > recent, with the difference in the long-term targets
         ('test/longterm/...'), and persrec recovering much of it.
  The spec's own scale (histories 512, P=448, R=64) is base.py:data.synthetic.history_len=512,
  data.synthetic.late_len=128,model.old_len=448,model.recent_len=64 (about 4x the cost per step).
  e.g. base.py:arm=recent | arm=full | arm=multiseg | arm=mean_pool | arm=noblock, or
       base.py:smoke,arm=full,seed=1, or --config.arm=full: the same run. The arm sets the model
       keys arms.DERIVED (recent: model.old_len=0, token_mode='none'; multiseg: m=4 segments,
       smoke 2); an explicit override of one of them is kept, and refused when it contradicts the
       arm (e.g. arm=recent with model.old_len=64).
"""

import ml_collections

from common import config as config_lib
from projects.persrec import arms


def defaults() -> ml_collections.ConfigDict:
  """Every key a PerSRec config has (the synthetic defaults)."""
  c = config_lib.base_config()
  c.arm = 'persrec'
  c.model = ml_collections.ConfigDict(
    dict(
      backbone='hstu',
      d_model=32,
      num_layers=2,
      num_heads=2,
      head_dim=16,
      mlp_dim=64,
      dropout=0.0,
      old_len=224,  # P
      recent_len=32,  # R
      token_mode='learned',
      num_segments=1,
      tokens_per_segment=4,  # k (per segment)
      blocking=True,
      rel_pos_bias=True,
      time_bias=True,
      num_time_buckets=64,
      learn_temperature=False,  # the public HSTU scripts fix the temperature (fix_temp)
      temperature=0.05,
    )
  )
  c.loss = ml_collections.ConfigDict(
    dict(negatives='sampled', num_negatives=512, fn_threshold=0.99)
  )
  c.data = ml_collections.ConfigDict(
    dict(
      source='synthetic',  # 'synthetic' | 'ml100k' | 'ml_latest_small'
      batch_size=16,
      eval_batch_size=128,
      eval_users=1000,  # synthetic: held-out users per split (val and test)
      seed=1234,  # MovieLens: the training order
      final_target_weight=128.0,  # synthetic: weight of the sequence's held-out-style last target
      exclude_seen=False,  # rank only items the user has not interacted with (MovieLens: True)
      synthetic=ml_collections.ConfigDict(
        dict(
          num_items=2000,
          num_categories=20,
          history_len=256,
          late_len=64,
          min_long_term=1,
          max_long_term=2,
          favourites_per_category=2,
          p_old=0.5,
          p_late=0.02,
          rho=0.5,
          session_len=24.0,
          zipf=1.0,
          seed=0,
        )
      ),
    )
  )
  c.optimizer = ml_collections.ConfigDict(
    dict(
      lr=2e-3, warmup_steps=100, final_lr_frac=0.1, b1=0.9, b2=0.98, weight_decay=0.0, clip_norm=1.0
    )
  )
  c.train.num_steps = 1000
  c.train.log_every = 50
  c.train.eval_every = 500
  c.checkpoint.every_steps = 500
  return c


def smoke(c: ml_collections.ConfigDict) -> None:
  c.model.update(d_model=16, num_layers=1, num_heads=1, head_dim=16, old_len=32, recent_len=16)
  c.model.tokens_per_segment = 2
  c.loss.num_negatives = 64
  c.data.update(batch_size=16, eval_batch_size=64, eval_users=128, final_target_weight=4.0)
  c.data.synthetic.update(
    num_items=300, num_categories=10, history_len=48, late_len=16, favourites_per_category=2
  )
  c.data.synthetic.p_old = 0.3
  c.optimizer.update(warmup_steps=5, lr=3e-3)
  c.train.update(num_steps=30, log_every=10, eval_every=30)
  c.checkpoint.every_steps = 10


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = config_lib.parse_arg(arg, variants=('smoke',))
  c = defaults()
  if variant == 'smoke':
    smoke(c)
  arms.derive(c, segments=4 if variant != 'smoke' else 2)
  return config_lib.finalize(c, overrides)
