"""The pruning orders compared: BlockPruner (arXiv 2406.10594) and its baselines, one interface.

Each method removes one unit per search step (a block, or a whole layer = its two blocks) given the
blocks removed so far, and keeps its own JSON state, checkpointed with the run, so a resumed search
continues from the blocks already removed:

  BlockPruner(block_type)  the paper's Algorithm 1: among the remaining blocks of the search space
                           ('mix': MHA and MLP, 'mha', 'mlp'), remove the one whose removal gives the
                           lowest calibration perplexity; iterate. Ties go to the first candidate
                           in the paper's order (every MHA block, then every MLP block), as its
                           strict `<` does.
  LayerPerplexity          the same greedy search over whole layers (perplexity-based layer pruning,
                           the "PPL" layer baseline of the paper).
  BlockInfluence           ShortGPT's layer pruning (Men et al. 2024): the Block Influence of layer
                           i, BI_i = 1 - mean over calibration tokens of cos(x_i, x_{i+1}) (the
                           residual stream entering and leaving it), computed once on the unpruned
                           model; layers are removed in increasing BI.
  RandomBlocks(block_type) a seeded random order of the blocks (the paper's random baseline).

Every step also reports the calibration loss after the removal (what the greedy methods minimise),
so the curves of all methods are on one footing.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
import dataclasses
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from projects.blockpruner import losses
from projects.blockpruner import models

METHODS = ('blockpruner', 'layer_ppl', 'shortgpt', 'random')


@dataclasses.dataclass
class Step:
  blocks: list[models.Block]  # removed by this step
  loss: float  # mean calibration NLL (nats/token) with every removed block skipped
  candidates: int  # removals scored to choose (0 for fixed orders)


def argmin_first(values: Sequence[float]) -> int:
  """Index of the smallest value, the first one on ties; NaN never wins (a diverged candidate)."""
  v = np.asarray(values, np.float64)
  return int(np.argmin(np.where(np.isnan(v), np.inf, v)))


class Method(abc.ABC):
  """One pruning order; `step` removes the next unit given what is removed already."""

  unit = 'block'

  def __init__(self, num_layers: int):
    self.num_layers = num_layers

  def state(self) -> dict:
    """JSON state to checkpoint (a resumed run restores it before its next step)."""
    return {}

  def restore(self, state: dict) -> None:
    del state

  @abc.abstractmethod
  def step(self, removed: Sequence[models.Block], scorer: losses.CalibrationScorer) -> Step: ...


def greedy_step(
  removed: Sequence[models.Block],
  candidates: Sequence[Sequence[models.Block]],
  scorer: losses.CalibrationScorer,
  num_layers: int,
) -> Step:
  """Scores every candidate removal on top of `removed` and keeps the lowest calibration loss."""
  if not candidates:
    raise ValueError('nothing left to remove')
  scores = scorer.candidate_losses(models.mask_of(removed, num_layers), candidates)
  i = argmin_first(scores)
  return Step(list(candidates[i]), float(scores[i]), len(candidates))


class BlockPruner(Method):
  def __init__(self, num_layers: int, block_type: str = 'mix'):
    super().__init__(num_layers)
    self.space = models.all_blocks(num_layers, block_type)

  def step(self, removed, scorer):
    gone = set(map(tuple, removed))
    candidates = [[b] for b in self.space if b not in gone]
    return greedy_step(removed, candidates, scorer, self.num_layers)


class LayerPerplexity(Method):
  unit = 'layer'

  def step(self, removed, scorer):
    gone = set(map(tuple, removed))
    candidates = [
      [(i, k) for k in models.KINDS]
      for i in range(self.num_layers)
      if not any((i, k) in gone for k in models.KINDS)
    ]
    return greedy_step(removed, candidates, scorer, self.num_layers)


@jax.jit
def _influence_sums(streams: jax.Array, token_mask: jax.Array) -> jax.Array:
  """Sum over real tokens of cos(x_i, x_{i+1}) per layer i: streams [L+1, B, T, d] -> [L] (f32)."""
  x = streams.astype(jnp.float32)
  a, b = x[:-1], x[1:]
  dot = jnp.sum(a * b, axis=-1)
  norms = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
  cos = dot / jnp.maximum(norms, 1e-30)
  return jnp.sum(jnp.where(token_mask[None].astype(bool), cos, 0.0), axis=(1, 2))


def block_influence(scorer: losses.CalibrationScorer, mask: np.ndarray) -> np.ndarray:
  """ShortGPT's BI per layer [L] (float64) on the calibration set, with `mask`'s blocks skipped."""
  sums = [
    np.asarray(jax.device_get(_influence_sums(s, m)), np.float64)
    for s, m in zip(scorer.streams(mask), scorer.token_weights(), strict=True)
  ]
  return 1.0 - np.sum(sums, axis=0) / scorer.count


class BlockInfluence(Method):
  unit = 'layer'

  def __init__(self, num_layers: int):
    super().__init__(num_layers)
    self.influence: list[float] | None = None

  def state(self):
    return {} if self.influence is None else {'influence': self.influence}

  def restore(self, state):
    self.influence = state.get('influence')

  def step(self, removed, scorer):
    if self.influence is None:  # one-shot, on the unpruned model (ShortGPT)
      self.influence = [
        float(x) for x in block_influence(scorer, models.mask_of([], self.num_layers))
      ]
    gone = {layer for layer, _ in removed}
    order = [i for i in np.argsort(self.influence, kind='stable') if i not in gone]
    if not order:
      raise ValueError('nothing left to remove')
    blocks = [(int(order[0]), k) for k in models.KINDS]
    return Step(blocks, scorer.loss(models.mask_of([*removed, *blocks], self.num_layers)), 0)


class RandomBlocks(Method):
  def __init__(self, num_layers: int, block_type: str = 'mix', seed: int = 0):
    super().__init__(num_layers)
    space = models.all_blocks(num_layers, block_type)
    rng = np.random.default_rng([seed, zlib.crc32(b'random_blocks')])
    self.order = [space[i] for i in rng.permutation(len(space))]

  def step(self, removed, scorer):
    gone = set(map(tuple, removed))
    left = [b for b in self.order if b not in gone]
    if not left:
      raise ValueError('nothing left to remove')
    blocks = [left[0]]
    return Step(blocks, scorer.loss(models.mask_of([*removed, *blocks], self.num_layers)), 0)


def from_config(config: ml_collections.ConfigDict, num_layers: int) -> Method:
  """The method object config.prune names (resolved once, at set-up)."""
  p = config.prune
  if p.method == 'blockpruner':
    return BlockPruner(num_layers, p.block_type)
  if p.method == 'layer_ppl':
    return LayerPerplexity(num_layers)
  if p.method == 'shortgpt':
    return BlockInfluence(num_layers)
  if p.method == 'random':
    return RandomBlocks(num_layers, p.block_type, config.seed)
  raise ValueError(f'prune.method must be one of {METHODS}, got {p.method!r}')
