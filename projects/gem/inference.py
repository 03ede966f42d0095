"""Using a GEM model both ways: embed texts (special tokens end-appended), search, and generate.

The same parameters serve both: embeddings read the last layer at the specials under GEM's mask;
generation runs the plain causal decoder with no special token (common.sampling.sampler).
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx
import jax
import numpy as np

from common import embeddings
from common.sampling import sampler
from projects.gem import input_pipeline
from projects.gem import models


@nnx.jit(static_argnames='pooling')
def _embed(model, tokens, roles, positions, pooling):
  return models.embed(model, tokens, roles, positions, pooling)


def embed_token_lists(
  model: models.GemModel,
  token_lists: Sequence[np.ndarray],
  layout: input_pipeline.Layout,
  pooling: str = 'special',
  batch_size: int = 16,
) -> np.ndarray:
  """[N, D] float32 embeddings of tokenized texts (each truncated to seq_len - k tokens).

  Rows are padded to full batches of `batch_size` with empty texts, so every call compiles one
  shape; a text's embedding does not depend on its batch-mates (tested).
  """
  rows = [input_pipeline.end_appended(t, layout) for t in token_lists]
  empty = input_pipeline.end_appended(np.zeros(0, np.int32), layout)
  out = []
  for start in range(0, len(rows), batch_size):
    part = rows[start : start + batch_size]
    n = len(part)
    part = part + [empty] * (batch_size - n)
    b = {k: np.stack([r[k] for r in part]) for k in part[0]}
    e = _embed(model, b['tokens'], b['roles'], b['special_positions'], pooling)
    out.append(np.asarray(jax.device_get(e))[:n])
  if not out:
    return np.zeros((0, model.lm.cfg.d_model), np.float32)
  return np.concatenate(out)


def nearest(queries: np.ndarray, docs: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
  """(indices [Q, k], cosines [Q, k]) of each query's k most similar docs, best first."""
  scores = np.asarray(embeddings.cosine_matrix(queries, docs))
  order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return order, np.take_along_axis(scores, order, axis=1)


def greedy_continuations(
  model: models.GemModel, prompts: Sequence[np.ndarray], max_new_tokens: int, pad_id: int
) -> list[list[int]]:
  """Greedy continuations of token prompts by the plain causal LM (no special tokens)."""
  cfg = sampler.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, pad_id=pad_id)
  gen = sampler.generate(model.lm, [list(map(int, p)) for p in prompts], config=cfg)
  tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
  return [tokens[i, : lengths[i]].tolist() for i in range(len(prompts))]
