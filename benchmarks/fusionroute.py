"""Decode speed of FusionRoute (router + n experts, per-token routing) vs one model of the same size.

    python -m benchmarks.fusionroute                       # d_model 256, 4 layers, batch 8, 64 tokens
    python -m benchmarks.fusionroute --d_model=512 --layers=8 --batch=1 --reps=7

The issue's goal (#20 item 8): FusionRoute with n = 3 experts costs at most n + 1 = 4 times a
single model's decode, i.e. no overhead beyond the extra forwards (the router LM and every expert
read each generated token, projects/fusionroute/models.py; the paper runs only the selected expert,
which needs the lazy cache catch-up we do not implement).

What is timed, in one process, interleaved rep by rep so that load changes on the shared machine
hit every arm alike: greedy generation of exactly --new_tokens tokens (no stop token can fire) for
--batch prompts of --prompt_len tokens, programs compiled before timing, wall time per call
including the prefill (short prompts: the prefill is a small share). Arms:
  single        common.sampling.sampler.generate on one decoder (the shared decode loop);
  fusionroute1  models.generate with the router and 1 expert (2 forwards per token);
  fusionroute3  models.generate with the router and 3 experts (4 forwards per token).
All models have the same shapes and random weights (speed does not depend on the weights).
Printed: decode tokens/s (batch * new_tokens / seconds) median and min-max over --reps, and the
median of the per-rep time ratios to `single`, against the goal n + 1.
"""

from __future__ import annotations

import argparse
import statistics
import time

from flax import nnx
import jax
import numpy as np

from common import sharding
from common.models import decoder
from common.sampling import sampler
from projects.fusionroute import models


def _config(args) -> decoder.DecoderConfig:
  return decoder.DecoderConfig(
    vocab_size=args.vocab,
    d_model=args.d_model,
    num_layers=args.layers,
    num_heads=args.heads,
    num_kv_heads=args.heads,
    head_dim=args.d_model // args.heads,
    mlp_dim=4 * args.d_model,
  )


def _fusionroute(cfg: decoder.DecoderConfig, n: int) -> models.FusionRoute:
  with sharding.unsharded():
    lm = decoder.Decoder(cfg, rngs=nnx.Rngs(0))
    router = models.Router(lm, n, rngs=nnx.Rngs(1))
    experts = [decoder.Decoder(cfg, rngs=nnx.Rngs(2 + i)) for i in range(n)]
    return models.FusionRoute(router, experts)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--d_model', type=int, default=256)
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--vocab', type=int, default=4096)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--prompt_len', type=int, default=16)
  p.add_argument('--new_tokens', type=int, default=64)
  p.add_argument('--reps', type=int, default=5)
  args = p.parse_args(argv)

  cfg = _config(args)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, args.vocab, (args.batch, args.prompt_len)).astype(np.int32)
  mask = np.ones_like(prompts, bool)
  with sharding.unsharded():
    single = decoder.Decoder(cfg, rngs=nnx.Rngs(0))
  fr = {n: _fusionroute(cfg, n) for n in (1, 3)}
  scfg = sampler.SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, pad_id=0)

  def run_single():
    with sharding.unsharded():
      gen = sampler.generate(single, prompts, prompt_mask=mask, config=scfg)
    return jax.block_until_ready(gen.tokens)

  def run_fr(n):
    mix = models.fusionroute(args.batch, n)
    gen = models.generate(
      fr[n], prompts, mix, prompt_mask=mask, max_new_tokens=args.new_tokens, eos_id=-1
    )
    return jax.block_until_ready(gen.tokens)

  arms = {
    'single': run_single,
    'fusionroute1': lambda: run_fr(1),
    'fusionroute3': lambda: run_fr(3),
  }
  for name, fn in arms.items():  # compile (and check the token count) before timing
    toks = np.asarray(fn())
    if toks.shape != (args.batch, args.new_tokens):
      raise SystemExit(f'{name} generated {toks.shape}, expected {(args.batch, args.new_tokens)}')
  times = {name: [] for name in arms}
  for _ in range(args.reps):
    for name, fn in arms.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)

  tokens = args.batch * args.new_tokens
  print(
    f'FusionRoute decode, {jax.devices()[0].platform}: d_model {args.d_model}, {args.layers} '
    f'layers, vocab {args.vocab}, batch {args.batch}, prompt {args.prompt_len}, '
    f'{args.new_tokens} new tokens, {args.reps} reps'
  )
  forwards = {'single': 1, 'fusionroute1': 2, 'fusionroute3': 4}
  for name, ts in times.items():
    tps = [tokens / t for t in ts]
    ratios = [t / s for t, s in zip(ts, times['single'], strict=True)]
    print(
      f'  {name:13s} {statistics.median(tps):9.1f} tok/s (range {min(tps):.1f}-{max(tps):.1f})  '
      f'time / single: median {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-'
      f'{max(ratios):.2f}), goal <= {forwards[name]}x (forwards per token)'
    )


if __name__ == '__main__':
  main()
