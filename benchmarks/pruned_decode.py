"""Decode speed and memory of BlockPruner-pruned decoders vs the dense one, in the same run.

A structurally pruned model (`common.models.decoder.without_blocks`) has no parameters and runs no
compute for its removed MHA / MLP blocks, and its KV cache has one layer per attention block kept.
This script checks that the speed-up tracks what was removed: per model it reports greedy decode
tokens/s (the shared sampler, `common.sampling.sampler.generate`, programs compiled ahead so no
compile is timed), the weight and KV-cache bytes, and the analytic decode FLOPs per token, then the
measured speed-up over the dense model divided by the FLOP ratio and by the weight-byte ratio (1.0:
the speed-up is exactly what the removed compute / bytes predict; batch-1 CPU decoding streams every
weight once per token, so bytes usually predict it better than FLOPs). The speed-up is also given
from this process's CPU seconds in the decode phase (all threads), steadier than wall time when
other jobs share the machine.

The models are timed interleaved, rep by rep (dense, pruned 1, pruned 2, dense, ...), because wall
times on the shared 2-core machines swing with other jobs; medians and min-max ranges over reps.

Which blocks: `--order` is a BlockPruner run's workdir (its removed.json, or for a run still going,
the blocks its metrics.jsonl train rows removed so far) or a comma list such as `mha12,mlp3`;
`--counts` the prefixes of that order to time (default: a sixth and a third of the blocks, capped
at the order's length).

  python -m benchmarks.pruned_decode --model=smollm2 --order=/tmp/bp_real/smollm2_blockpruner
  python -m benchmarks.pruned_decode --model=smoke --order=/tmp/blockpruner_smoke --batches=1,8

--model: smollm2 / gemma3_270m / qwen2_5_coder_0_5b (assets, `python -m common.assets fetch
smollm2`) or smoke (the BlockPruner smoke LM, pretrained here on first use).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import metrics  # noqa: E402
from common.models import decoder  # noqa: E402
from common.models import loader  # noqa: E402
from common.sampling import kv_cache  # noqa: E402
from common.sampling import sampler  # noqa: E402
from projects.blockpruner import models  # noqa: E402

PRETRAINED = ('smollm2', 'gemma3_270m', 'qwen2_5_coder_0_5b')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--model', default='smollm2', help='smollm2 | gemma3_270m | qwen2_5_coder_0_5b')
  p.add_argument('--order', required=True, help='a BlockPruner workdir, or e.g. mha12,mlp3')
  p.add_argument(
    '--counts', default='', help='comma list of removed-block counts (default 1/6, 1/3)'
  )
  p.add_argument('--batches', default='1,8')
  p.add_argument('--prompt_len', type=int, default=32)
  p.add_argument('--new_tokens', type=int, default=32)
  p.add_argument('--reps', type=int, default=3)
  return p.parse_args(argv)


def read_order(order: str) -> list[models.Block]:
  path = pathlib.Path(order)
  if path.is_dir():
    if (path / 'removed.json').is_file():
      from projects.blockpruner import train  # noqa: PLC0415

      return train.removed_order(path)
    rows = metrics.read_jsonl(path / 'metrics.jsonl') if (path / 'metrics.jsonl').exists() else []
    names = [n for r in rows if r.get('split') == 'train' for n in r['removed'].split('+')]
  else:
    names = [n for n in order.split(',') if n]
  out = []
  for n in names:
    kind = n[:3]
    if kind not in models.KINDS or not n[3:].isdigit():
      raise SystemExit(f'--order: {n!r} is not a block like mha12 or mlp3')
    out.append((int(n[3:]), kind))
  if not out:
    raise SystemExit(f'--order={order}: no removed blocks found')
  return out


def decode_flops(cfg: decoder.DecoderConfig, context: int) -> float:
  """Matmul FLOPs of one decode token at `context` cached tokens: 2 x every projection kept, the
  attention scores and values of every MHA block kept, and the LM head."""
  d, h, kv, hd, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  attn = 2 * d * (2 * h * hd + 2 * kv * hd) + 4 * h * hd * context
  mlp = 2 * 3 * d * f
  n_attn = cfg.num_layers - len(cfg.pruned_attn)
  n_mlp = cfg.num_layers - len(cfg.pruned_mlp)
  return n_attn * attn + n_mlp * mlp + 2 * d * cfg.vocab_size


def nbytes(tree) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.model == 'smoke':  # the smoke config's model (TinyTextLM's defaults)
    dense, _ = models.tiny_text_lm(models.TinyTextLM())
  elif args.model in PRETRAINED:
    dense, _, _ = loader.load_pretrained(args.model)
  else:
    raise SystemExit(f'--model={args.model}: one of smoke, {", ".join(PRETRAINED)}')
  order = read_order(args.order)
  total = 2 * dense.cfg.num_layers
  counts = [int(c) for c in args.counts.split(',') if c] or sorted(
    {min(len(order), max(1, round(total / 6))), min(len(order), max(1, round(total / 3)))}
  )
  arms = {'dense': dense}
  for c in counts:
    arms[f'-{c} blocks'] = models.remove(dense, order[:c])
  batches = [int(b) for b in args.batches.split(',')]
  rng = np.random.default_rng(0)
  cache_len = args.prompt_len + args.new_tokens
  print(
    f'# {args.model}: {dense.cfg.num_layers} layers, {total} blocks; order {models.describe(order)}'
  )
  print(
    f'# JAX {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores; prompt '
    f'{args.prompt_len}, {args.new_tokens} new tokens (greedy), {args.reps} reps interleaved'
  )
  for batch in batches:
    prompts = rng.integers(3, dense.cfg.vocab_size, (batch, args.prompt_len)).astype(np.int32)
    config = sampler.SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    times = {name: [] for name in arms}
    cpu = {name: [] for name in arms}
    for m in arms.values():  # warm-up: compile once per model
      sampler.generate(m, prompts, config=config)
    for _ in range(args.reps):
      for name, m in arms.items():
        t: dict[str, float] = {}
        sampler.generate(m, prompts, config=config, timings=t)
        times[name].append(t['decode_s'])
        cpu[name].append(t['decode_cpu_s'])
    print(f'\n## batch {batch}')
    print(
      '| model | removed (MHA/MLP) | params | weights MiB | KV cache MiB | decode tok/s '
      '(min-max) | speed-up | CPU-time speed-up | FLOP ratio | bytes ratio | speed-up / FLOP '
      'ratio | speed-up / bytes ratio | CPU-time speed-up / FLOP ratio |'
    )
    print('|' + '---|' * 13)
    base_s = statistics.median(times['dense'])
    base_cpu = statistics.median(cpu['dense'])
    base_flops = decode_flops(dense.cfg, cache_len)
    base_bytes = nbytes(nnx.state(dense, nnx.Param))
    for name, m in arms.items():
      tok_s = [batch * args.new_tokens / s for s in times[name]]
      speedup = base_s / statistics.median(times[name])
      cpu_speedup = base_cpu / statistics.median(cpu[name])
      flop_ratio = base_flops / decode_flops(m.cfg, cache_len)
      weight_bytes = nbytes(nnx.state(m, nnx.Param))
      bytes_ratio = base_bytes / weight_bytes
      cache_bytes = nbytes(kv_cache.KVCache.init(m.cfg, batch, cache_len))
      print(
        f'| {name} | {len(m.cfg.pruned_attn)}/{len(m.cfg.pruned_mlp)} | '
        f'{models.num_params(m) / 1e6:.1f}M | {weight_bytes / 2**20:.0f} | '
        f'{cache_bytes / 2**20:.1f} | {statistics.median(tok_s):.1f} ({min(tok_s):.1f}-'
        f'{max(tok_s):.1f}) | {speedup:.2f}x | {cpu_speedup:.2f}x | {flop_ratio:.2f}x | {bytes_ratio:.2f}x | '
        f'{speedup / flop_ratio:.2f} | {speedup / bytes_ratio:.2f} | '
        f'{cpu_speedup / flop_ratio:.2f} |'
      )
  print(f'\n# done {time.strftime("%Y-%m-%d %H:%M:%S")}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
