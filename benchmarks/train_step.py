"""Decoder train-step speed: tokens/s and FLOP utilisation against this machine's own matmul peak.

Why a ratio: wall times on these shared 2-core VMs swing ~2x between runs (../shared/docs/stack.md
§2), so an absolute tokens/s is only comparable within one run. This script measures the `jnp.dot`
f32 peak (n=2048) in the same process, interleaved with the train steps so both see the same machine
state, and reports the step's achieved FLOP rate as a fraction of it (the issue's goal: >= 0.7 at
d_model 512).

The step is the one every paper trains with: `common.models.decoder.Decoder` (llama family, tied
embeddings) + `common.losses.next_token_loss` + `common.train_loop.make_train_step` (jit, donated
state) with optax AdamW, on a one-device mesh. FLOPs per step = 6 * N * tokens (N = all parameters;
the tied embedding counts once, as the LM head) + 12 * L * T * d * tokens (attention scores and
values, forward + backward, causal half not discounted), as stack.md counts them.

  python -m benchmarks.train_step                       # d_model 256 and 512, the defaults below
  python -m benchmarks.train_step --d_models=512 --steps=20 --batch=16

Prints one markdown table; medians over --steps timed steps after --warmup steps, ranges min-max.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from common import losses  # noqa: E402
from common import sharding  # noqa: E402
from common import train_loop  # noqa: E402
from common.models import decoder  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--d_models', default='256,512', help='comma-separated model widths')
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--head_dim', type=int, default=64, help='heads = d_model / head_dim (MHA)')
  p.add_argument('--mlp_ratio', type=float, default=4.0, help='gated MLP width = ratio * d_model')
  p.add_argument('--seq', type=int, default=256)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--vocab', type=int, default=8192)
  p.add_argument('--dtype', default='float32', help='compute dtype (parameters stay float32)')
  p.add_argument('--steps', type=int, default=12, help='timed steps per model')
  p.add_argument('--warmup', type=int, default=3, help='untimed steps (compile + caches)')
  p.add_argument('--peak_n', type=int, default=2048, help='square matmul size for the peak')
  p.add_argument('--peak_reps', type=int, default=3, help='timed matmuls per peak measurement')
  return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# The reference: jnp.dot f32 peak.


def matmul_times(n: int, reps: int, warmup: int = 2) -> list[tuple[float, float]]:
  """(wall, CPU) seconds per f32 n x n matmul (jit, block_until_ready), `reps` after `warmup`."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  dot = jax.jit(jnp.dot)
  for _ in range(warmup):
    dot(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0, c0 = time.perf_counter(), time.process_time()
    dot(a, b).block_until_ready()
    times.append((time.perf_counter() - t0, time.process_time() - c0))
  return times


# ---------------------------------------------------------------------------------------------------
# The train step.


def model_config(d_model: int, args: argparse.Namespace) -> decoder.DecoderConfig:
  heads = max(1, d_model // args.head_dim)
  return decoder.DecoderConfig(
    vocab_size=args.vocab,
    d_model=d_model,
    num_layers=args.layers,
    num_heads=heads,
    num_kv_heads=heads,
    head_dim=args.head_dim,
    mlp_dim=int(args.mlp_ratio * d_model),
    dtype=args.dtype,
  )


def step_flops(cfg: decoder.DecoderConfig, num_params: int, batch: int, seq: int) -> float:
  tokens = batch * seq
  attention = 12 * cfg.num_layers * seq * cfg.num_heads * cfg.head_dim * tokens
  return 6.0 * num_params * tokens + attention


def loss_fn(model, batch, key):
  del key
  loss, _ = losses.next_token_loss(model, batch['tokens'])
  return loss, {}


class StepBench:
  """One compiled train step on one device, with its state, batch and FLOP count."""

  def __init__(self, d_model: int, args: argparse.Namespace):
    self.cfg = model_config(d_model, args)
    self.batch, self.seq = args.batch, args.seq
    self.mesh = sharding.make_mesh([('data', 1), ('fsdp', 1), ('tensor', 1)], jax.devices()[:1])
    self.rules = sharding.DEFAULT_RULES
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1)
    cfg = self.cfg

    def create():
      return train_loop.TrainState(decoder.Decoder(cfg, rngs=nnx.Rngs(0)), tx)

    with jax.set_mesh(self.mesh), sharding.axis_rules(self.rules):
      spec = train_loop.init_state(create, self.mesh, self.rules)
      self.state = spec.state
      self.step_fn = train_loop.make_train_step(spec.graphdef, loss_fn, spec.shardings)
    self.num_params = train_loop.count_params(self.state['model'])
    self.flops = step_flops(cfg, self.num_params, self.batch, self.seq)
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, cfg.vocab_size, (self.batch, self.seq + 1), dtype=np.int32)
    with jax.set_mesh(self.mesh):
      self.tokens = sharding.to_global({'tokens': tokens}, self.mesh, self.rules)
    self.key = jax.random.key(0)

  def run(self) -> tuple[float, float]:
    """(wall, CPU) seconds for one step, synchronised on the loss."""
    t0, c0 = time.perf_counter(), time.process_time()
    with jax.set_mesh(self.mesh), sharding.axis_rules(self.rules):
      self.state, metrics = self.step_fn(self.state, self.tokens, self.key)
    metrics['loss'].block_until_ready()
    return time.perf_counter() - t0, time.process_time() - c0


def _fmt_range(xs: list[float], scale: float = 1.0, digits: int = 2) -> str:
  return f'{min(xs) * scale:.{digits}f}-{max(xs) * scale:.{digits}f}'


def main(argv=None) -> int:
  args = parse_args(argv)
  widths = [int(x) for x in args.d_models.split(',') if x]
  peak_flops = 2.0 * args.peak_n**3
  peak_rates: list[float] = []  # wall GFLOP/s of every peak matmul
  peak_cpu_rates: list[float] = []  # GFLOP per CPU-second of every peak matmul

  def measure_peak() -> float:
    """Median wall GFLOP/s of --peak_reps matmuls now (all of them also go into the run's median)."""
    timings = matmul_times(args.peak_n, args.peak_reps)
    rates = [peak_flops / wall / 1e9 for wall, _ in timings]
    peak_rates.extend(rates)
    peak_cpu_rates.extend(peak_flops / cpu / 1e9 for _, cpu in timings)
    return statistics.median(rates)

  rows = []
  for d in widths:
    t0 = time.perf_counter()
    bench = StepBench(d, args)
    for _ in range(args.warmup):
      bench.run()
    setup = time.perf_counter() - t0
    # Each timed step is paired with a peak measurement taken right before it: other processes on a
    # shared VM change the speed of both alike, so the per-step ratio is steadier than either.
    walls, cpus, local_peaks = [], [], []
    for _ in range(args.steps):
      local_peaks.append(measure_peak())
      wall, cpu = bench.run()
      walls.append(wall)
      cpus.append(cpu)
    rows.append((d, bench, walls, cpus, local_peaks))
    print(
      f'd_model {d}: setup+warmup {setup:.1f}s, step median {statistics.median(walls):.3f}s',
      file=sys.stderr,
    )

  peak = statistics.median(peak_rates)
  peak_cpu = statistics.median(peak_cpu_rates)
  tokens = args.batch * args.seq
  print(
    f'\nDecoder train step (llama family, f32 params, {args.dtype} compute, AdamW, 1 device) vs '
    f'jnp.dot f32 n={args.peak_n}: peak {peak:.1f} GFLOP/s wall (median of {len(peak_rates)} in '
    f'this run, range {_fmt_range(peak_rates, digits=1)}), {peak_cpu:.1f} GFLOP per CPU-second; '
    f'load average {os.getloadavg()[0]:.1f}.'
  )
  print(
    f'layers {args.layers}, head_dim {args.head_dim} (MHA), gated MLP {args.mlp_ratio:g}x d_model, '
    f'seq {args.seq}, batch {args.batch} ({tokens} tokens/step), vocab {args.vocab} (tied); '
    f'{args.warmup} warm-up + {args.steps} timed steps, each after {args.peak_reps} peak matmuls; '
    f'python {platform.python_version()}, jax {jax.__version__}, {os.cpu_count()} CPUs.'
  )
  print(
    'Two utilisations: wall GFLOP/s over the peak measured just before each step, and GFLOP per '
    'CPU-second (all threads) over the same for the peak matmul. Other jobs on a loaded VM steal '
    'wall time from both, unevenly; they barely change CPU-seconds, so the CPU ratio is the steadier '
    'measure of the code itself.\n'
  )
  print(
    '| d_model | heads | params | GFLOP/step | step s (median, range) | tokens/s (median, range) '
    '| / paired wall peak (median, range) | / CPU-time peak (median, range) |'
  )
  print('|---|---|---|---|---|---|---|---|')
  for d, bench, walls, cpus, local_peaks in rows:
    gflop = bench.flops / 1e9
    tps = [tokens / t for t in walls]
    paired = [gflop / t / p for t, p in zip(walls, local_peaks, strict=True)]
    by_cpu = [gflop / c / peak_cpu for c in cpus]
    med = statistics.median(walls)
    print(
      f'| {d} | {bench.cfg.num_heads} | {bench.num_params / 1e6:.2f}M | {gflop:.1f} '
      f'| {med:.3f} ({_fmt_range(walls, digits=3)}) '
      f'| {tokens / med:,.0f} ({_fmt_range(tps, digits=0)}) '
      f'| **{statistics.median(paired):.2f}** ({_fmt_range(paired)}) '
      f'| **{statistics.median(by_cpu):.2f}** ({_fmt_range(by_cpu)}) |'
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
