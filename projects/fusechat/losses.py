"""FuseChat's pairwise fusion objective (arXiv 2408.07990, Eq. for stage 1; FuseLLM's L = λ L_CLM +
(1 - λ) L_Fusion):

  L_CLM    = mean over scored tokens of -log p_θ(gold token)
  L_fuse   = mean over scored tokens of -Σ_k q_k log p_θ(id_k), q the fused teacher's sparse top-k
             distribution on the pivot's vocabulary (input_pipeline: MinCE choice of the aligned
             source or the pivot's own distribution; the one-hot gold where nothing aligned)
  L        = λ L_CLM + (1 - λ) L_fuse

λ = 1 is plain causal-LM fine-tuning on the same texts (the control); λ = 0 is pure distillation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fusion_loss(
  logits: jax.Array,
  targets: jax.Array,
  mask: jax.Array,
  teacher_ids: jax.Array,
  teacher_probs: jax.Array,
  lam: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(L, {'clm', 'fuse'}) for logits [B, T, V], targets int [B, T], mask [B, T], teacher ids /
  probs [B, T, k] (each row's probabilities sum to 1 where scored)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  gold = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  taught = jnp.take_along_axis(logp, teacher_ids.astype(jnp.int32), axis=-1)
  fuse_tok = -jnp.sum(teacher_probs.astype(jnp.float32) * taught, axis=-1)
  m = mask.astype(jnp.float32)
  count = jnp.maximum(m.sum(), 1.0)
  clm = jnp.sum(jnp.where(m > 0, -gold, 0.0)) / count
  fuse = jnp.sum(jnp.where(m > 0, fuse_tok, 0.0)) / count
  return lam * clm + (1.0 - lam) * fuse, {'clm': clm, 'fuse': fuse}
