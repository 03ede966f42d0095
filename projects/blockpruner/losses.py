"""BlockPruner's objective (arXiv 2406.10594, Sec. 3.2): perplexity on a calibration set.

The method is training-free: there is no training loss. A candidate removal is scored by the
language-modelling perplexity of the model with that block (and every block removed before it)
skipped, on a small calibration set (the paper: 256 Alpaca samples; here R documentation windows,
see input_pipeline.py), and the lowest-perplexity candidate is removed. Perplexity is a monotone
function of the mean next-token NLL, so the scorer returns the mean NLL (nats per calibration
token) and the search takes its argmin.

`CalibrationScorer` evaluates the decoder with a traced block mask (`common.models.decoder`'s
`block_mask`: one compiled program for every candidate) and, by default, from a cached residual
stream: the layers before a candidate's first block compute exactly what they computed for the
current model, so the residual stream entering every layer is computed once per search step and
each candidate runs only from its own layer on (`models.nll_from`). Same numbers as a full forward
to float rounding (tested), about half the compute. The block-influence baseline (ShortGPT) reads
the same cached streams.
"""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common import sharding
from common.models import decoder
from common.models import perplexity
from projects.blockpruner import models

# Module-level programs (the graph definition is a static argument), so every scorer of one model
# shape (the seeds and methods of a claim, in one process) shares one compiled program each.


@functools.partial(jax.jit, static_argnums=0)
def _full(graphdef, state, batch, block_mask):
  m = nnx.merge(graphdef, state)
  x = models.embed(m, batch['inputs'])
  s, _ = models.nll_from(m, x, 0, block_mask, batch['targets'], batch['target_mask'])
  return jnp.sum(s)


@functools.partial(jax.jit, static_argnums=0)
def _states(graphdef, state, inputs, block_mask):
  return models.layer_inputs(nnx.merge(graphdef, state), inputs, block_mask)


@functools.partial(jax.jit, static_argnums=0)
def _from(graphdef, state, streams, start, block_mask, batch):
  m = nnx.merge(graphdef, state)
  x = jax.lax.dynamic_index_in_dim(streams, start, keepdims=False)
  s, _ = models.nll_from(m, x, start, block_mask, batch['targets'], batch['target_mask'])
  return jnp.sum(s)


class CalibrationScorer:
  """Mean calibration NLL of the model under block masks; see the module docstring."""

  def __init__(
    self,
    model: decoder.Decoder,
    windows: perplexity.Windows,
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
    prefix_cache: bool = True,
  ):
    if len(windows) % batch_size:
      raise ValueError(f'{len(windows)} calibration rows are not a multiple of {batch_size}')
    self.num_layers = model.cfg.num_layers
    self.mesh, self.rules, self.prefix_cache = mesh, rules, prefix_cache
    self.graphdef, self.state = nnx.split(model)
    self.batches = []
    for start in range(0, len(windows), batch_size):
      tokens = windows.tokens[start : start + batch_size]
      mask = windows.mask[start : start + batch_size]
      batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'target_mask': mask[:, 1:]}
      self.batches.append(sharding.global_rows(batch, mesh, rules) if mesh is not None else batch)
    self.count = float(windows.mask[:, 1:].sum())
    self.forwards = 0.0  # full-forward equivalents spent (layers run / num_layers)

  def _context(self) -> contextlib.ExitStack:
    """The mesh and logical-axis rules the programs trace under (nothing without a mesh)."""
    stack = contextlib.ExitStack()
    if self.mesh is not None:
      stack.enter_context(jax.set_mesh(self.mesh))
      stack.enter_context(sharding.axis_rules(self.rules))
    return stack

  def loss(self, mask: np.ndarray) -> float:
    """Mean NLL (nats/token) of the whole model under `mask` (bool [num_layers, 2])."""
    with self._context():
      sums = [_full(self.graphdef, self.state, b, jnp.asarray(mask)) for b in self.batches]
    self.forwards += 1.0
    return float(np.sum(np.asarray(jax.device_get(sums), np.float64))) / self.count

  def streams(self, mask: np.ndarray) -> list[jax.Array]:
    """Per batch, [num_layers + 1, B, T, d]: the residual stream entering each layer under `mask`
    and leaving the last (`models.layer_inputs`)."""
    with self._context():
      out = [
        _states(self.graphdef, self.state, b['inputs'], jnp.asarray(mask)) for b in self.batches
      ]
    self.forwards += 1.0
    return out

  def candidate_losses(
    self, mask: np.ndarray, candidates: Sequence[Sequence[models.Block]]
  ) -> np.ndarray:
    """Mean NLL (nats/token) with each candidate's blocks removed on top of `mask`, float64 [C]."""
    out = []
    streams = self.streams(mask) if self.prefix_cache else None
    for blocks in candidates:
      cand = mask.copy()
      for layer, kind in blocks:
        cand[layer, models.KINDS.index(kind)] = False
      if streams is None:
        out.append(self.loss(cand))
        continue
      start = min(layer for layer, _ in blocks)
      with self._context():
        sums = [
          _from(self.graphdef, self.state, s, jnp.int32(start), jnp.asarray(cand), b)
          for s, b in zip(streams, self.batches, strict=True)
        ]
      self.forwards += (self.num_layers - start) / self.num_layers
      out.append(float(np.sum(np.asarray(jax.device_get(sums), np.float64))) / self.count)
    return np.asarray(out, np.float64)

  def token_weights(self) -> list[jax.Array]:
    """Per batch, the calibration target mask [B, T] (which positions are real tokens)."""
    return [b['target_mask'] for b in self.batches]
