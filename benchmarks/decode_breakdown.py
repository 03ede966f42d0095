"""Where a decode step's time goes: SmolLM2 one-token steps split into their parts, same run.

Each part runs as a jitted `fori_loop` of --steps iterations (so per-call dispatch is amortised, as
in the sampler's `while_loop`) and is timed interleaved with the others, rep by rep, because the
shared VM's speed swings ~2x within minutes:

  step        model(token, cache) + the sampler's greedy sampling step: what one loop body costs
  layers      the 30 transformer layers with the KV-cache write and read (hidden_states)
  no_attn     layers with the attention over the cache replaced by passing q through: the
              difference to `layers` is the single-query attention (scores, softmax, values)
  head        the tied LM head (hidden -> [B, 49152] f32 logits, padded entries masked)
  sample      log-softmax, argmax, chosen log-prob and entropy over the [B, V] logits

  python -m benchmarks.decode_breakdown --batches=1,16 --reps=5

Prints medians and min-max per part and batch, in wall and in CPU milliseconds (all threads). `python -m common.assets fetch smollm2` first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import cache as cache_lib  # noqa: E402
from common import machine  # noqa: E402
from common.models import decoder  # noqa: E402
from common.models import loader  # noqa: E402
from common.sampling import kv_cache  # noqa: E402
from common.sampling import sampler  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--model', default='smollm2')
  p.add_argument('--batches', default='1,16')
  p.add_argument('--cache_len', type=int, default=112, help='KV slots (prompt bucket + new tokens)')
  p.add_argument('--steps', type=int, default=16, help='loop iterations per timed call')
  p.add_argument('--reps', type=int, default=5)
  return p.parse_args(argv)


def _no_attention(q, kt, v, mask, *, scale, softcap=None):
  del kt, v, mask, scale, softcap
  return q


def _parts(graphdef, cfg, steps: int):
  """{name: jitted f(state, tokens, cache, hidden, logits)} running `steps` iterations."""
  greedy = sampler._Static(  # noqa: SLF001 (the sampler's own step, as its loop runs it)
    max_new_tokens=1,
    top_k=None,
    top_p=None,
    stop_tokens=(),
    stop_sequences=(),
    pad_id=0,
    greedy=True,
    num_samples=1,
  )

  def loop(body, init):
    return jax.lax.fori_loop(0, steps, body, init)

  def step(state, tok, cache, h, logits):
    m = nnx.merge(graphdef, state)

    def body(i, c):
      tok, cache = c
      out, cache = m(tok, cache=cache)
      nxt = sampler._sample_step(out[:, 0], None, None, i, greedy)[0]  # noqa: SLF001
      return nxt[:, None], cache

    return loop(body, (tok, cache))

  def layers(state, tok, cache, h, logits):
    m = nnx.merge(graphdef, state)

    def body(i, c):
      tok, cache = c
      out, cache = m.hidden_states(tok, cache=cache)
      return tok + (out[:, :, 0] > 1e9).astype(jnp.int32), cache

    return loop(body, (tok, cache))

  def head(state, tok, cache, h, logits):
    m = nnx.merge(graphdef, state)

    def body(i, h):
      return h + m.logits_from_hidden(h)[:, :, : h.shape[-1]] * 1e-9

    return loop(body, h)

  def sample(state, tok, cache, h, logits):
    def body(i, x):
      t = sampler._sample_step(x, None, None, i, greedy)  # noqa: SLF001
      return x + (t[1] * 1e-9)[:, None]

    return loop(body, logits)

  def no_attn(*args):
    # A function object of its own: jax caches traces by function, so jitting `layers` again would
    # reuse the trace made with the real attention and time the same program twice.
    return layers(*args)

  return {'step': step, 'layers': layers, 'no_attn': no_attn, 'head': head, 'sample': sample}


def main(argv=None) -> int:
  args = parse_args(argv)
  jax.config.update('jax_compilation_cache_dir', str(cache_lib.cache_dir('jax_cache')))
  model, cfg, _ = loader.load_pretrained(args.model)
  graphdef, state = nnx.split(model)
  load = os.getloadavg()[0]
  rows = []
  for b in [int(x) for x in args.batches.split(',') if x]:
    cache = kv_cache.KVCache.init(cfg, b, args.cache_len)
    inputs = (
      jnp.ones((b, 1), jnp.int32),
      cache,
      jnp.ones((b, 1, cfg.d_model), jnp.float32),
      jax.random.normal(jax.random.key(0), (b, cfg.padded_vocab)),
    )
    compiled = {}
    for name, fn in _parts(graphdef, cfg, args.steps).items():
      original = decoder.head_major_attention
      if name == 'no_attn':
        decoder.head_major_attention = _no_attention
      try:
        compiled[name] = jax.jit(fn).lower(state, *inputs).compile()
      finally:
        decoder.head_major_attention = original
      jax.block_until_ready(compiled[name](state, *inputs))
    times = {name: [] for name in compiled}
    cpu = {name: [] for name in compiled}
    for _ in range(args.reps):
      for name, fn in compiled.items():
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(state, *inputs))
        times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
        cpu[name].append((time.process_time() - c0) / args.steps * 1e3)
    rows.append((b, times, cpu))
    print(f'batch {b} done', file=sys.stderr)
  print(
    f'\nSmolLM2 decode step parts, ms per step: median (min-max) over {args.reps} reps of '
    f'{args.steps} steps; KV cache of {args.cache_len} slots; load average {load:.1f} at the '
    f'start, {os.getloadavg()[0]:.1f} at the end; {machine.cpu()}.\n'
  )
  names = list(rows[0][1])
  print('| batch | clock | ' + ' | '.join(names) + ' | attention (layers - no_attn) |')
  print('|---' * (len(names) + 3) + '|')
  for b, times, cpu in rows:
    for clock, t in (('wall', times), ('CPU', cpu)):
      cells = [f'{statistics.median(x):.1f} ({min(x):.1f}-{max(x):.1f})' for x in t.values()]
      attn = statistics.median(t['layers']) - statistics.median(t['no_attn'])
      print(f'| {b} | {clock} | ' + ' | '.join(cells) + f' | {attn:.1f} |')
  print(
    '\nCPU: this process\'s CPU milliseconds per step (time.process_time, all threads), steadier '
    'than wall time when other jobs share the cores.'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
