"""llama.cpp as a decode peer: batched greedy generation through llama-cpp-python's C API.

The tool researchers pick to run a GGUF model on a CPU is llama.cpp, so `benchmarks/decode.py`
compares the JAX sampler with it on the same weights (`common.models.gguf_convert` writes the
shipped GGUF as f32 / f16 / bf16). llama-cpp-python's `Llama` class decodes one sequence at a
time; batched decoding (the RL regime: prompts x group size) needs its low-level API, which is what
llama.cpp's own `batched` example does: one `llama_decode` of every prompt's tokens (each prompt its
own sequence id, logits only at its last token), then one `llama_decode` per step with one token
per sequence, the greedy token taken as the first argmax of each row's logits (as the JAX sampler).

Each llama.cpp configuration runs in its own worker process, driven over stdin/stdout (one JSON
request and reply per line): OpenMP reads OMP_WAIT_POLICY once, when the library starts, so the
default (spinning) and PASSIVE wait policies cannot share a process; and the parent keeps its own
threads for JAX. The parent interleaves requests with JAX runs, so every ratio is paired.

Install (not part of requirements.txt; the build compiles llama.cpp with cmake):
see requirements-llama-cpp.txt.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

KV_CACHE_TYPES = {'f32': 0, 'f16': 1}  # ggml_type values (GGML_TYPE_F32, GGML_TYPE_F16)


@dataclasses.dataclass(frozen=True)
class PeerConfig:
  """One llama.cpp configuration: weights file, threads, OpenMP wait policy ('' = its default), and
  the KV cache's type: 'f16' is llama.cpp's default (half the attention reads of an f32 cache, and
  not the JAX sampler's f32 cache), 'f32' makes an f32-weight run f32 throughout."""

  gguf: str
  threads: int
  wait_policy: str = ''
  max_batch: int = 16
  max_tokens_per_seq: int = 256  # prompt + new tokens, per sequence
  kv_cache: str = 'f16'

  def __post_init__(self):
    if self.kv_cache not in KV_CACHE_TYPES:
      raise ValueError(f'kv_cache must be one of {sorted(KV_CACHE_TYPES)}, got {self.kv_cache!r}')

  @property
  def label(self) -> str:
    policy = self.wait_policy.lower() or 'default'
    name = os.path.basename(self.gguf)
    return f'llama.cpp {name}, KV {self.kv_cache}, {self.threads} thr, OMP {policy}'


class Peer:
  """The parent's handle on one worker process."""

  def __init__(self, config: PeerConfig):
    self.config = config
    env = dict(os.environ)
    env.pop('OMP_WAIT_POLICY', None)
    if config.wait_policy:
      env['OMP_WAIT_POLICY'] = config.wait_policy
    self.proc = subprocess.Popen(
      [sys.executable, '-m', 'benchmarks.llama_cpp_peer'],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      env=env,
      text=True,
    )
    self.info = self._call(dataclasses.asdict(config))

  def _call(self, request: dict) -> dict:
    self.proc.stdin.write(json.dumps(request) + '\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      rc = self.proc.wait()
      how = f'was killed by {signal.Signals(-rc).name}' if rc < 0 else f'exited with {rc}'
      raise RuntimeError(f'{self.config.label}: the llama.cpp worker {how}')
    reply = json.loads(line)
    if 'error' in reply:
      raise RuntimeError(f'{self.config.label}: {reply["error"]}')
    return reply

  def generate(self, prompts: list[list[int]], new_tokens: int) -> dict:
    """{'prefill_s', 'decode_s', 'decode_cpu_s', 'tokens' [B, N] int array}."""
    reply = self._call({'prompts': [list(map(int, p)) for p in prompts], 'n': new_tokens})
    reply['tokens'] = np.asarray(reply['tokens'], np.int64)
    return reply

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------------
# The worker process.


class _Engine:
  """A loaded model and one context sized for max_batch sequences."""

  def __init__(self, config: PeerConfig):
    import llama_cpp  # noqa: PLC0415
    from llama_cpp import _logger  # noqa: PLC0415

    _logger.set_verbose(False)
    self.ll = ll = llama_cpp
    ll.llama_backend_init()
    mparams = ll.llama_model_default_params()
    mparams.n_gpu_layers = 0
    self.model = ll.llama_model_load_from_file(config.gguf.encode(), mparams)
    if not self.model:
      raise RuntimeError(f'llama.cpp could not load {config.gguf}')
    self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
    cparams = ll.llama_context_default_params()
    per_seq = -(-config.max_tokens_per_seq // 256) * 256
    cparams.n_seq_max = config.max_batch
    cparams.n_ctx = per_seq * config.max_batch
    cparams.n_batch = cparams.n_ubatch = max(512, config.max_batch * config.max_tokens_per_seq)
    cparams.n_threads = cparams.n_threads_batch = config.threads
    cparams.type_k = cparams.type_v = KV_CACHE_TYPES[config.kv_cache]
    cparams.no_perf = True
    self.ctx = ll.llama_init_from_model(self.model, cparams)
    if not self.ctx:
      raise RuntimeError('llama.cpp could not create a context')
    self.batch = ll.llama_batch_init(cparams.n_batch, 0, 1)
    self.version = ll.__version__

  def _fill(self, items) -> None:
    """items: (token, position, sequence, wants logits) tuples -> the batch."""
    b = self.batch
    for k, (tok, pos, seq, logits) in enumerate(items):
      b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = tok, pos, 1, logits
      b.seq_id[k][0] = seq
    b.n_tokens = len(items)

  def _decode(self) -> None:
    rc = self.ll.llama_decode(self.ctx, self.batch)
    if rc != 0:
      raise RuntimeError(f'llama_decode returned {rc}')

  def _argmax(self, index: int) -> int:
    logits = np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, index), (self.n_vocab,))
    return int(np.argmax(logits))

  def generate(self, prompts: list[list[int]], n: int) -> dict:
    ll = self.ll
    ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
    items, last = [], []
    for s, p in enumerate(prompts):
      items += [(t, j, s, j == len(p) - 1) for j, t in enumerate(p)]
      last.append(len(items) - 1)
    t0 = time.perf_counter()
    self._fill(items)
    self._decode()
    nxt = [self._argmax(i) for i in last]
    t1, c1 = time.perf_counter(), time.process_time()  # CPU seconds of this process, all threads
    out = [nxt]
    for step in range(n - 1):
      self._fill([(nxt[s], len(p) + step, s, True) for s, p in enumerate(prompts)])
      self._decode()
      nxt = [self._argmax(s) for s in range(len(prompts))]
      out.append(nxt)
    t2, c2 = time.perf_counter(), time.process_time()
    return {
      'prefill_s': t1 - t0,
      'decode_s': t2 - t1,
      'decode_cpu_s': c2 - c1,
      'tokens': np.asarray(out, np.int64).T.tolist(),
    }


def _worker() -> int:
  engine = None
  for line in sys.stdin:
    request = json.loads(line)
    try:
      if engine is None:
        engine = _Engine(PeerConfig(**request))
        reply = {'version': engine.version, 'n_vocab': engine.n_vocab}
      else:
        reply = engine.generate(request['prompts'], request['n'])
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
      reply = {'error': f'{type(e).__name__}: {e}'}
    sys.stdout.write(json.dumps(reply) + '\n')
    sys.stdout.flush()
  return 0


if __name__ == '__main__':
  sys.exit(_worker())
