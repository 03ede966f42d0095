"""FusionRoute's model: n frozen experts, a router (LM + linear routing head), token-level decoding.

arXiv 2601.05106, §3 (core.md §2(a)):
  * n frozen expert LMs pi_1..pi_n sharing one vocabulary (`FusionRoute.experts`; their weights are
    `common.adapters.core.Frozen`, not nnx.Param, so the train step, the optimizer and every
    gradient see only the router);
  * the router pi_theta = a base LM (theta_LM, `Router.lm`, the shared common.models.decoder) plus
    a linear routing head W in R^{n x d} on its final (normed) hidden state:
    w_t = W h_theta(x, y<=t) in R^n (`Router.head`);
  * decoding, at every step t (Eq. 1): I* = argmax_i w_{t,i}, then
        log pi_final(.) = log pi_theta_LM(.) + log pi_I*(.), renormalised (a product of experts).

`Mixing` generalises Eq. 1 to every decoding rule the paper and our baselines compare, so they all
run through one compiled decode loop (its fields are traced arrays):
    log pi(.) = log_softmax( router_coef * log pi_LM(.) + sum_i v_i log pi_i(.) ),
    v = one_hot(argmax w_t) when `routed`, else the fixed weights (one row per prompt):
  FusionRoute (router_coef 1, routed), routing-only (0, routed: the paper's ablation), the router LM
  alone (1, v = 0: the fine-tuned baseline), one expert (0, one-hot), uniform logit averaging
  (0, 1/n each) and oracle domain routing (0, one-hot of the prompt's domain); with `threshold` > 0,
  Co-LLM-style deferral (the routed expert alone where softmax(w_t) of it reaches the threshold,
  else the router LM alone).

`generate` is the decode loop: one prefill of the router and every expert, then a jitted
`lax.while_loop` that picks a token from the fused distribution (greedy, or sampled with
common.sampling's inverse-CDF sampler) and feeds it to the router AND every expert, so each model's
KV cache (common.sampling.kv_cache) holds exactly the prompt and the generated tokens (the paper
evaluates only the selected expert; on CPU we run all n, core.md §2(a) [R]). `sequence_logprobs`
recomputes the same distributions from scratch without caches (the cache test's reference).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
from typing import Any
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common import errors
from common.adapters import core as adapters_core
from common.models import decoder
from common.sampling import kv_cache
from common.sampling import sampler


class VocabularyMismatch(errors.UserError, ValueError):
  """Experts and router with different vocabularies: logit addition (Eq. 1) needs one."""


class Router(nnx.Module):
  """pi_theta: a decoder LM (theta_LM) plus the routing head W (n x d, no bias) on its final hidden
  state. `__call__` gives the LM's logits [B, T, V] and the routing logits w [B, T, n]."""

  def __init__(self, lm: decoder.Decoder, num_experts: int, *, rngs: nnx.Rngs):
    self.lm = lm
    self.num_experts = num_experts
    self.head = decoder.Linear(
      lm.cfg.d_model,
      num_experts,
      use_bias=False,
      dtype=jnp.float32,  # routing logits in f32, like the LM's
      param_dtype=jnp.float32,
      kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ('embed', 'experts')),
      rngs=rngs,
    )

  def route(self, h: jax.Array) -> jax.Array:
    """w = W h (routing logits [..., n], f32) from final hidden states [..., d]."""
    return self.head(h.astype(jnp.float32))

  def __call__(self, tokens: jax.Array, **kw) -> tuple[jax.Array, jax.Array]:
    h = self.lm.hidden_states(tokens, **kw)
    return self.lm.logits_from_hidden(h), self.route(h)


class FusionRoute(nnx.Module):
  """The router and n frozen experts as one module (one train state; the experts never train)."""

  def __init__(self, router: Router, experts: Sequence[decoder.Decoder]):
    check_vocabularies(router.lm.cfg, [e.cfg for e in experts])
    if router.num_experts != len(experts):
      raise ValueError(f'the routing head scores {router.num_experts} experts, got {len(experts)}')
    for e in experts:
      adapters_core.freeze_base(e)  # Param -> Frozen: no gradient, no optimizer state
    self.router = router
    self.experts = nnx.List(list(experts))

  @property
  def num_experts(self) -> int:
    return len(self.experts)

  def expert_logits(self, tokens: jax.Array, **kw) -> jax.Array:
    """Every expert's logits [n, B, T, V] on the same inputs, under stop_gradient (frozen)."""
    return jax.lax.stop_gradient(jnp.stack([e(tokens, **kw) for e in self.experts]))


def check_vocabularies(router: decoder.DecoderConfig, experts: Sequence[decoder.DecoderConfig]):
  """A one-line error naming both sizes when any expert's vocabulary differs from the router's."""
  for i, cfg in enumerate(experts):
    if cfg.vocab_size != router.vocab_size or cfg.padded_vocab != router.padded_vocab:
      raise VocabularyMismatch(
        f'expert {i} has vocab_size {cfg.vocab_size} but the router has {router.vocab_size}: '
        'logit addition (FusionRoute Eq. 1) needs experts and router with one vocabulary'
      )


# ---------------------------------------------------------------------------------------------------
# Eq. 1 and its relatives.


class Mixing(NamedTuple):
  """How the router's and the experts' log-probs are combined (traced: one program for all).

  router_coef [] f32; routed [] bool; weights [B, n] f32 (used when not routed); threshold [] f32:
  Co-LLM-style deferral when > 0 (see `fuse`).
  """

  router_coef: jax.Array
  routed: jax.Array
  weights: jax.Array
  threshold: jax.Array = np.float32(0.0)

  @classmethod
  def make(
    cls, batch: int, n: int, *, router: float, routed: bool, weights=None, threshold: float = 0.0
  ) -> Mixing:
    w = np.zeros((batch, n), np.float32) if weights is None else np.asarray(weights, np.float32)
    w = np.broadcast_to(w, (batch, n)).copy()
    return cls(np.float32(router), np.bool_(routed), w, np.float32(threshold))


def fusionroute(batch: int, n: int) -> Mixing:
  """Eq. 1: the router LM plus the routed expert."""
  return Mixing.make(batch, n, router=1.0, routed=True)


def routing_only(batch: int, n: int) -> Mixing:
  """The paper's ablation: the routed expert alone (no complementary logits)."""
  return Mixing.make(batch, n, router=0.0, routed=True)


def router_lm(batch: int, n: int) -> Mixing:
  """The router's LM alone (the fine-tuned baseline's decoding)."""
  return Mixing.make(batch, n, router=1.0, routed=False)


def single_expert(batch: int, n: int, i: int) -> Mixing:
  return Mixing.make(batch, n, router=0.0, routed=False, weights=np.eye(n, dtype=np.float32)[i])


def uniform(batch: int, n: int) -> Mixing:
  """Uniform logit averaging: the normalised geometric mean of the n experts."""
  return Mixing.make(batch, n, router=0.0, routed=False, weights=np.full(n, 1.0 / n, np.float32))


def deferral(batch: int, n: int, threshold: float) -> Mixing:
  """Co-LLM-style deferral: the router LM alone, except at tokens where the routing head's
  probability of its chosen expert, softmax(w_t)_{I*}, reaches `threshold` (in (0, 1]): there the
  chosen expert alone. A hard switch between whole distributions, never a product."""
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f'the deferral threshold must be in (0, 1], got {threshold}')
  return Mixing.make(batch, n, router=1.0, routed=True, threshold=threshold)


def oracle(domains: Sequence[int], n: int) -> Mixing:
  """Oracle domain routing: each prompt's own domain expert for every token."""
  weights = np.eye(n, dtype=np.float32)[np.asarray(domains)]
  return Mixing.make(len(domains), n, router=0.0, routed=False, weights=weights)


def fuse(
  router_logits: jax.Array, routing: jax.Array, expert_logits: jax.Array, mix: Mixing
) -> tuple[jax.Array, jax.Array]:
  """(log pi_final [..., V], selected expert argmax_i w [...]) by `mix` (Eq. 1 for fusionroute()).

  router_logits [..., V], routing [..., n], expert_logits [n, ..., V]; `mix.weights` [B, n]
  broadcasts over any axes between the batch and the vocabulary. Log-softmax of each model first,
  so the sum is a product of normalised distributions, then renormalised; all in float32.
  """
  lr = jax.nn.log_softmax(router_logits.astype(jnp.float32), axis=-1)
  le = jax.nn.log_softmax(expert_logits.astype(jnp.float32), axis=-1)
  n = le.shape[0]
  selected = jnp.argmax(routing, axis=-1)
  fixed = mix.weights.reshape(mix.weights.shape[:1] + (1,) * (routing.ndim - 2) + (n,))
  v = jnp.where(mix.routed, jax.nn.one_hot(selected, n, dtype=jnp.float32), fixed)
  experts = jnp.einsum('...n,n...v->...v', v, le)
  fused = jax.nn.log_softmax(mix.router_coef * lr + experts, axis=-1)
  # Deferral (threshold > 0): the selected expert alone where the head is confident, else the LM.
  confident = jnp.max(jax.nn.softmax(routing.astype(jnp.float32), axis=-1), axis=-1) >= (
    mix.threshold
  )
  deferred = jnp.where(confident[..., None], experts, lr)
  out = jnp.where(mix.threshold > 0, deferred, fused)
  return out, selected.astype(jnp.int32)


def sequence_logprobs(
  model: FusionRoute, tokens: jax.Array, segment_ids: jax.Array, mix: Mixing
) -> tuple[jax.Array, jax.Array]:
  """(log pi_final [B, T, V], selected [B, T]) at every position of `tokens` [B, T], recomputed
  from scratch (no KV cache): the reference the cached decode loop must reproduce."""
  kw = {'segment_ids': segment_ids}
  logits, routing = model.router(tokens, **kw)
  return fuse(logits, routing, model.expert_logits(tokens, **kw), mix)


# ---------------------------------------------------------------------------------------------------
# Decoding.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Generation:
  """tokens [B, N] (EOS included, then pad); lengths [B]; logprobs [B, N] of each token under the
  fused distribution; experts [B, N] the routed expert argmax_i w_t (whatever the mixing used);
  done [B] whether the row emitted EOS."""

  tokens: jax.Array
  lengths: jax.Array
  logprobs: jax.Array
  experts: jax.Array
  done: jax.Array


def _models(model: FusionRoute) -> list[decoder.Decoder]:
  return [model.router.lm, *model.experts]


def _heads(model: FusionRoute, hs: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
  """(router logits, routing logits, expert logits [n, ...]) from each model's hidden states."""
  router_logits = model.router.lm.logits_from_hidden(hs[0])
  routing = model.router.route(hs[0])
  experts = jnp.stack([e.logits_from_hidden(h) for e, h in zip(model.experts, hs[1:], strict=True)])
  return router_logits, routing, jax.lax.stop_gradient(experts)


@functools.partial(
  jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'eos_id', 'pad_id', 'greedy')
)
def _generate(
  graphdef, state, tokens, mask, mix, keys, temperature, *, max_new_tokens, eos_id, pad_id, greedy
):
  model = nnx.merge(graphdef, state)
  b, p = tokens.shape
  n_new = max_new_tokens
  last = p - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # each row's last real prompt token
  caches, hs = [], []
  for m in _models(model):
    cache = kv_cache.KVCache.init(m.cfg, b, p + n_new)
    h, cache = m.hidden_states(tokens, cache=cache, input_mask=mask)
    caches.append(cache)
    hs.append(h[jnp.arange(b), last])

  def cond(loop):
    t, _, _, _, done, _ = loop
    return (t < n_new) & ~jnp.all(done)

  def body(loop):
    # One fused distribution per step from the carried hidden states, one token, then every model
    # (router and all n experts) reads it: their caches stay in step with the generated text.
    t, hs, caches, outs, done, lengths = loop
    logp, selected = fuse(*_heads(model, hs), mix)
    if greedy:
      tok = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    else:
      slogp = jax.nn.log_softmax(sampler.sampling_logits(logp, temperature, None, None), axis=-1)
      step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t)
      drawn = sampler.sample_categorical(step_keys, slogp)
      tok = jnp.where(temperature <= 0, jnp.argmax(logp, axis=-1).astype(jnp.int32), drawn)
    active = ~done
    tok = jnp.where(active, tok, pad_id)
    lp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    out_tok, out_lp, out_sel = outs
    outs = (
      out_tok.at[:, t].set(tok),
      out_lp.at[:, t].set(jnp.where(active, lp, 0.0)),
      out_sel.at[:, t].set(jnp.where(active, selected, -1)),
    )
    new_hs, new_caches = [], []
    for m, cache in zip(_models(model), caches, strict=True):
      h, cache = m.hidden_states(tok[:, None], cache=cache, input_mask=active[:, None])
      new_hs.append(h[:, 0])
      new_caches.append(cache)
    lengths = lengths + active.astype(jnp.int32)
    done = done | (active & (tok == eos_id))
    return t + 1, new_hs, new_caches, outs, done, lengths

  outs = (
    jnp.full((b, n_new), pad_id, jnp.int32),
    jnp.zeros((b, n_new), jnp.float32),
    jnp.full((b, n_new), -1, jnp.int32),
  )
  start = (jnp.zeros((), jnp.int32), hs, caches, outs, jnp.zeros(b, bool), jnp.zeros(b, jnp.int32))
  _, _, _, (out_tok, out_lp, out_sel), done, lengths = jax.lax.while_loop(cond, body, start)
  return Generation(out_tok, lengths, out_lp, out_sel, done)


def generate(
  model: FusionRoute,
  prompts: Any,
  mix: Mixing,
  *,
  max_new_tokens: int,
  eos_id: int,
  pad_id: int = 0,
  prompt_mask: Any = None,
  temperature: float = 0.0,
  key: Any = None,
) -> Generation:
  """Decodes a batch of prompts with the fused distribution `mix` (Eq. 1 for `fusionroute`).

  prompts: int [B, P] with `prompt_mask` (True = real token; left padding is usual), or a list of
  token lists (left-padded here). temperature <= 0 is greedy (the paper's setting); otherwise a
  token is sampled from the fused distribution at that temperature with per-row keys
  (common.sampling.row_keys: row b's draw depends only on its key and t).
  """
  if isinstance(prompts, (list, tuple)) and prompt_mask is None:
    prompts, prompt_mask = sampler.pad_prompts(prompts, side='left', pad_id=pad_id)
  tokens = jnp.asarray(prompts, jnp.int32)
  mask = jnp.ones(tokens.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
  b = tokens.shape[0]
  greedy = float(temperature) <= 0
  if key is None:
    if not greedy:
      raise ValueError('sampling with temperature > 0 needs a key')
    key = 0
  keys = sampler.row_keys(key, np.arange(b)) if np.ndim(key) == 0 else jnp.asarray(key)
  graphdef, state = nnx.split(model)
  return _generate(
    graphdef,
    state,
    tokens,
    mask,
    Mixing(*(jnp.asarray(x) for x in mix)),
    keys,
    jnp.float32(temperature),
    max_new_tokens=int(max_new_tokens),
    eos_id=int(eos_id),
    pad_id=int(pad_id),
    greedy=greedy,
  )
