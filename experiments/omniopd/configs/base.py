"""OmniOPD (arXiv 2606.01476): logit-free on-policy distillation from a text-only teacher that audits
the student at entropy peaks, against white-box OPD, SFT on teacher traces and GRPO.

COMMANDS:
  python -m experiments.omniopd.main \
    --config=experiments/omniopd/configs/base.py:smoke --workdir=/tmp/omniopd_smoke
  python -m experiments.omniopd.main \
    --config=experiments/omniopd/configs/base.py:smoke,mode=opd --workdir=/tmp/omniopd_opd
  python -m experiments.omniopd.main \
    --config=experiments/omniopd/configs/base.py:smollm2 --workdir=/tmp/omniopd_smollm2

Variants:
  smoke: the student is the shared warmed-up tiny character LM (common.rl.policies; cached, the
         first run on a machine trains it) on the shared smoke tasks (reasoning-gym chain_sum and
         basic_arithmetic, prompts '36-38='), whose starting held-out pass rate is in the 10-60%
         window (greedy 0.33, projects/omniopd/README.md). The teacher is scripted from the
         verifiable answers (models.ScriptedTeacher: right on 90% of the prompts, off by 1 or 10
         on the rest; text only for OmniOPD and SFT, its next-character distribution with
         eps = 0.1 for white-box OPD). 16 prompts per step, one rollout each of up to 6 tokens;
         OmniOPD audits the top entropy peak of each rollout, forks K = 4 chunks of L = 2 tokens,
         scores them by edit similarity (no model weights in the smoke: MiniLM is the smollm2
         default), prior Dirichlet(1, 1), anchor beta = 0.1. GRPO: the same prompts with G = 4.
         40 steps, Adam 1e-4 for every arm (EAD's measured stable rate for this policy; 3e-4
         was run first: README); evaluation at steps 0, 20, 40 on the 234 held-out prompts
         (greedy accuracy, repetition loops). About 10-30 s per arm on 2 cores once compiled.
  smollm2: SmolLM2-135M-Instruct student (python -m common.assets fetch smollm2) on OmniOPD's
         SmolLM2 mix (common.rl.tasks.SMOLLM2_EASY_TASKS: a +/- b with 1-2 digit operands, as
         chain_sum and basic_arithmetic questions) in its chat template, where the measured
         starting greedy accuracy is 0.15 on 40 held-out questions and pass@1 0.10 at the rollout
         temperature 0.6 (0.013 at 1.0; experiments/omniopd/pass_rate.py); 8 prompts per step,
         up to 96 new tokens; the teacher Qwen2.5-Coder-0.5B-Instruct behind text (python -m
         common.assets fetch qwen2_5_coder_0_5b; another tokenizer); 3 audits per rollout, K = 4
         chunks of L = 8 tokens, MiniLM similarity (python -m common.assets fetch minilm); the
         teacher answers a step's audits in one batched call, prefilling each prompt's longest
         request once (models.LMTeacher share_prefixes); the forks are sampled from, and the
         update scores them through, the rollout's KV cache (projects.omniopd.models.fork_cache,
         forked_logprobs), and the GRPO arm's update runs in 8 row groups (rl.update_groups:
         14.95 -> 2.22 GiB). A step was ~68 s on 2 cores before the shared prefills and the
         cached forks (README). White-box OPD needs a teacher with the student's
         vocabulary: mode=opd,teacher.kind=sft is SmolLM2 itself after 120 SFT steps on worked
         answers (common.rl.policies.PretrainedWarmup; pass@1 0.533 at T = 0.6, 0.480 at 1.0).
Arms: mode=omniopd (default) | opd | sft | grpo. Knobs: omniopd.* (audits, min_entropy,
  num_candidates, chunk_len, similarity exact|edit|embedding, alpha_accept, alpha_reject,
  anchor_coef, pg_coef, teacher_timeout_s), rl.update_groups, teacher.* (kind scripted|lm|sft, accuracy, eps,
  name (lm), max_new_tokens (a continuation of a prefix), trace_tokens (the sft arm's whole traces;
  0: max_new_tokens), sft_steps (sft: the student's model fine-tuned this many steps)).
"""

import ml_collections

from common import config as config_lib
from common.rl import config as rl_config
from projects.omniopd import losses


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = config_lib.parse_arg(arg, variants=('smoke', 'smollm2'))
  c = config_lib.base_config()
  c.mode = 'omniopd'
  rl_config.tiny_policy(c)
  c.teacher = ml_collections.ConfigDict(
    dict(
      kind='scripted',
      accuracy=0.9,
      eps=0.1,
      seed=0,
      name='',
      max_new_tokens=16,
      trace_tokens=0,
      sft_steps=0,
    )
  )
  c.omniopd = losses.omniopd_config()
  c.rl = rl_config.rl(eval_batch=200)
  c.optimizer = rl_config.optimizer(lr=1e-4)
  c.train.update(num_steps=80, log_every=5, eval_every=40)
  c.checkpoint.every_steps = 40
  if variant == 'smoke':
    c.train.update(num_steps=40, log_every=5, eval_every=20)
    c.checkpoint.every_steps = 20
  if variant == 'smollm2':
    rl_config.smollm2(c, max_new_tokens=96, task_set='smollm2_easy', temperature=0.6)
    # The SFT arm's traces are whole answers (the teacher reaches its answer in ~100 tokens; a
    # reply cut at 24 would teach the student to stop before answering): 160 teacher tokens, more
    # than the student's 96, so a cut reply is always longer than the student's cap and never ends
    # in EOS.
    c.teacher.update(
      kind='lm', name='qwen2_5_coder_0_5b', max_new_tokens=24, trace_tokens=160, sft_steps=120
    )
    c.omniopd.update(audits=3, chunk_len=8, similarity='embedding')
    c.rl.update_groups = 8  # the GRPO arm's update (the shared loop's) in 8 row groups
  return config_lib.finalize(c, overrides)
