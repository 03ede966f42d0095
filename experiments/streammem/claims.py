"""StreamMem's claims for the reproduction suite (`python -m experiments.reproduce --only=streammem`).

Empirical, at a fixed per-layer budget, seeds 0-2, the paper's numbers beside ours:
  * early_events_vs_baselines: exact match on the earliest fact / event, StreamMem minus the best
    of FIFO, uniform, StreamingLLM and random (each seed's best) (paper: StreamMem beats the
    query-agnostic heuristics at a fixed budget; MLVU 66.9 at 6K tokens vs 64.7 uniform).
  * beats_uniform: exact match over all questions, StreamMem minus uniform (paper: +2.2 points).
  * proxy_close_to_oracle: exact match of the query-aware oracle (scores from the true question)
    minus StreamMem's chat-template proxy, claimed below 0.1 (fixed before running; paper: chat
    template 66.9 vs oracle 68.1).
  smoke: the planted-fact setup (configs/base.py:smoke: the cached 2-layer fact LM, trained once
  per machine on 48-token streams, streams 512 tokens = 10x in clips of 32 at 24 entries per
  layer; the seed is the test episodes' data.seed). full: the video setup (configs/base.py:video:
  real frames of the opencv_videos asset with scripted colour events, the small video-language
  model trained per seed on 8-frame streams, tested on 16x longer streams of the held-out tree.avi
  at 32 entries per layer = 8 frames' worth).
Invariants:
  * memory_constant_in_length: StreamMem's memory bytes after every clip at 1x, 4x and 32x stream
    length (a tiny random decoder; relative difference from 1x; paper §5(a) step 7).
  * large_budget_is_full_kv: |answer log-likelihood - full KV's| with a budget above the stream
    (nothing evicted), for StreamMem, FIFO, H2O and the oracle, on a tiny random decoder.
  * full suite: resume_bitwise / sharded_first_steps of the video training run
    (reproduce.invariant_claims; the video asset is over the smoke suite's size limit).

Budgets: smoke: three ~30-60 s evaluation runs once the fact LM is cached (its one-time training
is 1500 steps, 2-5 min on 2 cores); full: three video runs (3000 steps + evaluation, ~10 min each
on 2 cores) and the invariant launches.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np

from experiments import reproduce
from experiments.streammem.configs import base

TITLE = 'StreamMem: query-agnostic KV memory for streaming video (arXiv 2508.15717)'
SEEDS = (0, 1, 2)
BUDGET = 32
BASELINES = ('fifo', 'uniform', 'streaming_llm', 'random')
CONFIG = 'experiments/streammem/configs/base.py'
ASSETS = {'full': ('opencv_videos',)}


VIDEO_FRAMES = 128  # the full suite's test length: 16x the 8-frame training streams


def run(seed: int, suite: str, root: pathlib.Path) -> dict:
  """The final eval metrics of one run (reused when its workdir already finished)."""
  workdir = root / f'{suite}_seed{seed}'
  done = workdir / 'results.json'
  if not done.is_file():
    from projects.streammem import train  # noqa: PLC0415

    if suite == 'smoke':
      args = ['smoke', f'data.seed={seed}', 'checkpoint.every_steps=1000000']
    else:
      args = ['video', f'seed={seed}', f'data.seed={seed}']
    train.train_and_evaluate(base.get_config(','.join(args)), str(workdir))
  return json.loads(done.read_text())['eval']


def _budget(suite: str) -> int:
  return 24 if suite == 'smoke' else BUDGET


def _key(suite: str, method: str, stat: str) -> str:
  name = 'full' if method == 'full' else f'{method}@{_budget(suite)}'
  return f'{name}/{stat}' if suite == 'smoke' else f'{VIDEO_FRAMES}f/{name}/{stat}'


def _em(r: dict, method: str, stat: str, suite: str) -> float:
  return r[_key(suite, method, stat)]


def measure_early(suite: str, root: pathlib.Path) -> reproduce.Measurement:
  values, lines = {}, []
  for seed in SEEDS:
    r = run(seed, suite, root)
    sm = _em(r, 'streammem', 'em_early', suite)
    base_ = {b: _em(r, b, 'em_early', suite) for b in BASELINES}
    values[f'seed={seed}'] = sm - max(base_.values())
    lines.append(f'streammem {sm:.3f} vs ' + ', '.join(f'{b} {v:.3f}' for b, v in base_.items()))
  return reproduce.Measurement(values, 'early-event exact match: ' + ' | '.join(lines))


def _pair(a: str, b: str, stat: str = 'em'):
  def measure(suite: str, root: pathlib.Path) -> reproduce.Measurement:
    values, lines = {}, []
    for seed in SEEDS:
      r = run(seed, suite, root)
      x, y = _em(r, a, stat, suite), _em(r, b, stat, suite)
      values[f'seed={seed}'] = x - y
      full = r[_key(suite, 'full', stat)]
      lines.append(f'{a} {x:.3f}, {b} {y:.3f}, full KV {full:.3f}')
    where = '512-token fact streams' if suite == 'smoke' else f'{VIDEO_FRAMES}-frame video'
    return reproduce.Measurement(
      values, f'{stat}, {where}, budget {_budget(suite)}/layer: ' + ' | '.join(lines)
    )

  return measure


def _tiny_streamer():
  from projects.streammem import models  # noqa: PLC0415

  return models.tiny_streamer()


def measure_memory(suite: str, root: pathlib.Path) -> reproduce.Measurement:
  del suite, root
  from projects.streammem import models  # noqa: PLC0415

  lang, st = _tiny_streamer()
  sizes, kept = {}, {}
  for mult in (1, 4, 32):
    e = lang.episodes(0, range(2), stream_len=32 * mult, facts_per_depth=1)
    r = models.run_stream(
      st,
      e,
      models.method('streammem', frames_per_clip=2),
      16,
      clip_len=8,
      frame_tokens=4,
      key=jax.random.key(0),
    )
    sizes[mult] = r.memory_bytes
    kept[mult] = int(r.kept.max())
  ref = sizes[1][0]
  values = {f'{m}x': max(abs(b - ref) for b in bs) / ref for m, bs in sizes.items()}
  detail = (
    f'StreamMem at 16 entries/layer, 8-token clips: {ref} bytes after every clip of 32-, 128- and '
    f'1024-token streams; max kept per layer {kept}'
  )
  return reproduce.Measurement(values, detail)


def measure_large_budget(suite: str, root: pathlib.Path) -> reproduce.Measurement:
  del suite, root
  from projects.streammem import models  # noqa: PLC0415

  lang, st = _tiny_streamer()
  e = lang.episodes(0, range(2), stream_len=40, facts_per_depth=1)
  kw = dict(clip_len=8, frame_tokens=4, key=jax.random.key(0), slots=64 + 8 + 4)
  full = models.run_stream(st, e, models.method('full'), 0, **kw)
  values = {}
  for name in ('streammem', 'fifo', 'h2o', 'oracle'):
    r = models.run_stream(st, e, models.method(name, frames_per_clip=2), 64, **kw)
    values[name] = float(np.abs(r.loglik - full.loglik).max())
  return reproduce.Measurement(values, '40-token streams in 8-token clips, budget 64 per layer')


CLAIMS = [
  reproduce.Claim(
    name='early_events_vs_baselines',
    kind=reproduce.EMPIRICAL,
    paper_figure='StreamMem Tab. 1-2: beats uniform/FIFO-style memories at a fixed budget',
    measure=measure_early,
    rule=reproduce.MeanAbove(0.0),
    unit='exact match (StreamMem - best baseline), early events',
    assets=ASSETS,
  ),
  reproduce.Claim(
    name='beats_uniform',
    kind=reproduce.EMPIRICAL,
    paper_figure='MLVU 66.9 (StreamMem, 6K tokens) vs 64.7 (uniform): +2.2 points',
    measure=_pair('streammem', 'uniform'),
    rule=reproduce.MeanAbove(0.0),
    unit='exact match (StreamMem - uniform)',
    assets=ASSETS,
  ),
  reproduce.Claim(
    name='proxy_close_to_oracle',
    kind=reproduce.EMPIRICAL,
    paper_figure='chat-template proxy query close to the true query (query-aware upper bound)',
    measure=_pair('oracle', 'streammem'),
    rule=reproduce.MeanBelow(0.1),
    unit='exact match (oracle - StreamMem)',
    assets=ASSETS,
  ),
  reproduce.Claim(
    name='memory_constant_in_length',
    kind=reproduce.INVARIANT,
    paper_figure='§5(a) step 7: the memory is constant in stream length',
    measure=measure_memory,
    rule=reproduce.AllWithin(0.0),
    unit='relative difference of memory bytes from 1x',
  ),
  reproduce.Claim(
    name='large_budget_is_full_kv',
    kind=reproduce.INVARIANT,
    paper_figure='issue 19: a budget above the stream evicts nothing and answers as full KV',
    measure=measure_large_budget,
    rule=reproduce.AllWithin(0.0),
    unit='max |loglik - full KV|',
  ),
  *(
    dataclasses.replace(c, suites=('full',), assets=ASSETS)
    for c in reproduce.invariant_claims(
      reproduce.Launcher(
        'streammem',
        CONFIG,
        (
          'video_smoke',
          'train.num_steps=6',
          'train.log_every=1',
          'train.eval_every=0',
          'checkpoint.every_steps=2',
          'data.batch_size=8',
        ),
      ),
      kill_after_step=3,
      first_steps=5,
    )
  ),
]
