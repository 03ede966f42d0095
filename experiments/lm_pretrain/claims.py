"""lm_pretrain's claims for the reproduction suite (`python -m experiments.reproduce`).

lm_pretrain is the template run, not a paper, so its claims are what every paper's run relies on:
  * eval_beats_unigram (empirical): the held-out loss per token is below the unigram baseline's
    (train-split token frequencies, add-one smoothed) on the same held-out tokens, over seeds 0-2.
    Measured as eval loss - unigram loss (nats/token); the claim is that its mean is below 0.
  * resume_bitwise (invariant): a run SIGKILLed mid-way (between checkpoints) and then resumed writes
    exactly the metrics of the uninterrupted run: every metrics.jsonl value and results.json.
  * sharded_first_steps / sharded_final_loss (invariants): 8 devices (data=2, fsdp=2, tensor=2)
    match 1 device within the architecture doc's tolerances: the first 5 per-step train losses to
    1e-5 relative, the final train and eval losses to 1e-3 (Adam amplifies rounding differences).

Budgets:
  smoke: configs/base.py:smoke (2-layer d_model=64, 60 steps of 16 x 64 tokens = 61k tokens per run).
    Seeds 0-2 train in this process (compiled code is reused); the invariants launch
    `python -m experiments.lm_pretrain.main` subprocesses, because a SIGKILL and a different device
    count both need a fresh process: a 1-device reference, a killed + resumed pair, an 8-device run.
    About 3 minutes on 2 cores.
  full: configs/base.py default (its docstring gives the budget: 600 steps of 32 x 128 tokens, 2.46M
    tokens, 15-25 min per seed on an idle 2-core machine, over an hour when it is shared), seeds 0-2,
    each resumable in its workdir. The
    invariants stay at smoke scale in the full suite: they are properties of the code, not of scale.
"""

from __future__ import annotations

import pathlib

from common import metrics
from experiments import reproduce
from experiments.lm_pretrain.configs import base
from projects.lm_pretrain import evaluate
from projects.lm_pretrain import train

TITLE = 'LM pretraining (template)'
CONFIG = 'experiments/lm_pretrain/configs/base.py'
SEEDS = (0, 1, 2)
# The invariants' runs: per-step train metrics, so the first steps can be compared one by one.
INVARIANT_ARGS = ('smoke', 'seed=0', 'train.log_every=1')
KILL_AFTER_STEP = 45  # smoke: checkpoints every 20 steps, so the resume replays steps 41-45


def config_arg(suite: str, *overrides: str) -> str:
  """The get_config argument of a suite's run: 'smoke,seed=1' or 'seed=1' (the full config)."""
  return ','.join((('smoke',) if suite == 'smoke' else ()) + overrides)


# ---------------------------------------------------------------------------------------------------
# Empirical: eval loss vs the unigram baseline.


def _unigram_loss(config, eval_metrics) -> float:
  """The baseline from the eval metrics when the pipeline reports it, else evaluate.unigram_loss."""
  if 'unigram_loss' in eval_metrics:
    return float(eval_metrics['unigram_loss'])
  return float(evaluate.unigram_loss(config))


def _split_curve(rows, split: str, key: str = 'loss'):
  picked = [(r['step'], r[key]) for r in rows if r['split'] == split and key in r]
  return [s for s, _ in picked], [v for _, v in picked]


def measure_eval_beats_unigram(suite: str, root: pathlib.Path) -> reproduce.Measurement:
  values, curves, losses, baselines = {}, {}, [], []
  for seed in SEEDS:
    config = base.get_config(config_arg(suite, f'seed={seed}'))
    workdir = root / f'seed{seed}'
    result = train.train_and_evaluate(config, str(workdir))
    eval_loss = float(result.eval['loss'])
    unigram = _unigram_loss(config, result.eval)
    values[f'seed={seed}'] = eval_loss - unigram
    losses.append(eval_loss)
    baselines.append(unigram)
    rows = metrics.read_jsonl(workdir / 'metrics.jsonl')
    curves[f'train, seed {seed}'] = _split_curve(rows, 'train')
    curves[f'eval, seed {seed}'] = _split_curve(rows, 'eval')
  unigram = sum(baselines) / len(baselines)
  detail = (
    f'eval loss {", ".join(f"{x:.4f}" for x in losses)} vs unigram baseline '
    f'{", ".join(f"{x:.4f}" for x in baselines)} nats/token (seeds {", ".join(map(str, SEEDS))}).'
  )
  plot = reproduce.Plot(
    title=f'lm_pretrain {suite}: loss vs the unigram baseline',
    xlabel='step',
    ylabel='loss (nats/token)',
    curves=curves,
    hlines={'unigram baseline (eval)': unigram},
  )
  return reproduce.Measurement(values, detail, plot)


CLAIMS = [
  reproduce.Claim(
    name='eval_beats_unigram',
    kind=reproduce.EMPIRICAL,
    paper_figure='n/a (template run): held-out loss below the unigram baseline',
    measure=measure_eval_beats_unigram,
    rule=reproduce.MeanBelow(0.0),
    unit='nats/token (eval - unigram)',
  ),
  *reproduce.invariant_claims(
    reproduce.Launcher(paper='lm_pretrain', config=CONFIG, args=INVARIANT_ARGS),
    kill_after_step=KILL_AFTER_STEP,
    sharded_mesh=('mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2'),
    first_steps=5,
    first_rtol=1e-5,
    final_rtol=1e-3,
  ),
]
