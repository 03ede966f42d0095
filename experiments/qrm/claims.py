"""Q-RM's claims for the reproduction suite (`python -m experiments.reproduce --only=qrm`).

Arms on the same footing (same starting policy, prompts, estimator GRPO, group size, steps,
learning rate, evaluation; the token-level reward models trained on the same pairs for the same
steps): the outcome verifier (ORM), DPO-implicit token rewards and Q-RM token rewards, under the
PPO-style clipped loop and under REINFORCE (ORM and Q-RM only). Per seed, seeds 0-2, each seed its
own reward models (smoke: the smoke config; full: the smollm2 config):
  * qrm_ppo_pass_at_1 / qrm_reinforce_pass_at_1 (empirical): held-out greedy pass@1 after training,
    Q-RM minus ORM (paper: +5.85 with PPO, +4.70 with REINFORCE, averaged over math benchmarks);
  * qrm_vs_dpo_pass_at_1 (empirical): the same, Q-RM minus DPO-implicit rewards (PPO);
  * qrm_convergence (empirical): log2(ORM's steps / Q-RM's steps) to reach a training pass rate
    of TARGET (running mean over 5 steps), a run that never reaches it counting num_steps + 1
    (paper: 12x faster than ORM on GSM8K, log2 12 = 3.58);
  * qrm_credit_localisation (empirical): on held-out corrupted pairs, the fraction whose lowest
    Q-RM token reward sits on the corrupted digit, minus the same fraction for the starting
    network read the same way (beta log pi before preference training: digits are hard positions
    for the policy, so chance, 1 / length, is too weak a control; both are in the detail); the
    plot is the per-position token reward around the error (Q-RM, DPO and the starting network,
    rejected and chosen).

Budget: smoke 137 s of CPU (538 s wall on the shared 2 cores at load average 29; over the 300 s
budget at that load): 6 reward models of 150 steps and 15 RL runs of 40 steps in one process,
compiled code reused; plus the shared warm-up policy's first training on a fresh machine. Full: 15
runs of the smollm2 config (5 arms x 3 seeds; a Q-RM or DPO arm first trains its seed's reward
model, ~30 min, which the REINFORCE arm of the same kind and seed reuses), each ~25-90 min on 2
free cores (projects/qrm/README.md), about 13-16 hours in all.
"""

from __future__ import annotations

import pathlib

import numpy as np

from experiments import reproduce
from experiments.qrm.configs import base
from projects.qrm import evaluate
from projects.qrm import train

TITLE = 'Q-RM: discriminative token-level reward models for policy optimisation'
SEEDS = (0, 1, 2)
TARGET = 0.45  # training pass rate (5-step running mean); the start is about 0.35 at T = 1
ARMS = {
  ('orm', 'ppo'): 'reward.kind=orm,algo=ppo',
  ('dpo', 'ppo'): 'reward.kind=dpo,algo=ppo',
  ('qrm', 'ppo'): 'reward.kind=qrm,algo=ppo',
  ('orm', 'reinforce'): 'reward.kind=orm,algo=reinforce',
  ('qrm', 'reinforce'): 'reward.kind=qrm,algo=reinforce',
}


def _runs(suite: str, root: pathlib.Path) -> dict:
  """{(kind, algo): [(results, run_summary) per seed]}; trains (or reuses) every arm and seed."""
  variant = 'smoke' if suite == 'smoke' else 'smollm2'
  out: dict = {}
  for (kind, algo), over in ARMS.items():
    for seed in SEEDS:
      rm_dir = root / f'rm_{kind}_seed{seed}'
      cfg = base.get_config(f'{variant},{over},seed={seed},rm.workdir={rm_dir}')
      workdir = root / f'{kind}_{algo}_seed{seed}'
      results = train.train_and_evaluate(cfg, workdir)
      out.setdefault((kind, algo), []).append((results, evaluate.run_summary(workdir / 'rl')))
  return out


def _final_pass(item) -> float:
  return float(item[1]['eval']['pass_at_1'][-1])


def _pass_measure(arm, versus, what):
  def measure(suite: str, root: pathlib.Path) -> reproduce.Measurement:
    runs = _runs(suite, root)
    a = [_final_pass(x) for x in runs[arm]]
    b = [_final_pass(x) for x in runs[versus]]
    values = {f'seed={i}': x - y for i, (x, y) in enumerate(zip(a, b, strict=True))}
    start = runs[arm][0][1]['eval']['pass_at_1'][0]
    arms = '; '.join(
      f'{k[0]}/{k[1]} {np.mean([_final_pass(x) for x in v]):.3f} '
      f'({", ".join(f"{_final_pass(x):.3f}" for x in v)})'
      for k, v in runs.items()
    )
    detail = f'{what}: held-out greedy pass@1 at the end, start {start:.3f}; {arms}'
    curves = {}
    for k in (arm, versus):
      steps = runs[k][0][1]['eval_steps']
      ys = np.mean([x[1]['eval']['pass_at_1'] for x in runs[k]], axis=0)
      curves[f'{k[0]} ({k[1]})'] = (list(steps), [float(y) for y in ys])
    plot = reproduce.Plot(
      title=f'{what} ({suite}, seed mean)', xlabel='RL step', ylabel='pass@1', curves=curves
    )
    return reproduce.Measurement(values, detail, plot)

  return measure


def _steps(item, num_steps: int) -> int:
  s = item[1]
  got = evaluate.steps_to_target(s['train_steps'], s['pass_rate'], TARGET)
  return num_steps + 1 if got is None else got


def measure_convergence(suite: str, root: pathlib.Path) -> reproduce.Measurement:
  runs = _runs(suite, root)
  n = int(runs[('orm', 'ppo')][0][0]['step'])
  orm = [_steps(x, n) for x in runs[('orm', 'ppo')]]
  qrm = [_steps(x, n) for x in runs[('qrm', 'ppo')]]
  dpo = [_steps(x, n) for x in runs[('dpo', 'ppo')]]
  values = {
    f'seed={i}': float(np.log2(o / q)) for i, (o, q) in enumerate(zip(orm, qrm, strict=True))
  }
  detail = (
    f'steps to a {TARGET} training pass rate (5-step mean; {n + 1} = never), PPO: '
    f'ORM {orm}, DPO {dpo}, Q-RM {qrm}'
  )
  curves = {}
  for k in (('orm', 'ppo'), ('dpo', 'ppo'), ('qrm', 'ppo')):
    steps = runs[k][0][1]['train_steps']
    ys = np.mean([x[1]['pass_rate'] for x in runs[k]], axis=0)
    curves[k[0]] = (list(steps), [float(y) for y in ys])
  plot = reproduce.Plot(
    title=f'training pass rate, PPO ({suite}, seed mean)',
    xlabel='RL step',
    ylabel='pass rate (T=1 rollouts)',
    curves=curves,
    hlines={'target': TARGET},
  )
  return reproduce.Measurement(values, detail, plot)


def measure_localisation(suite: str, root: pathlib.Path) -> reproduce.Measurement:
  runs = _runs(suite, root)
  rm = {k: [x[0]['rm'] for x in runs[(k, 'ppo')]] for k in ('qrm', 'dpo')}
  key, chance = 'localisation/corrupted', 'localisation_chance/corrupted'
  values = {f'seed={i}': r[key] - r[f'start/{key}'] for i, r in enumerate(rm['qrm'])}

  def line(k):
    rs = rm[k]
    return (
      f'{k}: localisation {np.mean([r[key] for r in rs]):.3f} (chance '
      f'{np.mean([r[chance] for r in rs]):.3f}), on policy samples '
      f'{np.mean([r["localisation/policy"] for r in rs]):.3f} (chance '
      f'{np.mean([r["localisation_chance/policy"] for r in rs]):.3f}), concentration '
      f'{np.mean([r["concentration"] for r in rs]):.3f}, pair accuracy '
      f'{np.mean([r["pair_accuracy"] for r in rs]):.3f}'
    )

  start = rm['qrm']
  detail = (
    f'{line("qrm")}; {line("dpo")}; the starting network (beta log pi, before preference '
    f'training): localisation {np.mean([r["start/" + key] for r in start]):.3f}, on policy '
    f'samples {np.mean([r["start/localisation/policy"] for r in start]):.3f}, concentration '
    f'{np.mean([r["start/concentration"] for r in start]):.3f}'
  )
  curves = {}
  offsets = list(evaluate.OFFSETS)
  for k in ('qrm', 'dpo'):
    for side in ('rejected', 'chosen'):
      ys = [np.mean([r.get(f'profile/{side}/{o:+d}', np.nan) for r in rm[k]]) for o in offsets]
      keep = [i for i, y in enumerate(ys) if np.isfinite(y)]
      curves[f'{k} {side}'] = ([offsets[i] for i in keep], [float(ys[i]) for i in keep])
  for side in ('rejected', 'chosen'):
    ys = [np.mean([r.get(f'start/profile/{side}/{o:+d}', np.nan) for r in start]) for o in offsets]
    keep = [i for i, y in enumerate(ys) if np.isfinite(y)]
    curves[f'start {side}'] = ([offsets[i] for i in keep], [float(ys[i]) for i in keep])
  plot = reproduce.Plot(
    title=f'token reward around the first error ({suite}, seed mean)',
    xlabel='position - error position',
    ylabel='token reward (beta log phi; DPO: beta log pi/pi_ref)',
    curves=curves,
  )
  return reproduce.Measurement(values, detail, plot)


_ASSETS = {'full': ('smollm2',)}

CLAIMS = [
  reproduce.Claim(
    name='qrm_ppo_pass_at_1',
    kind=reproduce.EMPIRICAL,
    paper_figure='Q-RM vs ORM with PPO: +5.85 average pass@1 on math (GSM8K, MATH)',
    measure=_pass_measure(('qrm', 'ppo'), ('orm', 'ppo'), 'Q-RM - ORM, PPO'),
    rule=reproduce.MeanAbove(0.0),
    unit='pass@1 difference',
    assets=_ASSETS,
  ),
  reproduce.Claim(
    name='qrm_reinforce_pass_at_1',
    kind=reproduce.EMPIRICAL,
    paper_figure='Q-RM vs ORM with REINFORCE: +4.70 average pass@1',
    measure=_pass_measure(('qrm', 'reinforce'), ('orm', 'reinforce'), 'Q-RM - ORM, REINFORCE'),
    rule=reproduce.MeanAbove(0.0),
    unit='pass@1 difference',
    assets=_ASSETS,
  ),
  reproduce.Claim(
    name='qrm_vs_dpo_pass_at_1',
    kind=reproduce.EMPIRICAL,
    paper_figure='Q-RM beats token-level PRMs (+4.56 pass@1 with PPO); DPO-implicit rewards are '
    'the token-level baseline here',
    measure=_pass_measure(('qrm', 'ppo'), ('dpo', 'ppo'), 'Q-RM - DPO-implicit, PPO'),
    rule=reproduce.MeanAbove(0.0),
    unit='pass@1 difference',
    assets=_ASSETS,
  ),
  reproduce.Claim(
    name='qrm_convergence',
    kind=reproduce.EMPIRICAL,
    paper_figure='Q-RM converges 12x faster than ORM on GSM8K (log2 12 = 3.58)',
    measure=measure_convergence,
    rule=reproduce.MeanAbove(0.0),
    unit='log2(ORM steps / Q-RM steps)',
    assets=_ASSETS,
  ),
  reproduce.Claim(
    name='qrm_credit_localisation',
    kind=reproduce.EMPIRICAL,
    paper_figure="Q-RM's token rewards single out the erroneous tokens (qualitative figures; no "
    'number)',
    measure=measure_localisation,
    rule=reproduce.MeanAbove(0.0),
    unit='localisation, Q-RM - starting network',
    assets=_ASSETS,
  ),
]
