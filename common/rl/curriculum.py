"""Curriculum samplers: which prompts the RL loop trains on at each step.

Every sampler is a pure function of (step, seed): `batch(step)` returns the prompts of step `step`
(1-based), so a resumed run replays exactly without iterator state in the checkpoint, and
`refill(step, k)` gives the k-th extra batch of a step (DAPO's dynamic sampling).

  shuffled     a fresh permutation of the pool every epoch (EBPO-naive)
  clustered    every epoch, each cluster's prompts shuffled and kept contiguous (whole clusters,
               or runs of `block_batches` batches rotating through the clusters), so consecutive
               batches come from one cluster (EBPO-topic)
  difficulty   easy to hard by the initial policy's pass rate over K rollouts, the same order every
               epoch (EBPO-diff); the pass rates are computed once and cached (`cached_pass_rates`)
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

import numpy as np

KINDS = ('shuffled', 'clustered', 'difficulty')


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One RL prompt: a stable global id (keys its sampling randomness), its tokens, a cluster label
  (topic / difficulty bucket, for EBPO's per-cluster prior and the clustered curriculum) and the
  payload the verifier needs (e.g. the reasoning-gym example)."""

  uid: int
  tokens: tuple[int, ...]
  cluster: str = ''
  payload: Any = None


def _rng(seed: int, *parts: int) -> np.random.Generator:
  return np.random.default_rng([seed & 0xFFFFFFFF, *(p & 0xFFFFFFFF for p in parts)])


class Sampler(abc.ABC):
  """Base: an epoch-wise order of the pool, read `batch_size` prompts at a time."""

  def __init__(self, prompts: Sequence[Prompt], batch_size: int, seed: int = 0):
    if not prompts:
      raise ValueError('the prompt pool is empty')
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    self.prompts = list(prompts)
    self.batch_size = batch_size
    self.seed = seed
    self._orders: dict[int, np.ndarray] = {}

  @abc.abstractmethod
  def order(self, epoch: int) -> np.ndarray:
    """The permutation of prompt indices for `epoch` (deterministic in seed and epoch)."""

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      if len(self._orders) > 4:
        self._orders.clear()
      self._orders[epoch] = self.order(epoch)
    return self._orders[epoch]

  def at(self, position: int) -> Prompt:
    n = len(self.prompts)
    return self.prompts[int(self._order(position // n)[position % n])]

  def batch(self, step: int) -> list[Prompt]:
    """The prompts of step `step` (1-based): positions (step-1)*B .. step*B-1 of the stream."""
    start = (step - 1) * self.batch_size
    return [self.at(start + i) for i in range(self.batch_size)]

  def refill(self, step: int, k: int) -> list[Prompt]:
    """The k-th (1-based) extra batch of a step: a deterministic random draw from the pool."""
    rng = _rng(self.seed, 7919, step, k)
    idx = rng.choice(
      len(self.prompts), size=self.batch_size, replace=len(self.prompts) < self.batch_size
    )
    return [self.prompts[int(i)] for i in idx]


class Shuffled(Sampler):
  def order(self, epoch: int) -> np.ndarray:
    return _rng(self.seed, 1, epoch).permutation(len(self.prompts))


class Clustered(Sampler):
  """Each epoch: every cluster's prompts shuffled, then laid out in contiguous runs.

  block_batches=0: each cluster is one run (cluster order shuffled per epoch), so a short training
  run may see only the first cluster. block_batches=k: runs of k batches, rotating through the
  clusters (in a random order per round) until each is used up, so every cluster recurs every
  few blocks while consecutive batches still share a cluster.
  """

  def __init__(
    self, prompts: Sequence[Prompt], batch_size: int, seed: int = 0, block_batches: int = 0
  ):
    super().__init__(prompts, batch_size, seed)
    if block_batches < 0:
      raise ValueError(f'block_batches must be >= 0, got {block_batches}')
    self.block_batches = block_batches

  def order(self, epoch: int) -> np.ndarray:
    rng = _rng(self.seed, 2, epoch)
    clusters: dict[str, list[int]] = {}
    for i, p in enumerate(self.prompts):
      clusters.setdefault(p.cluster, []).append(i)
    names = sorted(clusters)
    shuffled = {}
    for c in names:
      members = np.asarray(clusters[c])
      shuffled[c] = members[rng.permutation(len(members))]
    if not self.block_batches:
      return np.concatenate([shuffled[names[c]] for c in rng.permutation(len(names))])
    block = self.block_batches * self.batch_size
    out, pos = [], dict.fromkeys(names, 0)
    while any(pos[c] < len(shuffled[c]) for c in names):
      for c in rng.permutation(len(names)):
        name = names[c]
        if pos[name] < len(shuffled[name]):
          out.append(shuffled[name][pos[name] : pos[name] + block])
          pos[name] += block
    return np.concatenate(out)


class Difficulty(Sampler):
  """Easy to hard by `pass_rates[uid]` (ties by uid); the same order every epoch."""

  def __init__(
    self,
    prompts: Sequence[Prompt],
    batch_size: int,
    pass_rates: Mapping[int, float],
    seed: int = 0,
  ):
    super().__init__(prompts, batch_size, seed)
    missing = [p.uid for p in self.prompts if p.uid not in pass_rates]
    if missing:
      raise ValueError(f'no pass rate for {len(missing)} prompts (e.g. uid {missing[0]})')
    keys = [(-float(pass_rates[p.uid]), p.uid) for p in self.prompts]
    self._fixed = np.asarray(sorted(range(len(keys)), key=keys.__getitem__))

  def order(self, epoch: int) -> np.ndarray:
    del epoch
    return self._fixed


def make_sampler(
  kind: str,
  prompts: Sequence[Prompt],
  batch_size: int,
  seed: int = 0,
  pass_rates: Mapping[int, float] | None = None,
  block_batches: int = 0,
) -> Sampler:
  if kind == 'shuffled':
    return Shuffled(prompts, batch_size, seed)
  if kind == 'clustered':
    return Clustered(prompts, batch_size, seed, block_batches)
  if kind == 'difficulty':
    if pass_rates is None:
      raise ValueError('the difficulty curriculum needs pass rates (cached_pass_rates)')
    return Difficulty(prompts, batch_size, pass_rates, seed)
  raise ValueError(f'unknown curriculum {kind!r}; expected one of {KINDS}')


def cached_pass_rates(
  path: str | os.PathLike,
  fingerprint: str,
  compute: Callable[[], Mapping[int, float]],
) -> dict[int, float]:
  """{uid: pass rate}, read from `path` if it was computed for `fingerprint`, else computed and
  written there atomically. The fingerprint names the policy, the prompts and K."""
  p = pathlib.Path(path)
  if p.exists():
    saved = json.loads(p.read_text())
    if saved.get('fingerprint') == fingerprint:
      return {int(k): float(v) for k, v in saved['pass_rates'].items()}
  rates = {int(k): float(v) for k, v in compute().items()}
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.with_suffix(p.suffix + '.tmp')
  tmp.write_text(json.dumps({'fingerprint': fingerprint, 'pass_rates': rates}, sort_keys=True))
  os.replace(tmp, p)
  return rates


def fingerprint(*parts: Any) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
