"""Decode speed of the JAX sampler vs llama.cpp and `transformers.generate` on SmolLM2-135M, same run.

Why it is measured this way: wall times on these shared 2-core VMs swing ~2x (and far more when other
jobs run), so every number that is compared is taken in the same process, interleaved rep by rep:
one JAX generation, then one transformers generation of the same prompts, then a sample of the
machine's limits. The limits are measured here too: streaming-read bandwidth (a jitted `jnp.sum`
over a 512 MiB float32 array, plus a numpy memcpy for reference) bounds batch-1 decoding, which
must read every weight once per token; the `jnp.dot` f32 peak (n=2048) bounds large-batch decoding.

Both sides use float32 weights (JAX: --jax_weights=float32,bfloat16 adds the bf16-weight opt-in,
`sampler.cast_weights`: weight matrices stored in bf16, multiplied as bf16 x bf16 with f32
accumulation, everything else f32; greedy agreement with JAX f32 is printed) dequantized from
the same Q4_1 GGUF (`common.models.loader` for JAX;
transformers' own GGUF loader, which also dequantizes to f32), greedy decoding of exactly
--new_tokens tokens on both sides (JAX gets no stop tokens, transformers min_new_tokens; the run
fails if any row generated another count), ragged chat prompts left-padded. Transformers runs with
every thread count in --torch_threads (default 1 and all cores) and JAX is compared with the
fastest: all cores is what it would use on a quiet machine, 1 thread is faster when other jobs
load the VM.

  python -m benchmarks.decode                         # batch 1 and 16, 64 new tokens, 3 reps
  python -m benchmarks.decode --batches=16 --reps=5 --skip_transformers
  python -m benchmarks.decode --batches=16,32,64 --jax_weights=float32,bfloat16 --skip_transformers \
    --llama_cpp=f32,f16,bf16    # rollouts; batches beyond the 16 prompts repeat them

llama.cpp (benchmarks/llama_cpp_peer.py: its C API through llama-cpp-python, batched greedy decoding
as its `batched` example does, one worker process per configuration) runs the same weights written
by `common.models.gguf_convert` at each precision in --llama_cpp (f32 / f16 / bf16, or q4_1: the
shipped file), at each thread count in --llama_threads, each OpenMP wait policy in --omp_wait
(`default`: libgomp spins between parallel regions, which collapses when other jobs load the cores;
`passive`: it sleeps) and each KV cache type in --llama_kv (f16, llama.cpp's default, or f32, as
the JAX sampler keeps it; "vs llama.cpp f32" compares with the fastest f32-weight configuration,
whatever its cache). Its decode tok/s = batch * (N - 1) / the seconds of the N - 1 steps after
the prefill (which emits the first token). Greedy tokens of each configuration are compared with
JAX's at the same precision class (f32 with f32); with f32 weights on both sides (either llama.cpp
cache) a difference in greedy tokens, like a difference in the number of tokens, makes the run fail
after printing the table.

  pip install --no-deps --target /tmp/llama_peer -r requirements-llama-cpp.txt   # builds llama.cpp
  PYTHONPATH=/tmp/llama_peer python -m benchmarks.decode --llama_cpp=f32,f16 --omp_wait=default,passive

Per rep: JAX prefill seconds come from the sampler's own phase timings (programs compiled ahead, so
no compile is timed); decode tok/s = batch * new_tokens / decode seconds (the loop runs one forward
per token). Transformers: prefill = generate(max_new_tokens=1), decode tok/s = batch * (N - 1) /
(t(N) - t(1)) (the same prefill and set-up cancel). Both sides also report decode CPU seconds of
this process per token (time.process_time, all threads), steadier than wall time under load.
Reported: medians and min-max ranges over reps. Needs
`pip install -r requirements-reference.txt` for the transformers side and
`python -m common.assets fetch smollm2` for the weights.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import cache as cache_lib  # noqa: E402
from common import machine  # noqa: E402
from common.models import gguf_convert  # noqa: E402
from common.models import loader  # noqa: E402
from common.sampling import sampler  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Run:
  """One timed generation of one side."""

  prefill_s: float
  decode_s: float
  decode_cpu_s: float  # this process's CPU seconds (all threads) in the decode phase
  tokens: np.ndarray  # [B, N]
  lengths: np.ndarray  # [B] tokens generated per row (all N: neither side stops early)


PROMPTS = (
  'What is the capital of France?',
  'Write a haiku about the sea.',
  'Explain photosynthesis in one paragraph.',
  'Give me three tips for learning a new language.',
  'What is 17 times 23?',
  'Translate "good morning" into Spanish and German.',
  'Why is the sky blue?',
  'Name five animals that live in the Arctic.',
  'Summarise the plot of Romeo and Juliet.',
  'How do I boil an egg?',
  'What is a prime number? Give two examples.',
  'Suggest a name for a small coffee shop.',
  'What causes the seasons on Earth?',
  'Write one sentence about autumn.',
  'How many legs does a spider have?',
  'What does a compiler do?',
)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--model', default='smollm2')
  p.add_argument('--batches', default='1,16')
  p.add_argument('--new_tokens', type=int, default=64)
  p.add_argument('--reps', type=int, default=3, help='timed reps per batch and implementation')
  p.add_argument(
    '--jax_weights',
    default='float32',
    help='comma-separated JAX variants: weight matrices stored in this dtype, f32 compute '
    '(sampler.cast_weights); each is timed in the same run (transformers stays float32)',
  )
  p.add_argument('--skip_transformers', action='store_true')
  p.add_argument(
    '--torch_threads',
    default=','.join(sorted({'1', str(os.cpu_count() or 1)})),
    help='comma-separated torch thread counts to measure; ratios use the fastest (torch with all '
    'threads collapses when other jobs load the machine, 1 thread does not; JAX always uses all '
    'cores, so measuring only 1 thread would flatter JAX on a quiet machine)',
  )
  p.add_argument(
    '--llama_cpp',
    default='auto',
    help='comma-separated llama.cpp weight precisions (f32, f16, bf16, q4_1 = the shipped file); '
    "'' skips llama.cpp; auto = f32,f16 when llama_cpp imports, else skipped (said in the header)",
  )
  p.add_argument('--llama_threads', default=str(os.cpu_count() or 1), help='comma-separated')
  p.add_argument(
    '--omp_wait',
    default='default,passive',
    help='OpenMP wait policies for llama.cpp (default, passive, active)',
  )
  p.add_argument(
    '--llama_kv',
    default='f16',
    help="comma-separated llama.cpp KV cache types: f16 (llama.cpp's default), f32 (JAX's)",
  )
  p.add_argument('--bw_mib', type=int, default=512, help='array size for the bandwidth probe')
  args = p.parse_args(argv)
  from benchmarks import llama_cpp_peer  # noqa: PLC0415  (numpy only; llama_cpp loads in workers)

  bad_kv = [x for x in args.llama_kv.split(',') if x and x not in llama_cpp_peer.KV_CACHE_TYPES]
  if bad_kv:
    p.error(
      f'--llama_kv: unknown KV cache type {bad_kv[0]!r} ({", ".join(llama_cpp_peer.KV_CACHE_TYPES)})'
    )
  return args


# ---------------------------------------------------------------------------------------------------
# Machine limits.


class Limits:
  """Streaming-read bandwidth and matmul peak, sampled between the timed generations."""

  def __init__(self, mib: int):
    n = mib * 1024 * 1024 // 4
    self.host = np.ones(n, np.float32)
    self.dst = np.empty_like(self.host)
    self.device = jnp.asarray(self.host)
    self.sum = jax.jit(jnp.sum)
    self.sum(self.device).block_until_ready()
    self.read_gbs: list[float] = []
    self.memcpy_gbs: list[float] = []
    self.peak_gflops: list[float] = []
    self.np_read_gbs: dict[int, list[float]] = {1: [], 2: []}  # numpy sum from 1 / 2 threads
    self.pool = concurrent.futures.ThreadPoolExecutor(2)

  def sample(self) -> None:
    for _ in range(3):
      t0 = time.perf_counter()
      self.sum(self.device).block_until_ready()
      self.read_gbs.append(self.host.nbytes / (time.perf_counter() - t0) / 1e9)
      t0 = time.perf_counter()
      np.copyto(self.dst, self.host)
      self.memcpy_gbs.append(2 * self.host.nbytes / (time.perf_counter() - t0) / 1e9)
      for threads in (1, 2):  # numpy's sum releases the GIL, so two threads read two halves at once
        parts = np.array_split(self.host, threads)
        t0 = time.perf_counter()
        list(self.pool.map(np.sum, parts))
        self.np_read_gbs[threads].append(self.host.nbytes / (time.perf_counter() - t0) / 1e9)
    n = 2048
    self.peak_gflops += [2.0 * n**3 / t / 1e9 for t in self.matmul_seconds(n, 3)]

  @staticmethod
  def matmul_seconds(n: int, reps: int) -> list[float]:
    """Wall seconds of `reps` jitted f32 n x n matmuls after one warm-up."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    out = []
    for _ in range(reps):
      t0 = time.perf_counter()
      dot(a, a).block_until_ready()
      out.append(time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------------------------------------
# The two implementations.


class JaxSide:
  def __init__(self, args, prompt_ids, dtype: str = 'float32'):
    jax.config.update('jax_compilation_cache_dir', str(cache_lib.cache_dir('jax_cache')))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
    self.dtype = self.weights = dtype  # the variant's label: the weights' storage dtype
    # f32 compute (activations, KV cache, attention, norms, logits) on every variant; a non-f32
    # variant stores the weight matrices in `dtype` (`sampler.cast_weights`: the bf16 opt-in).
    self.model, self.cfg, self.tok = loader.load_pretrained(args.model)
    if self.weights != 'float32':
      self.model = sampler.cast_weights(self.model, self.weights)
    self.prompt_ids = prompt_ids
    self.config = sampler.SamplingConfig(
      max_new_tokens=args.new_tokens, temperature=0.0, pad_id=self.tok.pad_id or 0
    )
    self.compile_s: dict[int, float] = {}

  def run(self, batch: int):
    """Run: prefill and decode wall and CPU seconds, tokens [B, N], tokens generated per row."""
    timings: dict[str, float] = {}
    out = sampler.generate(
      self.model, self.prompt_ids[:batch], config=self.config, prompt_bucket=16, timings=timings
    )
    self.compile_s.setdefault(batch, timings['compile_s'])
    return Run(
      timings['prefill_s'],
      timings['decode_s'],
      timings['decode_cpu_s'],
      np.asarray(out.tokens),
      np.asarray(out.lengths),
    )


class TorchSide:
  def __init__(self, args, prompt_ids, pad_id, threads: int):
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from common import assets  # noqa: PLC0415

    self.threads = threads
    path = assets.path(args.model)
    self.torch = torch
    self.model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    self.version = f'torch {torch.__version__}, transformers {transformers.__version__}'
    self.prompt_ids, self.pad_id, self.n = prompt_ids, pad_id, args.new_tokens

  def _generate(self, batch: int, n: int):
    rows = self.prompt_ids[:batch]
    width = max(len(r) for r in rows)
    ids = np.full((batch, width), self.pad_id, np.int64)
    mask = np.zeros((batch, width), np.int64)
    for i, r in enumerate(rows):
      ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    self.torch.set_num_threads(self.threads)
    with self.torch.no_grad():
      t0, c0 = time.perf_counter(), time.process_time()
      out = self.model.generate(
        input_ids=self.torch.tensor(ids),
        attention_mask=self.torch.tensor(mask),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=self.pad_id,
      )
      return time.perf_counter() - t0, time.process_time() - c0, out[:, width:].numpy()

  def run(self, batch: int):
    """Decode = generate(N) - generate(1): the same prefill and set-up cancel, N - 1 steps remain."""
    t1, c1, _ = self._generate(batch, 1)
    tn, cn, tokens = self._generate(batch, self.n)
    lengths = np.full(batch, tokens.shape[1])  # min_new_tokens = N: no row stops early
    return Run(t1, tn - t1, cn - c1, tokens, lengths)


def llama_gguf(model: str, precision: str) -> pathlib.Path:
  """The model's GGUF at `precision` for llama.cpp: the shipped file (q4_1) or a cached conversion."""
  source = loader.resolve(model)
  if precision == 'q4_1':
    return source.path
  out = cache_lib.cache_dir('converted', 'llama_cpp') / f'{source.sha256[:16]}-{precision}.gguf'
  if not out.exists():
    gguf_convert.convert(source.path, out, precision)
  return out


class LlamaSide:
  """One llama.cpp configuration (a worker process), timed like the other sides."""

  def __init__(self, precision: str, config):
    from benchmarks import llama_cpp_peer  # noqa: PLC0415

    self.precision = precision
    self.peer = llama_cpp_peer.Peer(config)
    self.label = config.label.replace(os.path.basename(config.gguf), precision)
    self.weight_bytes = os.path.getsize(config.gguf)

  def run(self, prompt_ids, batch: int, n: int) -> Run:
    r = self.peer.generate(prompt_ids[:batch], n)
    tokens = r['tokens']
    return Run(
      r['prefill_s'], r['decode_s'], r['decode_cpu_s'], tokens, np.full(batch, tokens.shape[1])
    )


def _llama_sides(args, prompt_ids, batches) -> tuple[list[LlamaSide], str]:
  """The llama.cpp configurations to time, and a note for the header."""
  precisions = args.llama_cpp
  if precisions == 'auto':
    try:
      import llama_cpp  # noqa: F401, PLC0415
    except ImportError:
      return [], 'llama.cpp: skipped (llama_cpp does not import; see requirements-llama-cpp.txt)'
    precisions = 'f32,f16'
  from benchmarks import llama_cpp_peer  # noqa: PLC0415

  sides = []
  per_seq = max(map(len, prompt_ids)) + args.new_tokens + 8
  for precision in [x for x in precisions.split(',') if x]:
    path = str(llama_gguf(args.model, precision))
    for threads in [int(x) for x in args.llama_threads.split(',') if x]:
      for policy in [x for x in args.omp_wait.split(',') if x]:
        for kv in [x for x in args.llama_kv.split(',') if x]:
          wait = '' if policy == 'default' else policy.upper()
          config = llama_cpp_peer.PeerConfig(path, threads, wait, max(batches), per_seq, kv)
          sides.append(LlamaSide(precision, config))
  version = sides[0].peer.info['version'] if sides else ''
  return sides, f'llama-cpp-python {version}' if sides else 'llama.cpp: none requested'


# ---------------------------------------------------------------------------------------------------


def _record(rec, run: Run, prompt_tokens: int, decode_tokens: int) -> None:
  rec[0].append(prompt_tokens / run.prefill_s)
  rec[1].append(decode_tokens / run.decode_s)
  rec[2].append(run.decode_cpu_s / decode_tokens * 1e3)


def _agreement(jtok: np.ndarray, htok: np.ndarray, stops) -> tuple[int, int, int]:
  """Greedy agreement of two [B, N] token arrays before each row's first JAX stop token.

  Transformers suppresses EOS (min_new_tokens) to force N tokens, so it cannot emit that one.
  Returns (tokens equal in a prefix, tokens compared, rows equal over the whole span).
  """
  same = total = rows = 0
  for j, h in zip(jtok, htok, strict=True):
    end = next((i for i, x in enumerate(j) if int(x) in stops), len(j))
    prefix = int(np.cumprod(j[:end] == h[:end]).sum())
    same, total, rows = same + prefix, total + end, rows + (prefix == end)
  return same, total, rows


def _range(xs, digits=2):
  return f'{min(xs):.{digits}f}-{max(xs):.{digits}f}'


def _med_range(xs, digits=1):
  return f'{statistics.median(xs):.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})'


def main(argv=None) -> int:
  args = parse_args(argv)
  batches = [int(b) for b in args.batches.split(',') if b]
  t0 = time.perf_counter()
  load_start = os.getloadavg()[0]
  jaxes = [JaxSide(args, None, d) for d in args.jax_weights.split(',') if d]
  jx = jaxes[0]
  # Batches beyond the 16 prompts repeat them (the RL regime: prompts x group size); each row is
  # still decoded as its own sequence on every side.
  prompt_ids = [jx.tok.encode_chat([{'role': 'user', 'content': p}]) for p in PROMPTS]
  prompt_ids = [prompt_ids[i % len(prompt_ids)] for i in range(max(batches + [len(PROMPTS)]))]
  for side in jaxes:
    side.prompt_ids = prompt_ids
  pad = jx.tok.pad_id or 0
  torches = []
  if not args.skip_transformers:
    threads = [int(x) for x in args.torch_threads.split(',') if x]
    first = TorchSide(args, prompt_ids, pad, threads[0])
    torches = [first] + [_with_threads(first, t) for t in threads[1:]]
  llamas, llama_note = _llama_sides(args, prompt_ids, batches)
  limits = Limits(args.bw_mib)
  print(f'setup {time.perf_counter() - t0:.1f} s', file=sys.stderr)

  n = args.new_tokens
  params = sum(x.size for x in jax.tree.leaves(nnx.state(jx.model, nnx.Param)))
  weight_bytes = {f'jax-{s.dtype}': jnp.dtype(s.weights).itemsize * params for s in jaxes}
  weight_bytes.update({f'hf{th.threads}': 4 * params for th in torches})
  weight_bytes.update({ls.label: ls.weight_bytes for ls in llamas})
  impls = list(weight_bytes)
  results = {}
  agree = {}  # (JAX dtype, batch) -> (tokens equal to transformers', tokens compared, rows all equal)
  stops = set(jx.tok.stop_ids)
  llama_agree = {}  # (llama.cpp label, batch) -> agreement with JAX float32 over all N tokens
  jax_agree = {}  # (JAX dtype, batch) -> agreement of that weight variant with JAX float32
  counts = {}  # impl -> set of tokens generated per row seen (must be {N}: same work on both sides)
  for b in batches:
    for side in jaxes:
      side.run(b)  # compile (ahead of time inside) + warm-up
    for th in torches:
      th.run(b)  # warm-up
    for ls in llamas:
      ls.run(prompt_ids, b, n)  # warm-up
    # impl -> prefill tok/s, decode tok/s, decode CPU ms per generated token, one entry per rep.
    rec = {impl: ([], [], []) for impl in impls}
    prompt_tokens = sum(len(x) for x in prompt_ids[:b])
    for _ in range(args.reps):
      jruns = {}
      for side in jaxes:
        r = jruns[side.dtype] = side.run(b)
        _record(rec[f'jax-{side.dtype}'], r, prompt_tokens, b * n)  # n forward passes
        counts.setdefault(f'jax-{side.dtype}', set()).update(r.lengths.tolist())
        if side.dtype != 'float32' and 'float32' in jruns and (side.dtype, b) not in jax_agree:
          jax_agree[side.dtype, b] = _agreement(jruns['float32'].tokens, r.tokens, set())
      for th in torches:
        r = th.run(b)
        _record(rec[f'hf{th.threads}'], r, prompt_tokens, b * (n - 1))  # n - 1 forward passes
        counts.setdefault(f'hf{th.threads}', set()).update(r.lengths.tolist())
        for dtype, jr in jruns.items():
          if (dtype, b) not in agree:
            agree[dtype, b] = _agreement(jr.tokens, r.tokens, stops)
      for ls in llamas:
        r = ls.run(prompt_ids, b, n)
        _record(rec[ls.label], r, prompt_tokens, b * (n - 1))  # n - 1 steps after the prefill
        counts.setdefault(ls.label, set()).update(r.lengths.tolist())
        jr = jruns.get('float32')
        if jr is not None and (ls.label, b) not in llama_agree:
          llama_agree[ls.label, b] = _agreement(jr.tokens, r.tokens, set())
      limits.sample()
    results[b] = rec
    print(f'batch {b} done ({time.perf_counter() - t0:.0f} s)', file=sys.stderr)
  unequal = {impl: sorted(c) for impl, c in counts.items() if c != {n}}
  if unequal:
    print(f'error: not every row generated {n} tokens: {unequal}', file=sys.stderr)
    return 1

  read_bw = statistics.median(limits.read_gbs)
  peak = statistics.median(limits.peak_gflops)
  cfg = jx.cfg
  versions = f' vs {torches[0].version} (float32)' if torches else ''
  print(
    f'\nSmolLM2-135M-Instruct decode ({params / 1e6:.1f}M params, f32 weights = '
    f'{4 * params / 2**20:.0f} MiB), greedy, {n} new tokens, chat prompts of '
    f'{min(map(len, prompt_ids))}-{max(map(len, prompt_ids))} tokens; {args.reps} reps, medians '
    f'(min-max). JAX {jax.__version__}{versions}; python '
    f'{platform.python_version()}; {llama_note}; {machine.cpu()}; load average {load_start:.1f} at the '
    f'start, {os.getloadavg()[0]:.1f} at the end (other jobs on the VM).'
  )
  print(
    f'Machine in this run: streaming read {_med_range(limits.read_gbs)} GB/s (jnp.sum, '
    f'{args.bw_mib} MiB), memcpy {_med_range(limits.memcpy_gbs)} GB/s (read+write), jnp.dot f32 '
    f'n=2048 peak {_med_range(limits.peak_gflops)} GFLOP/s; numpy read from 1 thread '
    f'{_med_range(limits.np_read_gbs[1])} GB/s, from 2 threads (one half each) '
    f'{_med_range(limits.np_read_gbs[2])} GB/s.'
  )
  print(
    f'Every row of every run generated exactly {n} tokens on both sides (JAX: no stop tokens; '
    'transformers: min_new_tokens). Decode tok/s counts tokens over the forward passes that made '
    f'them: JAX batch*{n} over {n} loop steps, transformers batch*{n - 1} over t({n}) - t(1).'
  )
  for (dtype, b), (same, total, rows) in agree.items():
    print(
      f'Batch-{b} greedy tokens, JAX {dtype} vs transformers: {same}/{total} equal before each '
      f"row's first JAX stop token; {rows}/{b} rows equal throughout that span."
    )
  for (dtype, b), (same, total, rows) in jax_agree.items():
    print(
      f'Batch-{b} greedy tokens, JAX float32 vs JAX {dtype} weights: {same}/{total} equal (prefix '
      f'of each row up to its first difference); {rows}/{b} rows equal throughout.'
    )
  for (label, b), (same, total, rows) in llama_agree.items():
    print(
      f'Batch-{b} greedy tokens, JAX float32 vs {label}: {same}/{total} equal; {rows}/{b} rows '
      'equal throughout.'
    )
  print(
    '\n| impl | batch | prefill tok/s | decode tok/s | vs best transformers (paired range) '
    '| vs best llama.cpp (paired range) | vs llama.cpp f32 (paired range) | decode CPU ms/token '
    '| CPU-time ratio '
    '| weight read GB/s (/ read bw) | GFLOP/s (/ dot peak) |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  flops_per_token = 2 * params + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 64
  for b in batches:
    hfs = [i for i in impls if i.startswith('hf')]
    best = max(hfs, key=lambda i: statistics.median(results[b][i][1]), default=None)
    cpu_best = min((statistics.median(results[b][i][2]) for i in hfs), default=None)
    lls = [i for i in impls if i.startswith('llama.cpp')]
    best_ll = max(lls, key=lambda i: statistics.median(results[b][i][1]), default=None)
    f32s = [i for i in lls if i.startswith('llama.cpp f32')]
    best_f32 = max(f32s, key=lambda i: statistics.median(results[b][i][1]), default=None)
    for impl in impls:
      pre, dec, cpu = results[b][impl]
      med = statistics.median(dec)
      ratio = ll_ratio = f32_ratio = cpu_ratio = ''
      if impl.startswith('jax') and best:
        paired = [j / h for j, h in zip(dec, results[b][best][1], strict=True)]
        ratio = f'**{med / statistics.median(results[b][best][1]):.2f}x** ({_range(paired)})'
        cpu_ratio = f'{cpu_best / statistics.median(cpu):.2f}x'
      if impl.startswith('jax') and best_ll:
        paired = [j / h for j, h in zip(dec, results[b][best_ll][1], strict=True)]
        ll_ratio = f'**{med / statistics.median(results[b][best_ll][1]):.2f}x** ({_range(paired)})'
      if impl.startswith('jax') and best_f32:
        paired = [j / h for j, h in zip(dec, results[b][best_f32][1], strict=True)]
        f32_ratio = f'{med / statistics.median(results[b][best_f32][1]):.2f}x ({_range(paired)})'
      gbs = weight_bytes[impl] * med / b / 1e9  # one weight read per forward pass
      gflops = flops_per_token * med / 1e9
      if impl.startswith('jax'):
        name = f'JAX (common.sampling), {impl[4:]} weights' + (
          '' if impl == 'jax-float32' else ', f32 compute'
        )
      elif impl.startswith('hf'):
        name = f'transformers.generate, {impl[2:]} thr'
      else:
        name = impl
      print(
        f'| {name} | {b} | {_med_range(pre)} | {_med_range(dec)} | {ratio} | {ll_ratio} | {f32_ratio} '
        f'| {_med_range(cpu, 2)} | {cpu_ratio} '
        f'| {gbs:.1f} ({gbs / read_bw:.2f}) | {gflops:.1f} ({gflops / peak:.2f}) |'
      )
  print(
    '\nvs best transformers: JAX decode tok/s median over the fastest transformers thread count '
    "(by median), range of the per-rep ratios. CPU-time ratio: the transformers side's lowest "
    "median CPU ms/token over JAX's (CPU seconds of this process, all threads: steadier than wall "
    'time under other jobs, but blind to how many cores each side keeps busy).'
  )
  compile_s = {s.dtype: s.compile_s for s in jaxes}
  print(f'\nJAX compile s per batch (not timed above): {compile_s}', file=sys.stderr)
  for ls in llamas:
    ls.peer.close()
  f32_mismatch = {
    k: v for k, v in llama_agree.items() if k[0].startswith('llama.cpp f32') and v[0] != v[1]
  }
  if f32_mismatch:
    print(
      f'error: greedy tokens differ at f32 (equal, compared, rows): {f32_mismatch}', file=sys.stderr
    )
    return 1
  return 0


def _with_threads(side: TorchSide, threads: int) -> TorchSide:
  """The same loaded transformers model, run with another torch thread count."""
  other = object.__new__(TorchSide)
  other.__dict__.update(side.__dict__)
  other.threads = threads
  return other


if __name__ == '__main__':
  sys.exit(main())
