"""PerSRec on long procedural histories (up to 4096 items): the history-length sweep.

COMMAND:
  python -m experiments.persrec.main \
    --config=experiments/persrec/configs/synthetic_long.py:model.old_len=768 \
    --workdir=/tmp/persrec_long

Each user has 4096 history items (the last 512 are the late phase, where long-term favourites
are rare) and the models read the last window = P + R items: arm=full over all of them,
arm=persrec with the P = model.old_len old items compressed into k=4 tokens and the R=256 recent
items, arm=recent over the last R only. The sweep is window in {512, 1024, 2048, 4096}, i.e.
model.old_len in {256, 768, 1792, 3840} (recall vs history length, spec §6(c) Fig. 1), with
P=1024, R=256 the serving-cost point of the issue.
Variants:
  smoke: 1024-item histories (late 128), R=64, P=192 (window 256), 1-layer d=16, 20 steps of 8
         users.
  (default): 2-layer d=32 HSTU, 800 steps of 8 users. A full-history step at window=4096 costs
         about 30x one at 512 on CPU: the full-history arm at 2048-4096 is for an accelerator
         (hours on 2 CPU cores); PerSRec trains the same P + k + R sequence, so its training cost
         is the full model's, while its serving cost is flat (benchmarks/persrec_serving.py).
"""

import ml_collections

from common import config as config_lib
from experiments.persrec.configs import base
from projects.persrec import arms


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = config_lib.parse_arg(arg, variants=('smoke',))
  c = base.defaults()
  c.data.synthetic.update(history_len=4096, late_len=512, p_old=0.05)
  c.data.update(batch_size=8, eval_batch_size=64, eval_users=500, final_target_weight=64.0)
  c.model.update(recent_len=256, old_len=768)
  c.train.update(num_steps=800, log_every=50, eval_every=400)
  c.checkpoint.every_steps = 200
  if variant == 'smoke':
    c.data.synthetic.update(history_len=1024, late_len=128, p_old=0.1)
    c.data.update(eval_users=64, eval_batch_size=32)
    c.model.update(d_model=16, num_layers=1, num_heads=1, head_dim=16, recent_len=64)
    c.model.update(old_len=192, tokens_per_segment=2)
    c.loss.num_negatives = 64
    c.optimizer.warmup_steps = 5
    c.train.update(num_steps=20, log_every=10, eval_every=20)
    c.checkpoint.every_steps = 10
  arms.derive(c, segments=4)
  return config_lib.finalize(c, overrides)
