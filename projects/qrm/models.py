"""Q-RM's networks: the policy and the discriminative policy phi, both the shared decoder.

Q-RM (arXiv 2505.23363) scores the *given* action a_t in state s_t with a separate network whose
vocabulary logits Z(s_t, .) define a discriminative policy phi(a | s_t) = softmax_a Z(s_t, a); the
MaxEnt link beta log phi*(s, a) = Q*(s, a) - V*(s) makes beta log phi(a_t | s_t) the token reward
(an advantage: a state-wise constant added to Z cancels). Here that network is the shared decoder
(common.models.decoder) with its LM head as Z, initialised like the policy (the smoke's SFT-warmed
tiny character LM, or SmolLM2-135M-Instruct), as the paper initialises Q-RM from an SFT model. The
DPO-implicit baseline uses the same network trained with DPO against the frozen starting policy.

log phi of a response's tokens is `common.rl.rollout.completion_logprobs` on the Q-RM network (the
log-softmax of Z at the taken token): the same code the policy's log-probs use.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common.rl.policies import WarmupConfig
from common.rl.policies import create_policy
from common.rl.policies import description
from common.rl.policies import warm_policy

__all__ = [
  'WarmupConfig',
  'create_policy',
  'description',
  'load_params',
  'log_phi',
  'params_of',
  'warm_policy',
]


def log_phi(z: jax.Array, actions: jax.Array) -> jax.Array:
  """log phi(a | s) = Z(s, a) - logsumexp_a' Z(s, a') for logits Z [..., V] and actions [...]
  (float32)."""
  lsm = jax.nn.log_softmax(jnp.asarray(z, jnp.float32), axis=-1)
  return jnp.take_along_axis(lsm, jnp.asarray(actions)[..., None], axis=-1)[..., 0]


def params_of(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters as a flat {path: array} dict (host), for an .npz."""
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param).to_pure_dict())[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def load_params(model: nnx.Module, flat: dict[str, np.ndarray]) -> nnx.Module:
  """Writes `params_of`-style arrays into `model` (same structure), in place; returns it."""
  template = nnx.state(model, nnx.Param).to_pure_dict()
  missing = [
    jax.tree_util.keystr(p)
    for p, _ in jax.tree_util.tree_flatten_with_path(template)[0]
    if jax.tree_util.keystr(p) not in flat
  ]
  if missing:
    raise ValueError(f'reward-model parameters lack {missing[:3]} ({len(missing)} missing)')
  restored = jax.tree_util.tree_map_with_path(
    lambda p, v: jnp.asarray(flat[jax.tree_util.keystr(p)], v.dtype), template
  )
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)
  return model
