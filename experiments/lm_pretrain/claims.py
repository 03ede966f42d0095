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

import json
import os
import pathlib
import re
import signal
import subprocess
import sys

from common import metrics
from experiments import reproduce
from experiments.lm_pretrain.configs import base
from projects.lm_pretrain import train

TITLE = 'LM pretraining (template)'
CONFIG = 'experiments/lm_pretrain/configs/base.py'
SEEDS = (0, 1, 2)
# The invariants' runs: per-step train metrics, so the first steps can be compared one by one.
INVARIANT_ARGS = ('smoke', 'seed=0', 'train.log_every=1')
KILL_AFTER_STEP = 45  # smoke: checkpoints every 20 steps, so the resume replays steps 41-45
SHARDED_MESH = ('mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2')
FIRST_STEPS, FIRST_RTOL, FINAL_RTOL = 5, 1e-5, 1e-3
SUBPROCESS_TIMEOUT_S = 900


def config_arg(suite: str, *overrides: str) -> str:
  """The get_config argument of a suite's run: 'smoke,seed=1' or 'seed=1' (the full config)."""
  return ','.join((('smoke',) if suite == 'smoke' else ()) + overrides)


# ---------------------------------------------------------------------------------------------------
# Empirical: eval loss vs the unigram baseline.


def _unigram_loss(config, eval_metrics) -> float:
  """The baseline from the eval metrics when the pipeline reports it, else train.unigram_loss."""
  if 'unigram_loss' in eval_metrics:
    return float(eval_metrics['unigram_loss'])
  return float(train.unigram_loss(config))


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


# ---------------------------------------------------------------------------------------------------
# Invariants: runs in subprocesses.


def launch(workdir: pathlib.Path, arg: str, *, devices: int = 1) -> subprocess.CompletedProcess:
  """`python -m experiments.lm_pretrain.main` in a fresh process with `devices` CPU devices."""
  flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '', os.environ.get('XLA_FLAGS', ''))
  env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': f'{flags} --xla_force_host_platform_device_count={devices}'.strip(),
  }
  cmd = [
    sys.executable,
    '-m',
    'experiments.lm_pretrain.main',
    f'--config={CONFIG}:{arg}',
    f'--workdir={workdir}',
  ]
  return subprocess.run(
    cmd,
    cwd=reproduce.ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=SUBPROCESS_TIMEOUT_S,
    check=False,
  )


def _last_line(p: subprocess.CompletedProcess) -> str:
  lines = (p.stderr or p.stdout or '').strip().splitlines()
  return lines[-1][:200] if lines else ''


def ensure_run(workdir: pathlib.Path, *overrides: str, devices: int = 1) -> pathlib.Path:
  """A finished run in `workdir` (reused when results.json is there: claims share runs)."""
  if not (workdir / 'results.json').is_file():
    p = launch(workdir, ','.join(INVARIANT_ARGS + overrides), devices=devices)
    if p.returncode != 0:
      raise RuntimeError(f'run in {workdir.name} exited {p.returncode}: {_last_line(p)}')
  return workdir


def reference_run(root: pathlib.Path) -> pathlib.Path:
  return ensure_run(root / 'invariant_1dev')


def results(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / 'results.json').read_text())


def train_losses(workdir: pathlib.Path) -> list[float]:
  return _split_curve(metrics.read_jsonl(workdir / 'metrics.jsonl'), 'train')[1]


def count_differences(a, b) -> tuple[int, int]:
  """(number of leaves that differ bitwise or in presence, number compared) of two JSON trees."""
  if isinstance(a, dict) and isinstance(b, dict):
    pairs = [count_differences(a.get(k), b.get(k)) for k in sorted(set(a) | set(b))]
    return sum(d for d, _ in pairs), sum(n for _, n in pairs)
  if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
    pairs = [count_differences(x, y) for x, y in zip(a, b, strict=True)]
    return sum(d for d, _ in pairs), sum(n for _, n in pairs)
  return int(type(a) is not type(b) or a != b), 1


def measure_resume_bitwise(suite: str, root: pathlib.Path) -> reproduce.Measurement:
  del suite  # smoke scale in both suites: an exact property of the code
  ref = reference_run(root)
  workdir = root / 'invariant_killed'
  if not (workdir / 'results.json').is_file():
    killed = launch(
      workdir, ','.join(INVARIANT_ARGS + (f'debug.kill_after_step={KILL_AFTER_STEP}',))
    )
    if killed.returncode != -signal.SIGKILL:
      raise RuntimeError(f'expected SIGKILL after step {KILL_AFTER_STEP}: {_last_line(killed)}')
    logged = len(train_losses(workdir))
    if logged != KILL_AFTER_STEP:
      raise RuntimeError(f'killed run logged {logged} train steps, not {KILL_AFTER_STEP}')
    ensure_run(workdir)  # the same command again: resumes from the last checkpoint
  # What a run leaves: every metrics line, and results.json minus its wall time.
  rows_ref, rows_new = (metrics.read_jsonl(w / 'metrics.jsonl') for w in (ref, workdir))
  res_ref, res_new = ({k: results(w)[k] for k in ('step', 'train', 'eval')} for w in (ref, workdir))
  diff, compared = count_differences(
    {'metrics': rows_ref, 'results': res_ref}, {'metrics': rows_new, 'results': res_new}
  )
  detail = (
    f'{compared} values compared (every metrics.jsonl line and results.json train/eval); the run '
    f'was SIGKILLed after step {KILL_AFTER_STEP} and resumed from its last checkpoint.'
  )
  plot = reproduce.Plot(
    title='lm_pretrain: SIGKILL + resume vs uninterrupted (smoke)',
    xlabel='step',
    ylabel='train loss',
    curves={
      'uninterrupted': _split_curve(rows_ref, 'train'),
      'killed + resumed': _split_curve(rows_new, 'train'),
    },
  )
  return reproduce.Measurement({'seed=0': diff}, detail, plot)


def _max_rel(a: list[float], b: list[float]) -> float:
  if len(a) != len(b) or not a:
    raise ValueError(f'cannot compare {len(a)} with {len(b)} values')
  return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b, strict=True))


def sharded_run(root: pathlib.Path) -> pathlib.Path:
  return ensure_run(root / 'invariant_8dev', *SHARDED_MESH, devices=8)


def measure_sharded_first_steps(suite: str, root: pathlib.Path) -> reproduce.Measurement:
  del suite
  ref, sharded = reference_run(root), sharded_run(root)
  a, b = train_losses(sharded)[:FIRST_STEPS], train_losses(ref)[:FIRST_STEPS]
  plot = reproduce.Plot(
    title='lm_pretrain: 8 devices (2x2x2) vs 1 device (smoke)',
    xlabel='step',
    ylabel='train loss',
    curves={
      '1 device': _split_curve(metrics.read_jsonl(ref / 'metrics.jsonl'), 'train'),
      '8 devices': _split_curve(metrics.read_jsonl(sharded / 'metrics.jsonl'), 'train'),
    },
  )
  detail = f'max relative difference of the first {FIRST_STEPS} per-step train losses.'
  return reproduce.Measurement({'seed=0': _max_rel(a, b)}, detail, plot)


def measure_sharded_final_loss(suite: str, root: pathlib.Path) -> reproduce.Measurement:
  del suite
  ref, sharded = results(reference_run(root)), results(sharded_run(root))
  pairs = {split: (sharded[split]['loss'], ref[split]['loss']) for split in ('train', 'eval')}
  rel = _max_rel([a for a, _ in pairs.values()], [b for _, b in pairs.values()])
  detail = 'max relative difference of the final train and eval losses: ' + ', '.join(
    f'{k} {a:.6f} vs {b:.6f}' for k, (a, b) in pairs.items()
  )
  return reproduce.Measurement({'seed=0': rel}, detail)


CLAIMS = [
  reproduce.Claim(
    name='eval_beats_unigram',
    kind=reproduce.EMPIRICAL,
    paper_figure='n/a (template run): held-out loss below the unigram baseline',
    measure=measure_eval_beats_unigram,
    rule=reproduce.MeanBelow(0.0),
    unit='nats/token (eval - unigram)',
  ),
  reproduce.Claim(
    name='resume_bitwise',
    kind=reproduce.INVARIANT,
    paper_figure='architecture doc: a killed and resumed run replays exactly',
    measure=measure_resume_bitwise,
    rule=reproduce.AllWithin(0.0),
    unit='values differ',
  ),
  reproduce.Claim(
    name='sharded_first_steps',
    kind=reproduce.INVARIANT,
    paper_figure=f'architecture doc: first steps sharded == 1 device to {FIRST_RTOL:g} relative',
    measure=measure_sharded_first_steps,
    rule=reproduce.AllWithin(FIRST_RTOL),
    unit='max relative difference',
  ),
  reproduce.Claim(
    name='sharded_final_loss',
    kind=reproduce.INVARIANT,
    paper_figure=f'architecture doc: final smoke loss sharded == 1 device to {FINAL_RTOL:g}',
    measure=measure_sharded_final_loss,
    rule=reproduce.AllWithin(FINAL_RTOL),
    unit='max relative difference',
  ),
]
