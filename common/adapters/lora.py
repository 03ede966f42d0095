"""LoRA (Hu et al. 2021): delta(x) = (alpha / r) * (x A) B, with B = 0 at init.

A [d_in, r] is drawn like the base kernel's fan-in (kaiming-uniform, as PEFT does) and B [r, d_out]
starts at zero, so the adapted model equals the base model exactly until the first update. The
factors carry the base kernel's logical axes on the shared side (A: (in, None), B: (None, out)), so
under FSDP/TP they are split like the kernel they correct and `x A` needs no extra resharding.
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx
import jax
import jax.numpy as jnp

from common import sharding
from common.adapters import core


def kernel_axes(linear: nnx.Linear) -> tuple:
  """The logical axes (in, out) of a linear layer's kernel, (None, None) if unannotated."""
  names = sharding.variable_logical_axes(linear.kernel)
  return tuple(names) if names else (None, None)


def param(init, shape, axes, key) -> core.AdapterParam:
  """An AdapterParam of `shape` with logical `axes`, drawn by `init(key, shape, f32)`."""
  return core.AdapterParam(init(key, shape, jnp.float32), out_sharding=tuple(axes))


def kaiming_uniform():
  """PEFT's A init: kaiming-uniform with a = sqrt(5) over the fan-in axis (-2)."""
  return nnx.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform', in_axis=-2, out_axis=-1)


class LoRA(core.Adapter):
  """Plain low-rank adapter on a d_in -> d_out linear layer."""

  mergeable = True

  def __init__(
    self,
    d_in: int,
    d_out: int,
    *,
    rank: int,
    alpha: float | None = None,
    axes: tuple = (None, None),
    dtype: str = 'float32',
    rngs: nnx.Rngs,
  ):
    if rank < 1:
      raise core.AdapterError(f'LoRA rank must be >= 1, got {rank}')
    self.d_in, self.d_out, self.rank = d_in, d_out, rank
    self.scaling = float(alpha if alpha is not None else rank) / rank
    self.dtype = dtype
    self.a = param(kaiming_uniform(), (d_in, rank), (axes[0], None), rngs.params())
    self.b = param(nnx.initializers.zeros, (rank, d_out), (None, axes[1]), rngs.params())

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = jnp.dtype(self.dtype)
    h = jnp.einsum('...i,ir->...r', x.astype(dt), self.a[...].astype(dt))
    return self.scaling * jnp.einsum('...r,ro->...o', h, self.b[...].astype(dt))

  def delta_kernel(self) -> jax.Array:
    return self.scaling * (self.a[...] @ self.b[...])


def num_params(d_in: int, d_out: int, rank: int) -> int:
  """Closed-form trainable count of one LoRA adapter."""
  return rank * (d_in + d_out)


def factory(
  *, rank: int, alpha: float | None = None, dtype: str = 'float32', rngs: nnx.Rngs
) -> Callable[[str, nnx.Linear], LoRA]:
  """make_adapter for `core.adapt`: a LoRA of `rank` on each selected layer."""

  def make(path: str, linear: nnx.Linear) -> LoRA:
    del path
    return LoRA(
      linear.in_features,
      linear.out_features,
      rank=rank,
      alpha=alpha,
      axes=kernel_axes(linear),
      dtype=dtype,
      rngs=rngs,
    )

  return make
