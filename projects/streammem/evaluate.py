"""What a StreamMem run measures: question answering from the memory, per method, budget and depth.

For every batch of episodes (input_pipeline.Episodes) and every method (models.METHODS) at every
per-layer budget m (the paper's M/L, §5(a) step 4; M = m x layers), the stream is fed clip by clip
and the questions are scored from the final memory (models.run_stream):

  em_<depth>   exact match (every answer token is the greedy choice), per fact depth, and `em`
               over all questions (the paper's MLVU/EgoSchema accuracy, here on planted facts);
  em_<kind>    exact match per question kind beyond recall ('count', 'order': video runs with
               video.questions; absent otherwise);
  dropped      the share of stream frames input-frame filtering dropped (stream.frame_filter > 0,
               StreamMem variants only; absent otherwise);
  loglik       mean answer log-likelihood (nats per question);
  dloglik      loglik minus full KV's on the same question (0 for full KV itself): how much of the
               full cache's evidence the memory kept;
  kept         the largest per-layer memory after any clip (<= m: the fixed budget holds).

`Totals` accumulates sums over the run's steps as JSON (float64 round-trips exactly), so an
interrupted evaluation resumes from its checkpoint and ends with the numbers of an uninterrupted
one. `memory_vs_length` measures the paper's "constant in stream length" (§5(a) step 7).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from common import train_loop
from projects.streammem import input_pipeline
from projects.streammem import models

FULL = 'full'


def label(method_name: str, budget: int | float | None) -> str:
  """'streammem@64' (per-layer budget 64), 'streammem@r0.5' (compression ratio 0.5), or 'full'."""
  if method_name == FULL:
    return FULL
  return f'{method_name}@r{budget:g}' if isinstance(budget, float) else f'{method_name}@{budget}'


def budgets_of(config: ml_collections.ConfigDict) -> list[int | float]:
  """The run's budgets: eval.budgets (entries per layer), then eval.ratios (compression ratios)."""
  return [int(b) for b in config.eval.budgets] + [float(r) for r in config.eval.get('ratios', ())]


def methods_of(config: ml_collections.ConfigDict) -> list[models.Method]:
  """The run's methods (eval.methods, full KV always first: every delta is against it)."""
  s = config.stream
  fpc = max(s.clip_len // s.frame_tokens, 1) if s.frame_tokens else 1
  names = [FULL] + [n for n in config.eval.methods if n != FULL]
  return [
    models.method(
      n, frames_per_clip=fpc, window=s.snapkv_window, sinks=s.sinks, span=s.get('span', 15)
    )
    for n in names
  ]


def frame_filter(config: ml_collections.ConfigDict, method_: models.Method) -> float:
  """The input-frame filtering threshold a method streams with: stream.frame_filter for the
  StreamMem variants (filtering is the paper's step 1 of StreamMem), 0 (off) for every other;
  with stream.filter_methods='all', for every method, full KV included (so that filtering and
  scoring can be told apart)."""
  s = config.stream
  if s.get('filter_methods', 'streammem') == 'all' or method_.name.startswith('streammem'):
    return float(s.frame_filter)
  return 0.0


@dataclasses.dataclass
class Totals:
  """Running sums per label: {label: {stat: sum}} with stats n, em, em_<depth>, n_<depth>,
  loglik, dloglik, kept (a maximum)."""

  sums: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

  def add(
    self,
    name: str,
    exact: np.ndarray,
    loglik: np.ndarray,
    full_loglik: np.ndarray,
    depth: np.ndarray,
    kept: int,
    kind: np.ndarray | None = None,
    dropped: np.ndarray | None = None,
  ) -> None:
    s = self.sums.setdefault(name, {'n': 0.0, 'em': 0.0, 'loglik': 0.0, 'dloglik': 0.0, 'kept': 0})
    exact, loglik = np.asarray(exact, np.float64), np.asarray(loglik, np.float64)
    s['n'] += float(exact.size)
    s['em'] += float(exact.sum())
    s['loglik'] += float(loglik.sum())
    s['dloglik'] += float((loglik - np.asarray(full_loglik, np.float64)).sum())
    s['kept'] = max(int(s['kept']), int(kept))
    for d, name_d in enumerate(input_pipeline.DEPTH_NAMES):
      at = np.asarray(depth) == d
      s[f'em_{name_d}'] = s.get(f'em_{name_d}', 0.0) + float(exact[at].sum())
      s[f'n_{name_d}'] = s.get(f'n_{name_d}', 0.0) + float(at.sum())
    if kind is not None:
      for k, name_k in enumerate(input_pipeline.QUESTION_KINDS[1:], start=1):
        at = np.asarray(kind) == k
        if at.any():
          s[f'em_{name_k}'] = s.get(f'em_{name_k}', 0.0) + float(exact[at].sum())
          s[f'n_{name_k}'] = s.get(f'n_{name_k}', 0.0) + float(at.sum())
    if dropped is not None:
      s['dropped'] = s.get('dropped', 0.0) + float(np.asarray(dropped).sum())
      s['frames'] = s.get('frames', 0.0) + float(np.asarray(dropped).size)

  def summary(self) -> dict[str, float]:
    """{'<label>/<stat>': mean}: em, em_<depth>, loglik, dloglik, kept."""
    out = {}
    for name, s in self.sums.items():
      n = max(s['n'], 1.0)
      out[f'{name}/em'] = s['em'] / n
      for d in input_pipeline.DEPTH_NAMES:
        out[f'{name}/em_{d}'] = s[f'em_{d}'] / max(s[f'n_{d}'], 1.0)
      for k in input_pipeline.QUESTION_KINDS[1:]:
        if f'n_{k}' in s:
          out[f'{name}/em_{k}'] = s[f'em_{k}'] / max(s[f'n_{k}'], 1.0)
      if 'frames' in s:
        out[f'{name}/dropped'] = s['dropped'] / max(s['frames'], 1.0)
      out[f'{name}/loglik'] = s['loglik'] / n
      out[f'{name}/dloglik'] = s['dloglik'] / n
      out[f'{name}/kept'] = float(s['kept'])
    return out

  def to_json(self) -> dict[str, Any]:
    return {'sums': self.sums}

  @classmethod
  def from_json(cls, extra: dict | None) -> Totals:
    return cls({k: dict(v) for k, v in (extra or {}).get('sums', {}).items()})


def evaluate_batch(
  streamer: models.Streamer,
  episodes: input_pipeline.Episodes,
  config: ml_collections.ConfigDict,
  totals: Totals,
  key: jax.Array,
) -> dict[str, models.StreamResult]:
  """Streams the batch under every method and budget, adds the scores to `totals`; returns the
  results by label (digests, memory sizes, per-clip kept counts)."""
  s = config.stream
  results: dict[str, models.StreamResult] = {}
  full = None
  for m in methods_of(config):
    budgets = [None] if m.press is None else budgets_of(config)
    for budget in budgets:
      r = models.run_stream(
        streamer,
        episodes,
        m,
        0 if budget is None else budget,
        clip_len=s.clip_len,
        frame_tokens=s.frame_tokens,
        key=key,
        frame_filter=frame_filter(config, m),
      )
      if m.press is None:
        full = r
      kept = int(r.kept.max()) if r.kept.size else int(np.asarray(episodes.stream).shape[1])
      totals.add(
        label(m.name, budget),
        r.exact,
        r.loglik,
        full.loglik,
        episodes.depth,
        kept,
        kind=episodes.kind,
        dropped=r.dropped,
      )
      results[label(m.name, budget)] = r
  return results


def memory_vs_length(
  streamer: models.Streamer,
  episodes_at,
  method_: models.Method,
  layer_budget: int,
  lengths: list[int],
  *,
  clip_len: int,
  frame_tokens: int,
) -> dict[int, dict[str, float]]:
  """Streams one episode batch per length under `method_`; for each: the memory's bytes after
  every clip (min and max), the largest per-layer kept count, and its accuracy (em)."""
  out = {}
  for length in lengths:
    e = episodes_at(length)
    r = models.run_stream(
      streamer,
      e,
      method_,
      layer_budget,
      clip_len=clip_len,
      frame_tokens=frame_tokens,
      key=train_loop.step_key(0, length, 'press'),
    )
    out[length] = {
      'bytes_min': float(min(r.memory_bytes)),
      'bytes_max': float(max(r.memory_bytes)),
      'kept_max': float(r.kept.max()) if r.kept.size else float(length),
      'em': float(r.exact.mean()),
    }
  return out


def video_episodes(config: ml_collections.ConfigDict, num_frames: int, seed: int):
  """The video test episodes of one stream length (frames), from the held-out test videos."""
  lang = models.video_language(config)
  return lang.episodes(
    seed,
    range(config.eval.episodes),
    videos=(config.video.test_video,),
    stream_len=num_frames * lang.tokens_per_frame,
    facts_per_depth=config.data.facts_per_depth,
  )


def make_video_eval_fn(config: ml_collections.ConfigDict, mesh, rules):
  """fit's eval_fn for the video run: the trained model streams held-out real video of each length
  in video.test_frames (4-32x the training streams) under every method and budget, then answers
  the event questions. Metrics '<frames>f/<label>/<stat>' (Totals.summary), plus the memory's
  bytes per length for each pressed method ('<frames>f/<label>/bytes'): constant in length."""

  def eval_fn(model, step):
    del step
    streamer = models.Streamer(model, mesh=mesh, rules=rules)
    out: dict[str, float] = {}
    for n in config.video.test_frames:
      totals = Totals()
      for s in range(config.eval.num_seeds):
        seed = 1000 * config.data.seed + s  # a run's test set follows its data seed
        e = video_episodes(config, n, seed)
        results = evaluate_batch(streamer, e, config, totals, train_loop.step_key(seed, n, 'press'))
        for name, r in results.items():
          out[f'{n}f/{name}/bytes'] = float(max(r.memory_bytes))
      out.update({f'{n}f/{k}': v for k, v in totals.summary().items()})
    return out

  return eval_fn


def merge_sweeps(parts: list[dict[str, Any]]) -> dict[str, Any]:
  """One `sweep` record from several (e.g. one per trained model): each cell's per-seed lists
  concatenated in the order of `parts`."""
  out: dict[str, Any] = {'length': {}, 'budget': {}}
  for part in parts:
    for axis, methods in part.items():
      for method, cells in methods.items():
        for x, stats in cells.items():
          cell = out[axis].setdefault(method, {}).setdefault(x, {k: [] for k in stats})
          for k, values in stats.items():
            cell[k].extend(values)
  return out


def sweep(
  streamer: models.Streamer,
  episodes_at,
  config: ml_collections.ConfigDict,
  *,
  lengths: list[int],
  budgets: list[int],
  length_budget: int,
  budget_length: int,
  seeds: list[int],
) -> dict[str, Any]:
  """Accuracy and answer log-likelihood vs stream length (at per-layer budget `length_budget`) and
  vs per-layer budget (at stream length `budget_length`), per method of config.eval.methods (full
  KV once per length), seed by seed: episodes_at(length, seed) -> Episodes.

  Returns {'length': {method: {length: {'em': [per seed], 'loglik': [...], 'dloglik': [...]}}},
  'budget': {method: {budget: {...}}}} (full KV appears under every budget, unchanged).
  """
  s = config.stream
  out: dict[str, Any] = {'length': {}, 'budget': {}}

  def one(axis, m, x, budget, e, seed, full):
    r = models.run_stream(
      streamer,
      e,
      m,
      budget,
      clip_len=s.clip_len,
      frame_tokens=s.frame_tokens,
      key=train_loop.step_key(seed, budget, 'press'),
      frame_filter=frame_filter(config, m),
    )
    full = r if full is None else full
    cell = (
      out[axis].setdefault(m.name, {}).setdefault(str(x), {'em': [], 'loglik': [], 'dloglik': []})
    )
    cell['em'].append(float(r.exact.mean()))
    cell['loglik'].append(float(r.loglik.mean()))
    cell['dloglik'].append(float((r.loglik - full.loglik).mean()))
    return r

  for seed in seeds:
    for length in lengths:
      e = episodes_at(length, seed)
      full = None
      for m in methods_of(config):
        r = one('length', m, length, 0 if m.press is None else length_budget, e, seed, full)
        full = r if m.press is None else full
    e = episodes_at(budget_length, seed)
    full = None
    for m in methods_of(config):
      for budget in [0] if m.press is None else budgets:
        r = one('budget', m, budget, budget, e, seed, full)
        full = r if m.press is None else full
  if FULL in out['budget']:  # full KV does not depend on the budget: one run, shown at every one
    cell = out['budget'].pop(FULL)['0']
    out['budget'][FULL] = {str(budget): cell for budget in budgets}
  return out
