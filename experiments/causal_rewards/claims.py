"""Causal Rewards' claims for the reproduction suite (`python -m experiments.reproduce --only=causal_rewards`).

Every empirical claim reads the same 20 runs: 5 seeds (seed = data.seed = 0..4: the head's init
and the pair stream; at 3 seeds the sycophancy verdict flipped between an Intel and an AMD VM) x 4
trained methods (length_pen reads the vanilla runs) on the sycophancy cue (a flattering opener on
the chosen response of 90% of training pairs; decorrelated test quads,
projects/causal_rewards/evaluate.py):
  vanilla      Bradley-Terry (crm.lam = 0)
  balance      data balancing (importance weights making the cue independent of the label)
  length_pen   the vanilla model's rewards with the post-hoc length penalty (lp_* metrics; no run)
  crm_uncond   unconditional CRM, crm.lam = LAM
  crm_cond     conditional CRM, crm.lam = LAM (the paper's choice against sycophancy)
LAM = 1.0 was fixed before these claims ran (one exploratory seed-0 run of the previous smoke
config, 150 steps, was looked at; no sweep was used to pick it; experiments/causal_rewards/sweep.py
draws the whole lambda sweep). Each claim's value per seed is conditional CRM minus vanilla on the
same seed; the details give every method's mean and 95% t half-width.

  * sycophancy_rate: cue_pref = P(r(y with the opener) > r(y)) over counterfactual test pairs;
    the paper: sycophancy rate 92.67% -> 19.78% (Llama-3-8B, conditional CRM).
  * concept_bias: bias = mean r(y with cue) - r(y) in test-reward standard deviations (an analogue
    of Bias@C: the paper's Yelp 'Price' concept 18.88 -> 0.52).
  * spearman: |Spearman(reward, cue)| over the test responses (spec 5(b)).
  * bon_cue_wins: Best-of-4 over each quad picks the wrong answer that carries the cue (the reward
    hack Best-of-N selection exploits).
  * decorrelated_accuracy: pairwise accuracy with the cue independent of the label (the paper's
    Acc@NoC 59.26% -> 97.22%).
  * mmd_estimators (invariant): MMD^2 of identical samples, asymmetry, and the biased estimator's
    most negative value over random pairs of samples.
  * resume_bitwise / sharded_first_steps: the shared invariants on a small CRM run.

Budgets: smoke runs the config's smoke variant (100 steps; ~10-25 s per run on the shared 2-core
machine, all 20 runs in this process, plus three small subprocess runs for the invariants); full
runs the default config (600 steps, 512 test quads), ~2-3 min per run, resumable per run.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from experiments import reproduce
from experiments.causal_rewards.configs import base
from projects.causal_rewards import losses
from projects.causal_rewards import train

TITLE = 'Causal Rewards: counterfactually invariant reward models (CRM, arXiv 2501.09620)'
SEEDS = (0, 1, 2, 3, 4)
LAM = 1.0
CONFIG = 'experiments/causal_rewards/configs/base.py'
METHODS = {
  'vanilla': ('crm.lam=0.0',),
  'balance': ('crm.lam=0.0', 'data.balance=True'),
  'crm_uncond': (f'crm.lam={LAM}', 'crm.mode=unconditional'),
  'crm_cond': (f'crm.lam={LAM}', 'crm.mode=conditional'),
}
SHOWN = ('vanilla', 'balance', 'length_pen', 'crm_uncond', 'crm_cond')


def run_method(method: str, seed: int, suite: str, root: pathlib.Path) -> dict:
  """The final eval metrics of one run (reused when its workdir already finished)."""
  workdir = root / f'{method}_seed{seed}'
  done = workdir / 'results.json'
  if not done.is_file():
    extra = ('checkpoint.every_steps=1000000',) if suite == 'smoke' else ()
    args = (('smoke',) if suite == 'smoke' else ()) + (f'seed={seed}', f'data.seed={seed}')
    config = base.get_config(','.join(args + METHODS[method] + extra))
    train.train_and_evaluate(config, str(workdir))
  return json.loads(done.read_text())['eval']


def metric_of(method: str, metric: str, seed: int, suite: str, root: pathlib.Path) -> float:
  if method == 'length_pen':
    return run_method('vanilla', seed, suite, root)[f'lp_{metric}']
  return run_method(method, seed, suite, root)[metric]


def _fmt(xs) -> str:
  s = reproduce.summarize(xs)
  return f'{s.mean:.3f} ± {s.spread:.3f}'


def diff_measure(metric: str, transform=lambda x: x):
  """measure(): per seed transform(crm_cond) - transform(vanilla); every method in the detail."""

  def measure(suite: str, root: pathlib.Path) -> reproduce.Measurement:
    got = {m: [transform(metric_of(m, metric, s, suite, root)) for s in SEEDS] for m in SHOWN}
    values = {f'seed={s}': got['crm_cond'][i] - got['vanilla'][i] for i, s in enumerate(SEEDS)}
    detail = f'{metric} per method (mean ± 95% t, seeds {list(SEEDS)}): ' + '; '.join(
      f'{m} {_fmt(got[m])}' for m in SHOWN
    )
    plot = reproduce.Plot(
      title=f'Causal Rewards ({suite}, sycophancy cue): {metric} per method',
      xlabel='seed',
      ylabel=metric,
      curves={m: (list(SEEDS), got[m]) for m in SHOWN},
    )
    return reproduce.Measurement(values, detail, plot)

  return measure


def measure_mmd(suite: str, root: pathlib.Path) -> reproduce.Measurement:
  del suite, root
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(16, 4)), rng.normal(0.5, 1.0, size=(12, 4))
  values = {
    'MMD^2_b(x, x)': float(losses.mmd2(x, x)),
    'MMD^2_b(x, y) - MMD^2_b(y, x)': float(losses.mmd2(x, y) - losses.mmd2(y, x)),
    'MMD^2_u(x, y) - MMD^2_u(y, x)': float(
      losses.mmd2(x, y, unbiased=True) - losses.mmd2(y, x, unbiased=True)
    ),
  }
  worst = min(
    float(losses.mmd2(rng.normal(size=(5, 2)), rng.normal(size=(6, 2)), bandwidth=bw))
    for bw in (0.3, 1.0, 3.0)
    for _ in range(10)
  )
  values['min(0, min MMD^2_b) over 30 random pairs'] = min(0.0, worst)
  return reproduce.Measurement(values, 'RBF kernel; median-heuristic bandwidth unless stated')


PAPER_SYCO = 'sycophancy rate 92.67% -> 19.78% with conditional CRM (Llama-3-8B; Table 1)'
INVARIANT_ARGS = (
  'smoke',
  'model.warmup_steps=0',
  'model.d_model=32',
  'model.num_layers=1',
  'model.mlp_dim=64',
  'data.num_test=16',
  'data.batch_size=8',
  'crm.lam=1.0',
  'train.num_steps=12',
  'train.log_every=1',
  'train.eval_every=12',
  'checkpoint.every_steps=4',
)

CLAIMS = [
  reproduce.Claim(
    name='sycophancy_rate',
    kind=reproduce.EMPIRICAL,
    paper_figure=PAPER_SYCO,
    measure=diff_measure('cue_pref'),
    rule=reproduce.MeanBelow(0.0),
    unit='P(cue preferred), conditional CRM - vanilla',
  ),
  reproduce.Claim(
    name='concept_bias',
    kind=reproduce.EMPIRICAL,
    paper_figure='Yelp "Price" concept Bias@C 18.88 -> 0.52, Acc@NoC 59.26% -> 97.22% (Table 3)',
    measure=diff_measure('bias', abs),
    rule=reproduce.MeanBelow(0.0),
    unit='|bias| in reward sds, conditional CRM - vanilla',
  ),
  reproduce.Claim(
    name='spearman',
    kind=reproduce.EMPIRICAL,
    paper_figure='n/a in the paper; spec 5(b): Spearman(reward, spurious feature) falls with CRM',
    measure=diff_measure('spearman', abs),
    rule=reproduce.MeanBelow(0.0),
    unit='|Spearman(reward, cue)|, conditional CRM - vanilla',
  ),
  reproduce.Claim(
    name='bon_cue_wins',
    kind=reproduce.EMPIRICAL,
    paper_figure='less reward hacking under optimisation (the paper: PPO with CRM; here Best-of-4)',
    measure=diff_measure('bon_cue_wins'),
    rule=reproduce.MeanBelow(0.0),
    unit='P(Best-of-4 picks the wrong answer with the cue), conditional CRM - vanilla',
  ),
  reproduce.Claim(
    name='decorrelated_accuracy',
    kind=reproduce.EMPIRICAL,
    paper_figure='Acc@NoC 59.26% -> 97.22% (Yelp "Price", Table 3)',
    measure=diff_measure('acc_decorrelated'),
    rule=reproduce.MeanAbove(0.0),
    unit='pairwise accuracy on the decorrelated split, conditional CRM - vanilla',
  ),
  reproduce.Claim(
    name='mmd_estimators',
    kind=reproduce.INVARIANT,
    paper_figure='spec 5(d): MMD^2 = 0 for identical samples, symmetric, biased estimator >= 0',
    measure=measure_mmd,
    rule=reproduce.AllWithin(1e-6),
  ),
  *reproduce.invariant_claims(
    reproduce.Launcher(paper='causal_rewards', config=CONFIG, args=INVARIANT_ARGS),
    kill_after_step=7,
    first_steps=5,
    first_rtol=1e-5,
  ),
]
