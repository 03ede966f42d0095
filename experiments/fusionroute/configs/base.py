"""FusionRoute (arXiv 2601.05106): token-level routing between frozen experts with complementary
router logits, trained by SFT + routing (stage 1) and mixed SFT + CDPO (stage 2).

COMMAND:
  python -m experiments.fusionroute.main \
    --config=experiments/fusionroute/configs/base.py:smoke --workdir=/tmp/fusionroute_smoke

Experts (all variants but smollm2): projects/fusionroute/experts.py trains a 4-layer d_model=64
base (about 270k parameters) on the three procedural domains (math: two-digit addition, code:
reverse-copy, instruct: upper-casing; one character vocabulary) for 600 steps and fine-tunes one
expert per domain from it (1000 / 300 / 300 steps), the math expert with the planted flaw
(data.flaw='carry9'). They are trained once per machine (about 5 minutes on the 2 shared cores at
load 13) and cached outside the repo. The router LM starts from the best single expert on the mixed
held-out set (router.init='math': 0.82 mixed, against 0.47 and 0.41 for the instruct and code
experts and 0.25 for the base), as the paper starts it from Llama-3.1-8B-Instruct, its best single
expert; router.init='base' is the ablation. Stage 1 runs in WORKDIR/stage1, stage 2 in WORKDIR
(projects/fusionroute/train.py says why).

Variants (times on the shared 2-core machine with the experts cached):
  smoke: stage 1 150 steps + stage 2 150 steps of 32 SFT rows (+ 32 preference pairs in stage 2),
         evaluation on 64 held-out prompts per domain + 64 flaw prompts. 2-4 minutes at load 10-14
         (most of it compilation).
  (default): the same experts, stage 1 600 + stage 2 600 steps, 256 held-out prompts per domain.
         About 6 minutes (not yet run by the claims suite).
  smollm2: the issue's real-model arm (projects/fusionroute/smollm2.py): SmolLM2-135M-Instruct as
         the general expert and the router's init (router.init='base', as the paper starts its
         router from its instruct expert), math and string experts as merged LoRA fine-tunes of
         it on reasoning-gym families (the same tokenizer; experts.lora_steps), held-out domains
         math / string / logic (syllogism, seen by no fine-tune) scored by reasoning-gym's
         verifier on greedy answers of at most data.max_new_tokens tokens. Stage 1 60 + stage 2
         60 steps of 6 SFT rows (+ 6 preference pairs in stage 2), AdamW 1e-5, 64 held-out
         questions per domain, 64 pair prompts per domain (the router's questions: another
         reasoning-gym seed, none trained on by the experts or held out). Estimated from the
         pilot's measured costs (router step 5-12 s at load 5-11; 4 fused decodings of 96
         questions about 5 min under load, so ~10 min per evaluation of 192, two per run) at
         1-1.5 h on 2 cores once the experts' adapters are cached (training them the first time:
         ~35 min under load); `python -m experiments.fusionroute.smollm2_pilot` measures the
         expert x domain matrix alone.
Override any key: --config.train.num_steps=300 or base.py:smoke,method=finetuned,seed=1.
"""

import ml_collections

from common import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = config_lib.parse_arg(arg, variants=('smoke', 'smollm2'))
  c = config_lib.base_config()
  # 'fusionroute', or 'finetuned': the paper's fine-tuned baseline (same SFT + DPO, no routing).
  c.method = 'fusionroute'
  c.experts = ml_collections.ConfigDict(
    dict(
      source='tiny',  # 'tiny' (procedural, trained here) | 'smollm2' (the real-model arm)
      d_model=64,
      num_layers=4,
      num_heads=4,
      mlp_dim=256,
      base_steps=600,
      steps=(1000, 300, 300),  # per domain: math, code, instruct
      batch_size=64,
      lr=3e-3,
      replay=0.1,  # share of mixture rows in an expert's data ("a little general text")
      seed=0,
    )
  )
  c.router = ml_collections.ConfigDict(
    dict(
      init='math',  # the router LM's initial weights: 'base' or a domain's expert
      lam=1.0 / 3.0,  # lambda of Eq. 2 (paper: 1/3)
      raw_weights=False,  # w = W h as written (True) or softmax(W h) (core.md [R])
    )
  )
  c.cdpo = ml_collections.ConfigDict(dict(beta=0.1, weight=1.0))  # paper: beta = 0.1
  c.data = ml_collections.ConfigDict(
    dict(
      seed=0,  # held-out prompts and preference prompts (training rows follow config.seed)
      flaw='carry9',  # the math expert's planted flaw: 'carry9' | 'none'
      batch_size=32,  # SFT rows per step (stage 2: as many preference pairs again)
      eval_per_domain=256,
      flaw_eval=128,
      pair_prompts=256,  # per domain; pairs where some expert answers wrongly
    )
  )
  c.stage1 = ml_collections.ConfigDict(dict(num_steps=600))
  c.optimizer = ml_collections.ConfigDict(
    dict(
      lr=1e-3, warmup_steps=20, final_lr_frac=0.1, b1=0.9, b2=0.98, weight_decay=0.0, clip_norm=1.0
    )
  )
  c.eval = ml_collections.ConfigDict(
    dict(batch_size=64, merge_scale=1.0, ties_density=0.5, dare_drop=0.9, defer_threshold=0.5)
  )
  c.debug.stage = 2  # the stage whose run the fault injection (debug.*_after_step) targets
  c.train.num_steps = 600  # stage 2
  c.train.log_every = 25
  c.train.eval_every = 300
  c.checkpoint.every_steps = 100
  if variant == 'smoke':
    c.data.update(eval_per_domain=64, flaw_eval=64)
    c.stage1.num_steps = 150
    c.train.update(num_steps=150, log_every=10, eval_every=150)
    c.checkpoint.every_steps = 50
  if variant == 'smollm2':
    c.experts.update(source='smollm2', lora_steps=(120, 40))  # math, string (the pilot's)
    c.router.init = 'base'  # SmolLM2-135M-Instruct, the general expert
    c.data.update(
      flaw='none', batch_size=6, eval_per_domain=64, pair_prompts=64, seq_len=96, max_new_tokens=24
    )
    c.eval.batch_size = 32
    c.stage1.num_steps = 60
    c.optimizer.update(lr=1e-5, warmup_steps=5, weight_decay=0.0)
    c.train.update(num_steps=60, log_every=5, eval_every=60)
    c.checkpoint.every_steps = 20
  return config_lib.finalize(c, overrides)
