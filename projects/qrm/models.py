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

from common import cache
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
  return cache.tree_to_arrays(nnx.state(model, nnx.Param).to_pure_dict())


def load_params(model: nnx.Module, flat: dict[str, np.ndarray]) -> nnx.Module:
  """Writes `params_of`-style arrays into `model` (same structure), in place; returns it."""
  restored = cache.arrays_to_tree(
    flat,
    nnx.state(model, nnx.Param).to_pure_dict(),
    leaf_fn=lambda a, v: jnp.asarray(a, v.dtype),
    what='reward-model parameters',
  )
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)
  return model
