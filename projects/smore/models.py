"""Mixture adapters on frozen linear layers: MixLoRA, HydraLoRA and S'MoRE (arXiv 2504.06426).

All three are `common.adapters.core.Adapter`s, so `core.adapt(model, pattern, factory(...))` puts
them on any nnx.Linear of a model; all shapes are static and no Python loop runs over tokens.

MixLoRA (a 1-layer mixture of LoRA experts): a linear router over s experts, top-k switch gate,
  delta = sum_{e in topk} w_e (alpha/r) x A_e B_e. The k chosen weights are scattered into a dense
  [N, s] weight matrix, so the forward is one rank-(s r) LoRA with per-token column weights.
HydraLoRA: one shared A, s heads B_e, a dense softmax gate: delta = sum_e w_e (alpha/r) x A B_e.

S'MoRE (Sec. 3 of the paper; symbols as in ../shared/docs/papers/core.md Sec. 3): L layers of
residual experts l = 0..L-1 with s_l experts of rank r_l, hidden sizes d_0 = 0,
d_{l+1} = d_l + s_l r_l (Eq. 4), expert e of layer l maps x to c_l (B_l^e (A_l^e x + a) + b) in
R^{d_{l+1}}, mixing matrices W_l [d_l -> d_{l+1}] for l >= 1 and W_proj [d_L -> d_out].
  Routing is top-down: x_down = D x; the top layer's gate scores softmax(q . k_e) with
  q = MLP(x_down) and learnt keys k_e, keeps f_{L-1} experts; each lower layer's gate sees
  concat(x_down, keys of every selected ancestor), so a child's choice is conditioned on its
  ancestors, and keeps f_l children per parent. Index tensors are [N, f_{L-1}, ..., f_l].
  Propagation is bottom-up (Eq. 3): a node n chosen at layer l with children C(n) has
    x_l^n = sum_{c in C(n)} alpha_c v_c, v_n = sigma(R_l^n(x) + W_l x_l^n + w_l)   ('all')
    v_n = R_l^n(x) + W_l sigma(x_l^n) + w_l                                       ('child' = S'MoRE*)
  and the output is W_proj (sum over the top choices alpha_n v_n) + b_proj.
  Compute-then-gather ('subgraph'): every expert's R_l(x) [N, s_l, d_{l+1}] is computed for every
  token (cheap: it is a LoRA of rank s_l r_l) and the routed ones are gathered with
  take_along_axis; `forward_mode='tree'` instead gathers the chosen experts' weights per node and
  computes them there (the paper's reference form; used to test the fast path).
  S'MoRE# (`shared_pool=True`): one pool of s experts of rank r serves all layers, all hidden sizes
  are s r, and each expert's residual is computed once per token.
Gates: 'switch' (softmax, top-k, renormalised), 'noisy_topk' (Shazeer et al.: logits plus
softplus-scaled Gaussian noise in training, softmax over the kept logits), 'dense' (all experts,
softmax weights, no balance loss). Switch and noisy gates add the load-balance loss of losses.py
to `core.AuxLoss`.
Initialisations: 'w_final_zero' (W_proj = 0: the adapter is exactly 0 at init; A, B, W
kaiming-uniform), 'eq_1_layer' (B_l^e writes A_l^e x into its own block of the first s_l r_l
coordinates, W_l = [0, I] copies x_l into the last d_l coordinates, W_proj = 0: the L-layer
S'MoRE is then a 1-layer mixture over the union of the experts' subspaces) and 'normal' (all
kaiming, W_proj too).
"""

# ruff: noqa: E741 - `l` is the paper's layer index (Eq. 3-9); renaming it would obscure the maths.

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
import math
import zlib

from flax import nnx
import jax
import jax.numpy as jnp

from common.adapters import core
from common.adapters import lora
from projects.smore import losses

GATES = ('switch', 'noisy_topk', 'dense')
ACTIVATIONS = {'tanh': jnp.tanh, 'relu': jax.nn.relu, 'identity': lambda x: x}
INITS = ('w_final_zero', 'eq_1_layer', 'normal')
POSITIONS = ('all', 'child')


def _zeros():
  return nnx.initializers.zeros


def _uniform01(key, shape, dtype):
  return jax.random.uniform(key, shape, dtype)


def _tokens_mask(n: int, leading: tuple[int, ...]) -> jax.Array | None:
  """The context's token mask flattened to [n] (None if no mask or it does not fit)."""
  mask = core.current().token_mask
  if mask is None:
    return None
  if math.prod(mask.shape) != n or tuple(mask.shape) != leading:
    return None
  return mask.reshape(n).astype(bool)


class KeyStream:
  """The keys `nnx.Rngs(params=key).params()` draws, fold_in(key, 0), fold_in(key, 1), ...,
  with the count kept as a Python int.

  Why: an nnx.RngStream keeps its count in a Variable. The adapters are built inside a trace
  (`train_loop.abstract_state`'s eval_shape, `init_state`'s jit), where every draw writes a traced
  count back, and flax's `Variable.set_value` then asks the traced value for `.sharding`. JAX
  answers with an AttributeError whose message (`_origin_msg` -> `find_progenitors`) walks every
  equation traced so far, so N draws cost O(N^2): the SmolLM2 S'MoRE run (90 adapters, 24 draws
  each, after the 30-layer base) spent minutes there per trace (projects/smore/README.md). Here a
  draw is one fold_in with a constant. The keys, and so every initial value, are bitwise those of
  nnx.Rngs(params=key) (fold_in casts the count to uint32 either way; tested). Everything that
  takes `rngs` in this module (and lora.LoRA) calls only `rngs.params()`.
  """

  def __init__(self, key: jax.Array | int):
    self.key = jax.random.key(key) if isinstance(key, int) else key
    self.count = 0

  def params(self) -> jax.Array:
    key = jax.random.fold_in(self.key, self.count)
    self.count += 1
    return key


def _adapter_key(name: str, purpose: int) -> jax.Array | None:
  key = core.current().key
  if key is None:
    return None
  return jax.random.fold_in(
    jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF), purpose
  )


SMALL_K = 4  # top-k with k <= SMALL_K runs as k argmax passes (no sort on CPU)
SMALL_S = 16  # routed picks from <= SMALL_S experts are selects, not gathers (no scatter in grad)


def top_k(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """jax.lax.top_k over the last axis: (values [..., k], int32 indices [..., k]).

  Why not lax.top_k: on CPU it lowers to a sort per row, which cost more than the rest of a small
  gate together. For k <= SMALL_K this takes k argmax passes instead, masking each pick with -inf;
  the result is the same (descending values; among equal values the lower index first, as
  lax.top_k; each value is the input's element, and its gradient reaches that element only).
  """
  s = values.shape[-1]
  if k > SMALL_K or k > s:
    v, i = jax.lax.top_k(values, k)
    return v, i.astype(jnp.int32)
  iota = jnp.arange(s, dtype=jnp.int32)
  cur = values
  vals, idxs = [], []
  for j in range(k):
    i = jnp.argmax(cur, axis=-1).astype(jnp.int32)
    hit = iota == i[..., None]
    vals.append(jnp.sum(jnp.where(hit, values, 0), axis=-1))
    idxs.append(i)
    if j + 1 < k:
      cur = jnp.where(hit, -jnp.inf, cur)
  return jnp.stack(vals, axis=-1), jnp.stack(idxs, axis=-1)


def pick(table: jax.Array, idx: jax.Array, axis: int) -> jax.Array:
  """take(table, idx) along `axis`, batched over the axes before it, for small expert counts.

  table [*B, s, *rest], idx [*B, *I] (ints in [0, s)) -> [*B, *I, *rest]. For s <= SMALL_S the
  pick is a masked sum over the s entries (one is kept, the rest contribute exact zeros), so its
  gradient is a select instead of the scatter-add a gather's gradient needs (serial on CPU).
  """
  s = table.shape[axis]
  batch = table.shape[:axis]
  rest = table.shape[axis + 1 :]
  inner = idx.shape[len(batch) :]
  if s > SMALL_S:
    flat = idx.reshape(*batch, -1)
    flat = flat.reshape(*flat.shape, *([1] * len(rest)))
    out = jnp.take_along_axis(table, flat, axis=axis)
    return out.reshape(*batch, *inner, *rest)
  hit = idx[..., None] == jnp.arange(s, dtype=idx.dtype)  # [*B, *I, s]
  hit = hit.reshape(*hit.shape, *([1] * len(rest)))
  t = table.reshape(*batch, *([1] * len(inner)), s, *rest)
  return jnp.sum(jnp.where(hit, t, jnp.zeros((), table.dtype)), axis=len(batch) + len(inner))


def top_k_gate(
  logits: jax.Array,
  k: int,
  kind: str,
  noise_std: jax.Array | None = None,
  key: jax.Array | None = None,
):
  """(idx [..., k], weights [..., k], probs [..., s]) for one of GATES.

  probs is the clean softmax (what the balance loss averages). switch: the top-k of probs,
  renormalised to sum to 1. noisy_topk: top-k of logits + noise_std * N(0, 1) when a key is given
  (training), softmax over the kept noisy logits. dense: every expert (k must equal s).
  """
  s = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  if kind == 'dense':
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), logits.shape)
    return idx, probs, probs
  if kind == 'switch':
    w, idx = top_k(probs, k)
    return idx, w / jnp.sum(w, axis=-1, keepdims=True), probs
  if kind == 'noisy_topk':
    noisy = logits
    if key is not None and noise_std is not None:
      noisy = logits + noise_std * jax.random.normal(key, logits.shape, jnp.float32)
    top, idx = top_k(noisy, k)
    return idx, jax.nn.softmax(top, axis=-1), probs
  raise core.AdapterError(f'unknown gate {kind!r}; use one of {GATES}')


def _check_gate(kind: str) -> None:
  if kind not in GATES:
    raise core.AdapterError(f'unknown gate {kind!r}; use one of {GATES}')


# ---------------------------------------------------------------------------------------------------
# MixLoRA and HydraLoRA.


class MixLoRA(core.Adapter):
  """s LoRA experts of rank r with a linear router and a top-k gate (1-layer S'MoRE, Prop. 3.1)."""

  def __init__(
    self,
    d_in,
    d_out,
    *,
    experts: int,
    rank: int,
    top_k: int = 2,
    gate='switch',
    alpha: float | None = None,
    balance_weight: float = 1e-2,
    axes=(None, None),
    dtype='float32',
    rngs: nnx.Rngs | KeyStream,
  ):
    _check_gate(gate)
    if not 1 <= top_k <= experts:
      raise core.AdapterError(f'MixLoRA top_k {top_k} must be in [1, {experts}]')
    self.d_in, self.d_out, self.experts, self.rank = d_in, d_out, experts, rank
    self.top_k = experts if gate == 'dense' else top_k
    self.gate, self.balance_weight, self.dtype = gate, balance_weight, dtype
    self.scaling = float(alpha if alpha is not None else rank) / rank
    self.router = lora.param(
      lora.kaiming_uniform(), (d_in, experts), (axes[0], None), rngs.params()
    )
    self.noise = (
      lora.param(_zeros(), (d_in, experts), (axes[0], None), rngs.params())
      if gate == 'noisy_topk'
      else None
    )
    self.a = lora.param(
      lora.kaiming_uniform(), (experts, d_in, rank), ('experts', axes[0], None), rngs.params()
    )
    self.b = lora.param(_zeros(), (experts, rank, d_out), ('experts', None, axes[1]), rngs.params())
    self.balance = core.AuxLoss(jnp.zeros((), jnp.float32))

  def __call__(self, x):
    lead = x.shape[:-1]
    n = math.prod(lead)
    dt = jnp.dtype(self.dtype)
    xf = x.reshape(n, self.d_in).astype(dt)
    logits = xf.astype(jnp.float32) @ self.router[...]
    std = None if self.noise is None else jax.nn.softplus(xf.astype(jnp.float32) @ self.noise[...])
    key = _adapter_key(self.name, 0) if core.current().train else None
    idx, w, probs = top_k_gate(logits, self.top_k, self.gate, std, key)
    dense_w = jnp.sum(jax.nn.one_hot(idx, self.experts, dtype=jnp.float32) * w[..., None], axis=1)
    if self.gate != 'dense':
      self.balance[...] = losses.balance_loss(
        probs, idx, _tokens_mask(n, lead), self.balance_weight
      )
    h = jnp.einsum('ni,eir->ner', xf, self.a[...].astype(dt)) * dense_w[..., None].astype(dt)
    out = self.scaling * jnp.einsum('ner,ero->no', h, self.b[...].astype(dt))
    return out.reshape(*lead, self.d_out)


class HydraLoRA(core.Adapter):
  """A shared down-projection A [d_in, r], s up-projections B_e, a dense softmax router."""

  def __init__(
    self,
    d_in,
    d_out,
    *,
    heads: int,
    rank: int,
    alpha: float | None = None,
    axes=(None, None),
    dtype='float32',
    rngs: nnx.Rngs | KeyStream,
  ):
    self.d_in, self.d_out, self.heads, self.rank, self.dtype = d_in, d_out, heads, rank, dtype
    self.scaling = float(alpha if alpha is not None else rank) / rank
    self.router = lora.param(lora.kaiming_uniform(), (d_in, heads), (axes[0], None), rngs.params())
    self.a = lora.param(lora.kaiming_uniform(), (d_in, rank), (axes[0], None), rngs.params())
    self.b = lora.param(_zeros(), (heads, rank, d_out), ('experts', None, axes[1]), rngs.params())

  def __call__(self, x):
    dt = jnp.dtype(self.dtype)
    w = jax.nn.softmax((x.astype(jnp.float32) @ self.router[...]), axis=-1).astype(dt)
    h = jnp.einsum('...i,ir->...r', x.astype(dt), self.a[...].astype(dt))
    return self.scaling * jnp.einsum('...r,...e,ero->...o', h, w, self.b[...].astype(dt))


# ---------------------------------------------------------------------------------------------------
# S'MoRE.


@dataclasses.dataclass(frozen=True)
class SMoRESpec:
  """The architecture of one S'MoRE adapter (lists run over layers l = 0..L-1, bottom to top)."""

  experts: tuple[int, ...]  # s_l
  ranks: tuple[int, ...]  # r_l
  fanouts: tuple[int, ...]  # f_l (dense gates select all s_l)
  gate: str = 'switch'
  gate_dim: int = 32  # m: gate query / key size
  down_dim: int = 32  # d_down of the router's input projection
  activation: str = 'tanh'
  position: str = 'all'  # 'all' = S'MoRE, 'child' = S'MoRE*
  shared_pool: bool = False  # S'MoRE#
  init: str = 'w_final_zero'
  scaling: float = 1.0  # c_l = alpha_l / r_l (1.0 in the paper's configs)
  balance_weight: float = 1e-2

  def __post_init__(self):
    n = len(self.experts)
    if n < 1 or len(self.ranks) != n or len(self.fanouts) != n:
      raise core.AdapterError(
        f"S'MoRE needs equal-length experts/ranks/fanouts, got {self.experts}, {self.ranks}, "
        f'{self.fanouts}'
      )
    _check_gate(self.gate)
    for name, value, allowed in (
      ('activation', self.activation, ACTIVATIONS),
      ('position', self.position, POSITIONS),
      ('init', self.init, INITS),
    ):
      if value not in allowed:
        raise core.AdapterError(f"S'MoRE {name} {value!r} not in {tuple(allowed)}")
    for s, r, f in zip(self.experts, self.ranks, self.fanouts, strict=True):
      if s < 1 or r < 1 or not 1 <= f <= s:
        raise core.AdapterError(
          f"S'MoRE layer needs s >= 1, r >= 1, 1 <= f <= s; got {s}, {r}, {f}"
        )
    if self.shared_pool and (len(set(self.experts)) != 1 or len(set(self.ranks)) != 1):
      raise core.AdapterError("S'MoRE# shares one pool: experts and ranks must be equal per layer")

  @property
  def num_layers(self) -> int:
    return len(self.experts)

  @property
  def effective_fanouts(self) -> tuple[int, ...]:
    return self.experts if self.gate == 'dense' else self.fanouts

  @property
  def dims(self) -> tuple[int, ...]:
    """d_0 .. d_L: d_0 = 0, d_{l+1} = d_l + s_l r_l (S'MoRE#: s r for every l >= 1)."""
    if self.shared_pool:
      return (0,) + (self.experts[0] * self.ranks[0],) * self.num_layers
    d = [0]
    for s, r in zip(self.experts, self.ranks, strict=True):
      d.append(d[-1] + s * r)
    return tuple(d)

  def gate_in_dims(self) -> tuple[int, ...]:
    """Gate input size per layer: d_down plus one key per ancestor ((L - 1 - l) m)."""
    L = self.num_layers
    return tuple(self.down_dim + (L - 1 - l) * self.gate_dim for l in range(L))


def smore_num_params(spec: SMoRESpec, d_in: int, d_out: int) -> dict[str, int]:
  """Closed-form parameter counts: core (A, B, W, W_proj weights), biases, router, total."""
  d, L, m = spec.dims, spec.num_layers, spec.gate_dim
  s, r = spec.experts, spec.ranks
  if spec.shared_pool:
    core_n = s[0] * r[0] * d_in + s[0] * r[0] * d[1] + (L - 1) * d[1] * d[1] + d[L] * d_out
    bias = s[0] * r[0] + s[0] * d[1] + (L - 1) * d[1] + d_out
  else:
    core_n = sum(s[l] * r[l] * (d_in + d[l + 1]) for l in range(L))
    core_n += sum(d[l] * d[l + 1] for l in range(1, L)) + d[L] * d_out
    bias = sum(s[l] * r[l] + s[l] * d[l + 1] for l in range(L))
    bias += sum(d[l + 1] for l in range(1, L)) + d_out
  router = d_in * spec.down_dim + spec.down_dim
  for l, g in enumerate(spec.gate_in_dims()):
    router += g * m + m + m * m + m + s[l] * m
    if spec.gate == 'noisy_topk':
      router += g * s[l]
  return {'core': core_n, 'bias': bias, 'router': router, 'total': core_n + bias + router}


class TreeGate(nnx.Module):
  """One S'MoRE layer's gate: q = MLP(g) (relu), scores softmax(q . k_e) over learnt keys."""

  def __init__(self, d_gate_in: int, spec: SMoRESpec, layer: int, *, rngs: nnx.Rngs | KeyStream):
    m, s = spec.gate_dim, spec.experts[layer]
    self.kind = spec.gate
    self.k = spec.effective_fanouts[layer]
    self.w1 = lora.param(lora.kaiming_uniform(), (d_gate_in, m), (None, None), rngs.params())
    self.b1 = lora.param(_zeros(), (m,), (None,), rngs.params())
    self.w2 = lora.param(lora.kaiming_uniform(), (m, m), (None, None), rngs.params())
    self.b2 = lora.param(_zeros(), (m,), (None,), rngs.params())
    self.keys = lora.param(_uniform01, (s, m), (None, None), rngs.params())
    self.noise = (
      lora.param(_zeros(), (d_gate_in, s), (None, None), rngs.params())
      if spec.gate == 'noisy_topk'
      else None
    )

  def __call__(self, g: jax.Array, key: jax.Array | None):
    q = jax.nn.relu(g @ self.w1[...] + self.b1[...]) @ self.w2[...] + self.b2[...]
    logits = q @ self.keys[...].T
    std = None if self.noise is None else jax.nn.softplus(g @ self.noise[...])
    return top_k_gate(logits, self.k, self.kind, std, key)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Routing:
  """Per layer l (index l, bottom to top): idx/weights [N, f_{L-1}, ..., f_l], probs [..., s_l]."""

  idx: list
  weights: list
  probs: list


class SMoRE(core.Adapter):
  """Structural mixture of residual experts on one linear layer (see the module docstring)."""

  def __init__(
    self,
    d_in: int,
    d_out: int,
    spec: SMoRESpec,
    *,
    axes=(None, None),
    dtype='float32',
    forward_mode='subgraph',
    rngs: nnx.Rngs | KeyStream,
  ):
    self.d_in, self.d_out, self.spec, self.dtype = d_in, d_out, spec, dtype
    self.forward_mode = forward_mode
    L, d = spec.num_layers, spec.dims
    kaiming = lora.kaiming_uniform()
    self.down = lora.param(kaiming, (d_in, spec.down_dim), (axes[0], None), rngs.params())
    self.down_bias = lora.param(_zeros(), (spec.down_dim,), (None,), rngs.params())
    self.gates = nnx.List(
      [TreeGate(g, spec, l, rngs=rngs) for l, g in enumerate(spec.gate_in_dims())]
    )
    pool = 1 if spec.shared_pool else L
    a, a_b, b, b_b = [], [], [], []
    for l in range(pool):
      s, r, dn = spec.experts[l], spec.ranks[l], d[l + 1]
      a.append(lora.param(kaiming, (s, d_in, r), ('experts', axes[0], None), rngs.params()))
      a_b.append(lora.param(_zeros(), (s, r), ('experts', None), rngs.params()))
      if spec.init == 'eq_1_layer':
        eye = jnp.zeros((s, r, dn), jnp.float32)
        for e in range(s):
          eye = eye.at[e, :, e * r : (e + 1) * r].set(jnp.eye(r))
        b.append(core.AdapterParam(eye, out_sharding=('experts', None, None)))
      else:
        b.append(lora.param(kaiming, (s, r, dn), ('experts', None, None), rngs.params()))
      b_b.append(lora.param(_zeros(), (s, dn), ('experts', None), rngs.params()))
    self.a, self.a_bias = nnx.List(a), nnx.List(a_b)
    self.b, self.b_bias = nnx.List(b), nnx.List(b_b)
    w, w_b = [], []
    for l in range(1, L):
      if spec.init == 'eq_1_layer':
        mix = jnp.zeros((d[l], d[l + 1]), jnp.float32).at[:, d[l + 1] - d[l] :].set(jnp.eye(d[l]))
        w.append(core.AdapterParam(mix, out_sharding=(None, None)))
      else:
        w.append(lora.param(kaiming, (d[l], d[l + 1]), (None, None), rngs.params()))
      w_b.append(lora.param(_zeros(), (d[l + 1],), (None,), rngs.params()))
    self.w, self.w_bias = nnx.List(w), nnx.List(w_b)
    proj_init = kaiming if spec.init == 'normal' else _zeros()
    self.proj = lora.param(proj_init, (d[L], d_out), (None, axes[1]), rngs.params())
    self.proj_bias = lora.param(_zeros(), (d_out,), (axes[1],), rngs.params())
    self.balance = core.AuxLoss(jnp.zeros((), jnp.float32))

  # -- routing (top-down) ---------------------------------------------------------------------------
  def route(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[Routing, jax.Array]:
    """Routing of x [N, d_in] and the summed balance loss (0 for dense gates)."""
    spec = self.spec
    L = spec.num_layers
    g = x.astype(jnp.float32) @ self.down[...] + self.down_bias[...]  # [N, d_down]
    idx, wts, probs = [None] * L, [None] * L, [None] * L
    bal = jnp.zeros((), jnp.float32)
    train = core.current().train
    for l in range(L - 1, -1, -1):
      key = _adapter_key(self.name, l) if train else None
      i, w, p = self.gates[l](g, key)
      idx[l], wts[l], probs[l] = i, w, p
      if spec.gate != 'dense':
        m = (
          None
          if mask is None
          else jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (p.ndim - 2)), p.shape[:-1])
        )
        bal = bal + losses.balance_loss(p, i, m, spec.balance_weight)
      if l > 0:
        sel_keys = pick(self.gates[l].keys[...], i, axis=0)  # [N, ..., f_l, m]
        g = jnp.broadcast_to(g[..., None, :], (*i.shape, g.shape[-1]))
        g = jnp.concatenate([g, sel_keys], axis=-1)
    return Routing(idx, wts, probs), bal

  # -- propagation (bottom-up) ----------------------------------------------------------------------
  def _layer_params(self, l: int):
    p = 0 if self.spec.shared_pool else l
    return self.a[p][...], self.a_bias[p][...], self.b[p][...], self.b_bias[p][...]

  def residual_all(self, x, l):
    """c_l (B (x A + a) + b) for every expert of layer l: [N, s_l, d_{l+1}] (one layer alone)."""
    a, ab, b, bb = self._layer_params(l)
    dt = jnp.dtype(self.dtype)
    h = jnp.einsum('ni,sir->nsr', x.astype(dt), a.astype(dt)) + ab.astype(dt)
    return self.spec.scaling * (jnp.einsum('nsr,srd->nsd', h, b.astype(dt)) + bb.astype(dt))

  def residual_pools(self, x) -> list[jax.Array]:
    """residual_all(x, l) for every layer l, as two matmuls for the whole stack.

    Why: at adapter sizes a step's time goes to the number of small ops, not to their FLOPs.
    Every expert's A of every layer is one [d_in, sum_l s_l r_l] matrix (one x A), and every B
    is one block of a block-diagonal [sum_l s_l r_l, sum_l s_l d_{l+1}] matrix, so the stack
    costs 2 matmuls instead of 2 L batched ones (and 4 instead of 4 L in the gradient). The
    off-diagonal blocks are exact zeros, so each output sums the same products as residual_all.
    """
    spec, dt = self.spec, jnp.dtype(self.dtype)
    n = x.shape[0]
    if spec.shared_pool:
      return [self.residual_all(x, 0)] * spec.num_layers
    a_cols, a_bias, blocks, b_bias = [], [], [], []
    for l in range(spec.num_layers):
      a, ab, b, bb = self._layer_params(l)
      s, r, dn = b.shape
      a_cols.append(jnp.transpose(a, (1, 0, 2)).reshape(self.d_in, s * r))
      a_bias.append(ab.reshape(s * r))
      eye = jnp.eye(s, dtype=bool)[:, None, :, None]  # expert e's rows feed only its columns
      blocks.append(jnp.where(eye, b[:, :, None, :], 0.0).reshape(s * r, s * dn))
      b_bias.append(bb.reshape(s * dn))
    a_all = jnp.concatenate(a_cols, axis=1).astype(dt)
    h = x.astype(dt) @ a_all + jnp.concatenate(a_bias).astype(dt)
    b_all = jax.scipy.linalg.block_diag(*blocks).astype(dt)
    out = spec.scaling * (h @ b_all + jnp.concatenate(b_bias).astype(dt))
    pools, start = [], 0
    for l in range(spec.num_layers):
      s, dn = spec.experts[l], spec.dims[l + 1]
      pools.append(out[:, start : start + s * dn].reshape(n, s, dn))
      start += s * dn
    return pools

  def _residual_tree(self, x, l, idx):
    """The same for the routed experts only, gathering their weights per node (reference)."""
    a, ab, b, bb = self._layer_params(l)
    dt = jnp.dtype(self.dtype)
    xs = x.reshape(x.shape[0], *([1] * (idx.ndim - 1)), x.shape[-1]).astype(dt)
    h = jnp.einsum(
      'n...i,n...ir->n...r', jnp.broadcast_to(xs, (*idx.shape, x.shape[-1])), a[idx].astype(dt)
    ) + ab[idx].astype(dt)
    return self.spec.scaling * (
      jnp.einsum('n...r,n...rd->n...d', h, b[idx].astype(dt)) + bb[idx].astype(dt)
    )

  def hidden(self, x: jax.Array, routing: Routing) -> jax.Array:
    """x_L [N, d_L] from x [N, d_in] and a routing (Eq. 3, bottom-up)."""
    spec = self.spec
    act = ACTIVATIONS[spec.activation]
    dt = jnp.dtype(self.dtype)
    # Every expert's residual for every token (S'MoRE#: one pool, computed once, reused by every
    # layer), then each node picks its expert's row.
    pools = None if self.forward_mode == 'tree' else self.residual_pools(x)
    h = None  # x_l for every node of the current layer: [N, f_{L-1}, ..., f_l, d_l]
    for l in range(spec.num_layers):
      idx, w = routing.idx[l], routing.weights[l]
      if self.forward_mode == 'tree':
        res = self._residual_tree(x, l, idx)
      else:
        res = pick(pools[l], idx, axis=1)
      if l == 0:
        v = act(res) if spec.position == 'all' else res
      else:
        wl, wb = self.w[l - 1][...].astype(dt), self.w_bias[l - 1][...].astype(dt)
        if spec.position == 'all':
          v = act(res + h @ wl + wb)
        else:
          v = res + act(h) @ wl + wb
      h = jnp.sum(w[..., None].astype(dt) * v, axis=-2)  # the parents' x_{l+1}
    return h

  def __call__(self, x: jax.Array) -> jax.Array:
    lead = x.shape[:-1]
    n = math.prod(lead)
    xf = x.reshape(n, self.d_in)
    routing, bal = self.route(xf, _tokens_mask(n, lead))
    self.balance[...] = bal
    record = core.current().record
    if record is not None:
      record[self.name] = jax.tree.map(lambda a: a.reshape(*lead, *a.shape[1:]), routing)
    h = self.hidden(xf, routing)
    out = h @ self.proj[...].astype(h.dtype) + self.proj_bias[...].astype(h.dtype)
    return out.reshape(*lead, self.d_out)


# ---------------------------------------------------------------------------------------------------
# Factories for core.adapt and closed-form counts (the equal-budget configs use these).


def factory(method: str, rngs: nnx.Rngs | KeyStream, *, dtype='float32', **kw) -> Callable:
  """make_adapter(path, linear) for method in lora | mixlora | hydralora | smore.

  Pass a KeyStream (not an nnx.Rngs) when the adapters are built inside a trace: see KeyStream.
  """

  def make(path: str, linear: nnx.Linear):
    del path
    d_in, d_out, axes = linear.in_features, linear.out_features, lora.kernel_axes(linear)
    if method == 'lora':
      return lora.LoRA(d_in, d_out, rank=kw['rank'], axes=axes, dtype=dtype, rngs=rngs)
    if method == 'mixlora':
      return MixLoRA(
        d_in,
        d_out,
        experts=kw['experts'],
        rank=kw['rank'],
        top_k=kw['top_k'],
        gate=kw.get('gate', 'switch'),
        axes=axes,
        dtype=dtype,
        rngs=rngs,
      )
    if method == 'hydralora':
      return HydraLoRA(
        d_in, d_out, heads=kw['experts'], rank=kw['rank'], axes=axes, dtype=dtype, rngs=rngs
      )
    if method == 'smore':
      return SMoRE(d_in, d_out, kw['spec'], axes=axes, dtype=dtype, rngs=rngs)
    raise core.AdapterError(f'unknown adapter method {method!r}')

  return make


def num_params(method: str, d_in: int, d_out: int, **kw) -> int:
  """Closed-form trainable parameters of one adapter (checked against leaf counts in tests)."""
  if method == 'lora':
    return lora.num_params(d_in, d_out, kw['rank'])
  if method == 'mixlora':
    extra = d_in * kw['experts'] if kw.get('gate', 'switch') == 'noisy_topk' else 0
    return kw['experts'] * kw['rank'] * (d_in + d_out) + d_in * kw['experts'] + extra
  if method == 'hydralora':
    return kw['rank'] * d_in + kw['experts'] * kw['rank'] * d_out + d_in * kw['experts']
  if method == 'smore':
    return smore_num_params(kw['spec'], d_in, d_out)['total']
  raise core.AdapterError(f'unknown adapter method {method!r}')


def total_params(method: str, shapes: Sequence[tuple[int, int]], **kw) -> int:
  return sum(num_params(method, i, o, **kw) for i, o in shapes)
