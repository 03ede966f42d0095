"""FuseChat's claims for the reproduction suite (`python -m experiments.reproduce --only=fusechat`).

Every run is `train.train_and_evaluate` on experiments/fusechat/configs/base.py (smoke: tiny
members with three different BPE vocabularies, pretrained here; full: SmolLM2-135M-Instruct
fused with Qwen2.5-Coder-0.5B-Instruct and Gemma-3-270M), one per seed; the seed picks the fusion
corpus (fuse.data_seed) and the batch order. Its final eval row holds every model's per-skill
accuracy (code-ish string tasks, R documentation cloze; 4 choices) and nats per byte.

  * sce_beats_targets (empirical): per seed, mean accuracy of the SCE merge minus that of the best
    pairwise fused target (> 0: SCE better). The paper: FuseChat-7B-v2.0 (the SCE merge) reaches
    MT-Bench 7.38, above each of its pairwise fused targets.
  * sce_beats_merges (empirical): SCE minus the best of linear averaging, task arithmetic, TIES and
    DARE on the same fused targets (the paper's Table on merging methods: SCE highest).
  * sce_nll_vs_targets / sce_nll_vs_merges (empirical): the same two comparisons on held-out nats
    per byte (mean of the two skills; < 0: SCE better).
  * fusion_beats_clm (empirical): each fused target's accuracy on its source's skill (coder: code,
    general: text) minus a CLM-only fine-tune of the pivot on the same texts and batches
    (fuse.lam = 1), averaged over the two targets: what the cross-tokenizer distillation adds.
  * identity_alignment (invariant): the pivot as its own source through the whole pipeline: target
    tokens not one-to-one aligned + vocabulary ids not mapped to themselves (must be 0).
  * resume_bitwise (invariant): a fusion run SIGKILLed between checkpoints and resumed replays the
    uninterrupted run exactly.

Budgets: smoke, 3 seeds x (FuseChat + the CLM control) + 2 invariant runs of the tiny members
(their pretraining is cached after the first use); see projects/fusechat/README.md for the measured
time. full: one seed of the real setting (hours on 2 shared cores; resumable). The runs of one
process share what does not depend on the seed or on lambda, bitwise: the pivot's and the sources'
evaluations, the two identical lambda = 1 copies' evaluation, a seed's aligned teachers and the
traced update step (projects/fusechat/{evaluate,input_pipeline,train}.py); the CLM control merges
nothing (no claim reads its merges).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from experiments import reproduce
from experiments.fusechat.configs import base
from projects.fusechat import input_pipeline
from projects.fusechat import models
from projects.fusechat import train

TITLE = (
  'FuseChat: cross-tokenizer knowledge fusion of chat LLMs, then SCE merging (arXiv 2408.07990)'
)
SEEDS = {'smoke': (0, 1, 2), 'full': (0,)}
ASSETS = {'full': ('smollm2', 'qwen2_5_coder_0_5b', 'gemma3_270m')}
OTHER_MERGES = ('linear', 'task_arithmetic', 'ties', 'dare')
PAPER = (
  'FuseChat-7B-v2.0 (SCE merge of six pairwise fused OpenChat-3.5-7B targets): MT-Bench 7.38 '
  '(GPT-4-0125 judge), AlpacaEval 2.0 LC 17.16%; the merge scores above each pairwise target'
)
PAPER_MERGES = (
  'Table (merging methods on the same fused targets): SCE above linear, task arithmetic, TIES '
  'and DARE on MT-Bench'
)


def run(seed: int, suite: str, root: pathlib.Path, *, lam: float | None = None) -> dict:
  """The final eval row of a finished run (reused when its workdir already finished)."""
  label = 'fusechat' if lam is None else f'clm_lam{lam:g}'
  workdir = root / f'{label}_seed{seed}'
  if not (workdir / 'results.json').is_file():
    args = ['smoke' if suite == 'smoke' else 'real', f'seed={seed}', f'fuse.data_seed={seed}']
    if lam is not None:
      args.append(f'fuse.lam={lam}')
    if suite == 'smoke':  # fresh workdirs per suite run: only the final checkpoint is of use
      args.append('checkpoint.every_steps=1000000')
    config = base.get_config(','.join(args))
    if lam is not None:  # a control: only its fused targets are compared, its merges are not
      config.merge.methods = ()
    train.train_and_evaluate(config, str(workdir))
  return json.loads((workdir / 'results.json').read_text())['eval']


def _targets(row: dict) -> list[str]:
  return sorted({k.split('/')[0] for k in row if k.startswith('fused_') and k.endswith('/acc')})


def sce_vs(others: str, key: str, *, lower_is_better: bool):
  def measure(suite: str, root: pathlib.Path) -> reproduce.Measurement:
    values, lines = {}, []
    for seed in SEEDS[suite]:
      row = run(seed, suite, root)
      names = _targets(row) if others == 'targets' else list(OTHER_MERGES)
      scores = {n: row[f'{n}/{key}'] for n in names}
      best = min(scores.values()) if lower_is_better else max(scores.values())
      values[f'seed={seed}'] = row[f'sce/{key}'] - best
      lines.append(
        f'seed {seed}: sce {row[f"sce/{key}"]:.3f}, '
        + ', '.join(f'{n} {v:.3f}' for n, v in scores.items())
        + f', pivot {row[f"pivot/{key}"]:.3f}'
      )
    return reproduce.Measurement(values, f'{key}: ' + ' | '.join(lines))

  return measure


SKILL_OF = {'fused_coder': 'code', 'fused_general': 'text'}


def measure_fusion_vs_clm(suite: str, root: pathlib.Path) -> reproduce.Measurement:
  values, lines = {}, []
  for seed in SEEDS[suite]:
    row, clm = run(seed, suite, root), run(seed, suite, root, lam=1.0)
    diffs = []
    for n in _targets(row):
      skill = SKILL_OF.get(n, 'code' if 'coder' in n else 'text')
      diffs.append(row[f'{n}/{skill}/acc'] - clm[f'{n}/{skill}/acc'])
      lines.append(
        f'seed {seed} {n} {skill}: {row[f"{n}/{skill}/acc"]:.3f} vs CLM-only '
        f'{clm[f"{n}/{skill}/acc"]:.3f}'
      )
    values[f'seed={seed}'] = float(np.mean(diffs))
  return reproduce.Measurement(values, 'accuracy on the source\'s skill: ' + ' | '.join(lines))


def measure_identity(suite: str, root: pathlib.Path) -> reproduce.Measurement:
  del root
  config = base.get_config('smoke' if suite == 'smoke' else 'real')
  config.fuse.fusion = 'source'
  config.model.sources = (config.model.pivot,)
  pivot = models.load_member(config.model.pivot)
  data = input_pipeline.make_fusion_data(config, pivot, [pivot])
  t = data.teachers[pivot.name]
  unaligned = round((1.0 - t.aligned_frac) * int(data.mask.sum()))
  unmapped = int((t.mapping != np.arange(len(t.mapping))).sum())
  detail = (
    f'{pivot.name} as its own source on {len(data)} fusion texts: {unaligned} target tokens not '
    f'one-to-one aligned, {unmapped} of {len(t.mapping)} vocabulary ids not mapped to themselves'
  )
  return reproduce.Measurement({'seed=0': float(unaligned + unmapped)}, detail)


LAUNCHER = reproduce.Launcher(
  paper='fusechat',
  config='experiments/fusechat/configs/base.py',
  args=(
    'smoke',
    'seed=0',
    'train.num_steps=8',
    'checkpoint.every_steps=4',
    'eval.num_items=16',
    'eval.ppl_docs=4',
  ),
)

CLAIMS = [
  reproduce.Claim(
    name='sce_beats_targets',
    kind=reproduce.EMPIRICAL,
    paper_figure=PAPER,
    measure=sce_vs('targets', 'acc', lower_is_better=False),
    rule=reproduce.MeanAbove(0.0),
    unit='mean accuracy, SCE - best fused target',
    assets=ASSETS,
  ),
  reproduce.Claim(
    name='sce_beats_merges',
    kind=reproduce.EMPIRICAL,
    paper_figure=PAPER_MERGES,
    measure=sce_vs('merges', 'acc', lower_is_better=False),
    rule=reproduce.MeanAbove(0.0),
    unit='mean accuracy, SCE - best other merge',
    assets=ASSETS,
  ),
  reproduce.Claim(
    name='sce_nll_vs_targets',
    kind=reproduce.EMPIRICAL,
    paper_figure=PAPER + ' (held-out likelihood is not reported in the paper)',
    measure=sce_vs('targets', 'nll_byte', lower_is_better=True),
    rule=reproduce.MeanBelow(0.0),
    unit='nats per byte, SCE - best fused target',
    assets=ASSETS,
  ),
  reproduce.Claim(
    name='sce_nll_vs_merges',
    kind=reproduce.EMPIRICAL,
    paper_figure=PAPER_MERGES + ' (held-out likelihood is not reported in the paper)',
    measure=sce_vs('merges', 'nll_byte', lower_is_better=True),
    rule=reproduce.MeanBelow(0.0),
    unit='nats per byte, SCE - best other merge',
    assets=ASSETS,
  ),
  reproduce.Claim(
    name='fusion_beats_clm',
    kind=reproduce.EMPIRICAL,
    paper_figure=(
      'pairwise fusion transfers the source\'s skill (FuseLLM / FuseChat: fused targets above '
      'the pivot fine-tuned on the same data)'
    ),
    measure=measure_fusion_vs_clm,
    rule=reproduce.MeanAbove(0.0),
    unit='accuracy on the source\'s skill, fused - CLM-only (lambda = 1)',
    assets=ASSETS,
  ),
  reproduce.Claim(
    name='identity_alignment',
    kind=reproduce.INVARIANT,
    paper_figure='identical tokenizers: every token aligned to itself, the identity vocabulary map',
    measure=measure_identity,
    rule=reproduce.AllWithin(0.0),
    unit='tokens unaligned + ids not mapped to themselves',
    assets=ASSETS,
  ),
  *[
    c for c in reproduce.invariant_claims(LAUNCHER, kill_after_step=6) if c.name == 'resume_bitwise'
  ],
]
