"""BlockPruner's claims for the reproduction suite (`python -m experiments.reproduce --only=blockpruner`).

Every run is `train.train_and_evaluate` on experiments/blockpruner/configs/base.py (smoke: the
8-layer text LM pretrained here on R documentation, 16 blocks; full: SmolLM2-135M-Instruct, 60
blocks), one per (method, seed); the seed picks the calibration subset (and the random order).
Block methods remove `BLOCK_STEPS` blocks, layer methods `LAYER_STEPS` layers (the same share of
the blocks), with held-out perplexity and multiple-choice accuracy after every removal.

  * blocks_beat_layer_ppl / blocks_beat_shortgpt / blocks_beat_random (empirical): per seed, the
    mean over the baseline's removal points of log(held-out R-documentation perplexity of
    BlockPruner / the baseline's) at equal removed parameters (`evaluate.at_equal_params`: each
    baseline point is paired with the first BlockPruner point that removes at least as many
    parameters, so BlockPruner is never credited with removing less). < 0: BlockPruner better.
  * mc_blocks_vs_layers (empirical): the same pairing on the mean zero-shot multiple-choice
    accuracy (rdocs_cloze, chatterbot_answer, arith_choice), BlockPruner - layer perplexity
    pruning; > 0: BlockPruner better.
  * mha_first (empirical): the share of MHA blocks among the blocks BlockPruner (mix) removes; the
    paper finds MHA blocks more redundant (removed first); > 0.5 supports it.
  * removal_equals_mask (invariant): the structurally pruned model of seed 0's final removal set
    gives the masked dense model's logits (max abs difference).

Budgets: smoke, 3 seeds x 4 methods of the smoke model in one process (its pretraining is cached
after the first use, per edit of common/models/decoder.py: about 1-3 minutes). Measured with the
model cached: 62 s CPU (102 s before the evaluation memo and the per-task MC widths), 164 s wall at
load average 11-15 on 2 shared cores. Most of the rest is evaluation (42 distinct evaluations after
every removal, MC included; 24 more are memo hits: the dense model in every run, and removal sets
that several runs reach, e.g. ShortGPT removes the same layers for every seed), then the searches. full: SmolLM2, one seed (BlockPruner alone scores
1,010 candidate removals; measured on 2 shared cores at load 10-16: 6-11 minutes per search step,
the 20 steps take hours; resumable).
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

from common import metrics
from common.models import spec
from experiments import reproduce
from experiments.blockpruner.configs import base
from projects.blockpruner import evaluate
from projects.blockpruner import models
from projects.blockpruner import train

TITLE = 'BlockPruner: fine-grained pruning of MHA / MLP blocks (arXiv 2406.10594)'
SEEDS = {'smoke': (0, 1, 2), 'full': (0,)}
BLOCK_STEPS = {'smoke': 6, 'full': 20}  # ~1/3 of the blocks (smoke: 6 of 16; SmolLM2: 20 of 60)
LAYER_STEPS = {'smoke': 3, 'full': 10}
METHODS = ('blockpruner', 'layer_ppl', 'shortgpt', 'random')
ASSETS = {'full': ('smollm2',)}  # the smoke model is pretrained here; no weights fetched
PPL = 'rdocs/perplexity'
MC = 'mc/mean'
PAPER_TABLE = (
  'Table 1 (Llama2-7B/13B, Baichuan2-7B/13B, Qwen1.5-7B/14B, about 1/3 of the blocks at most): '
  'BlockPruner has the best average zero-shot accuracy (PIQA, WinoGrande, HellaSwag, ARC-e/c) '
  'and the lowest perplexity among ShortGPT, LaCo, RM, SliceGPT at comparable pruning ratios '
  '(exact values not retrieved here)'
)


def run(method: str, seed: int, suite: str, root: pathlib.Path) -> pathlib.Path:
  """A finished run of `method` for `seed` (reused when its workdir already finished)."""
  workdir = root / f'{method}_seed{seed}'
  if not (workdir / 'results.json').is_file():
    steps = (LAYER_STEPS if method in ('layer_ppl', 'shortgpt') else BLOCK_STEPS)[suite]
    args = [
      'smoke' if suite == 'smoke' else 'smollm2',
      f'seed={seed}',
      f'prune.method={method}',
      f'train.num_steps={steps}',
      'prune.save_model=True' if method == 'blockpruner' else 'prune.save_model=False',
    ]
    if suite == 'smoke':  # fresh workdirs per suite run: only the final checkpoint is of use
      args.append('checkpoint.every_steps=1000000')
    train.train_and_evaluate(base.get_config(','.join(args)), str(workdir))
  return workdir


def rows(workdir: pathlib.Path) -> list[dict]:
  return metrics.read_jsonl(workdir / 'metrics.jsonl')


def _pairs(suite, root, seed, baseline, key):
  block = evaluate.curve(rows(run('blockpruner', seed, suite, root)), key)
  other = evaluate.curve(rows(run(baseline, seed, suite, root)), key)
  return evaluate.at_equal_params(block, other)


def beats(baseline: str):
  def measure(suite: str, root: pathlib.Path) -> reproduce.Measurement:
    values, lines, curves = {}, [], {}
    for seed in SEEDS[suite]:
      pairs = _pairs(suite, root, seed, baseline, PPL)
      values[f'seed={seed}'] = evaluate.mean_log_ratio(pairs)
      lines.append(
        f'seed {seed}: ' + ', '.join(f'{a / 1e3:.0f}k: {b:.2f} vs {c:.2f}' for a, b, c, _ in pairs)
      )
    for method in ('blockpruner', baseline):
      xs, ys = zip(*evaluate.curve(rows(run(method, 0, suite, root)), PPL), strict=True)
      curves[method] = ([x / 1e6 for x in xs], list(ys))
    detail = (
      f'held-out {PPL}, BlockPruner vs {baseline} at the baseline\'s removed parameters: '
      + ' | '.join(lines)
    )
    plot = reproduce.Plot(
      title=f'BlockPruner vs {baseline} ({suite}, seed 0)',
      xlabel='removed parameters (M)',
      ylabel=f'held-out {PPL}',
      curves=curves,
    )
    return reproduce.Measurement(values, detail, plot)

  return measure


def measure_mc(suite: str, root: pathlib.Path) -> reproduce.Measurement:
  values, lines = {}, []
  for seed in SEEDS[suite]:
    pairs = _pairs(suite, root, seed, 'layer_ppl', MC)
    values[f'seed={seed}'] = float(np.mean([b - c for _, b, c, _ in pairs])) if pairs else math.nan
    lines.append(f'seed {seed}: ' + ', '.join(f'{b:.3f} vs {c:.3f}' for _, b, c, _ in pairs))
  detail = 'mean MC accuracy, BlockPruner vs layer_ppl at equal removed parameters: ' + ' | '.join(
    lines
  )
  return reproduce.Measurement(values, detail)


def measure_mha_first(suite: str, root: pathlib.Path) -> reproduce.Measurement:
  values, orders = {}, []
  for seed in SEEDS[suite]:
    removed = train.removed_order(run('blockpruner', seed, suite, root))
    values[f'seed={seed}'] = sum(k == 'mha' for _, k in removed) / len(removed)
    orders.append(f'seed {seed}: {models.describe(removed)}')
  return reproduce.Measurement(values, 'removal orders: ' + ' | '.join(orders))


def measure_removal(suite: str, root: pathlib.Path) -> reproduce.Measurement:
  workdir = run('blockpruner', 0, suite, root)
  removed = train.removed_order(workdir)
  small, _ = spec.restore(workdir / 'pruned')
  arg = 'smoke' if suite == 'smoke' else 'smollm2'
  model, _ = models.load(base.get_config(arg))
  tokens = np.random.default_rng(0).integers(1, 500, (2, 32))
  diff = evaluate.removal_gap(model, small, removed, tokens)
  detail = (
    f'{models.describe(removed)} removed: {models.num_params(small):,} of '
    f'{models.num_params(model):,} parameters kept; saved, restored and compared on 2 x 32 tokens'
  )
  return reproduce.Measurement({'seed=0': diff}, detail)


CLAIMS = [
  reproduce.Claim(
    name='blocks_beat_layer_ppl',
    kind=reproduce.EMPIRICAL,
    paper_figure=PAPER_TABLE + '; layer perplexity pruning is the layer-level ablation',
    measure=beats('layer_ppl'),
    rule=reproduce.MeanBelow(0.0),
    unit='mean log perplexity ratio (BlockPruner / layer_ppl)',
    assets=ASSETS,
  ),
  reproduce.Claim(
    name='blocks_beat_shortgpt',
    kind=reproduce.EMPIRICAL,
    paper_figure=PAPER_TABLE,
    measure=beats('shortgpt'),
    rule=reproduce.MeanBelow(0.0),
    unit='mean log perplexity ratio (BlockPruner / ShortGPT)',
    assets=ASSETS,
  ),
  reproduce.Claim(
    name='blocks_beat_random',
    kind=reproduce.EMPIRICAL,
    paper_figure='the search matters: perplexity-guided blocks vs a random order',
    measure=beats('random'),
    rule=reproduce.MeanBelow(0.0),
    unit='mean log perplexity ratio (BlockPruner / random blocks)',
    assets=ASSETS,
  ),
  reproduce.Claim(
    name='mc_blocks_vs_layers',
    kind=reproduce.EMPIRICAL,
    paper_figure=PAPER_TABLE,
    measure=measure_mc,
    rule=reproduce.MeanAbove(0.0),
    unit='mean MC accuracy difference (BlockPruner - layer_ppl)',
    assets=ASSETS,
  ),
  reproduce.Claim(
    name='mha_first',
    kind=reproduce.EMPIRICAL,
    paper_figure='Sec. 4 / Fig. 4-5: MHA blocks are more redundant than MLP blocks (pruned first)',
    measure=measure_mha_first,
    rule=reproduce.MeanAbove(0.5),
    unit='share of MHA among the removed blocks',
    assets=ASSETS,
  ),
  reproduce.Claim(
    name='removal_equals_mask',
    kind=reproduce.INVARIANT,
    paper_figure='structural removal computes what skipping the blocks computes (deployment)',
    measure=measure_removal,
    rule=reproduce.AllWithin(1e-4),
    unit='max abs logit difference',
    assets=ASSETS,
  ),
]
