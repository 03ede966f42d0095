"""StreamMem per-clip cost vs stream length: a fixed-budget memory vs full KV in the same run.

The paper's premise (arXiv 2508.15717, §5(a) step 7): with the memory held at M entries, each new
clip costs the same however long the stream has run, while full KV's cost grows with what it holds.
For each stream length (1x..32x a base of `--base_clips` clips) this streams one batch clip by clip
through `projects.streammem.models.Streamer` (one jitted step per clip, the press included) and
times the last `--reps` clips of the stream (block_until_ready per clip; medians and ranges), for
  * StreamMem at a per-layer budget m (its cache: m + one clip + the proxy, whatever the length);
  * full KV (its cache holds the whole stream);
  * prefill only at StreamMem's cache size (the clip's prefill without the press): the press's
    overhead per clip is StreamMem's time minus this one.
Memory: the bytes of each method's memory (cache + slot metadata) after the last clip.

  python -m benchmarks.streammem                      # d_model 256, 4 layers, clips of 64, m=256
  python -m benchmarks.streammem --multipliers=1,4 --reps=5

Timings on the shared 2-core VMs swing between runs: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import machine  # noqa: E402
from common import sharding  # noqa: E402
from common.kv_press import memory  # noqa: E402
from common.models import decoder  # noqa: E402
from projects.streammem import models  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--multipliers', default='1,2,4,8,16,32')
  p.add_argument('--base_clips', type=int, default=4, help='clips in the 1x stream')
  p.add_argument('--clip', type=int, default=64, help='tokens per clip')
  p.add_argument('--budget', type=int, default=256, help='per-layer budget m (M = m x layers)')
  p.add_argument('--d_model', type=int, default=256)
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--reps', type=int, default=4, help='timed clips at the end of each stream')
  return p.parse_args(argv)


def stream_times(streamer, method, budget, *, clips, clip, batch, reps, slots):
  """Seconds of each of the last `reps` clips, and the memory's bytes at the end."""
  rng = np.random.default_rng(0)
  vocab = streamer.cfg.vocab_size
  mem = streamer.start(np.ones((batch, 1), np.int32), np.ones((batch, 1), bool), slots)
  proxy = np.asarray([[2, 3]] * batch, np.int32)
  valid = np.ones((batch, clip), bool)
  times = []
  for c in range(clips):
    tokens = rng.integers(5, vocab, (batch, clip)).astype(np.int32)
    frame = models.frame_ids(c * clip, clip, 16, batch)
    t0 = time.perf_counter()
    mem, _ = streamer.step(
      mem,
      tokens,
      valid,
      frame,
      proxy,
      np.ones(proxy.shape, bool),
      jax.random.key(c),
      method=method,
      budget=budget,
    )
    jax.block_until_ready(mem)
    if c >= max(1, clips - reps):  # clip 0 compiles
      times.append(time.perf_counter() - t0)
  return times, models.memory_bytes(mem)


def fmt(ts) -> str:
  return f'{statistics.median(ts) * 1e3:.1f} ({min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f})'


def main(argv=None) -> int:
  args = parse_args(argv)
  cfg = decoder.DecoderConfig(
    vocab_size=512,
    d_model=args.d_model,
    num_layers=args.layers,
    num_heads=args.d_model // 64,
    num_kv_heads=max(args.d_model // 128, 1),
    head_dim=64,
    mlp_dim=4 * args.d_model,
  )
  with sharding.unsharded():
    model = decoder.Decoder(cfg, rngs=nnx.Rngs(0))
  streamer = models.Streamer(model)
  budget = memory.Budget(layer_tokens=args.budget)
  sm = models.method('streammem', frames_per_clip=args.clip // 16)
  full = models.method('full')
  pressed_slots = args.budget + args.clip + 2
  print(f'# StreamMem per-clip cost | CPU: {machine.cpu()} | jax {jax.__version__}')
  print(
    f'# decoder d_model {args.d_model}, {args.layers} layers; clip {args.clip} tokens; '
    f'per-layer budget {args.budget}; batch {args.batch}; last {args.reps} clips timed (ms)'
  )
  print(
    '| stream | tokens | StreamMem ms/clip | full KV ms/clip | prefill-only ms/clip | '
    'press overhead | StreamMem memory | full KV memory |'
  )
  print('|---|---|---|---|---|---|---|---|')
  # The clip's prefill alone at StreamMem's cache size (full KV over a stream that fits it).
  fit = max((pressed_slots - 3) // args.clip, 1)
  t_pre, _ = stream_times(
    streamer,
    full,
    budget,
    slots=pressed_slots,
    clips=fit,
    clip=args.clip,
    batch=args.batch,
    reps=min(args.reps, fit),
  )
  base = None
  for mult in (int(x) for x in args.multipliers.split(',')):
    clips = args.base_clips * mult
    kw = dict(clips=clips, clip=args.clip, batch=args.batch, reps=min(args.reps, clips))
    t_sm, b_sm = stream_times(streamer, sm, budget, slots=pressed_slots, **kw)
    t_full, b_full = stream_times(streamer, full, budget, slots=1 + clips * args.clip + 2, **kw)
    overhead = statistics.median(t_sm) - statistics.median(t_pre)
    base = base or statistics.median(t_sm)
    print(
      f'| {mult}x | {clips * args.clip} | {fmt(t_sm)} [{statistics.median(t_sm) / base:.2f}x 1x] '
      f'| {fmt(t_full)} | {fmt(t_pre)} | {overhead * 1e3:+.1f} ms | {b_sm / 2**20:.2f} MiB '
      f'| {b_full / 2**20:.2f} MiB |',
      flush=True,
    )
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
