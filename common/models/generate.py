"""Chat with (or continue text from) a pretrained LM from the command line.

  python -m common.models.generate --model=smollm2 --prompt="What is the capital of France?"
  python -m common.models.generate --model=smollm2 --stream --prompt="Tell me a story."
  python -m common.models.generate --model=smollm2 --chat --system="You are terse."
  python -m common.models.generate --model=smollm2 --batch_file=prompts.txt --temperature=0.7 --top_p=0.9
  python -m common.models.generate --model=gemma3_270m --raw --prompt="The old lighthouse keeper"
  python -m common.models.generate --workdir=/tmp/lm_pretrain_smoke --raw --prompt="The data set"

Chat mode (the default) wraps each prompt in the model's own chat template (`tokenizer.encode_chat`)
and stops at its end-of-turn tokens; `--raw` feeds the text as is (base models such as Gemma-3-270M
have no template, so they default to raw). Greedy unless --temperature > 0. `--batch_file` holds one
prompt per line, generated as one ragged batch. The weights come from `common.models.loader` (fetch
them first: `python -m common.assets fetch smollm2`); sampling from `common.sampling.sampler`.
`--workdir=RUN` instead chats with a model trained in this repo: the run's model.json and newest
checkpoint (`common.models.spec.load_model`; LoRA adapters merged), its context from model.json.

`--stream` prints the reply as it is decoded (`sampler.generate_chunks`: the same decode loop,
stopped every --stream_chunk tokens with its cache carried), so it prints exactly what the run
without --stream prints, for greedy decoding and for sampling with the same --seed. Text is written
only once it decodes cleanly: a multi-byte character split over several tokens waits for its last
byte.

`--chat` is an interactive conversation: one user turn per line of stdin (EOF or an empty line ends
it). Each turn renders the whole conversation with the chat template, but prefills only the tokens
the KV cache does not already hold: the cache keeps the history and the reply (the decode loop feeds
every generated token back), so a turn costs the template's tail after the reply plus the new user
turn. Where the re-rendered history differs from what the model generated (a reply that does not
re-tokenise to its own tokens, a template that rewrites old turns), the cache is cut back to the
common prefix and the rest re-prefilled, so every reply is exactly what generating from the full
templated history gives. The cache starts small and doubles as the conversation grows (decode
attention reads every slot of it), up to the model's context; a turn that would exceed the context
(or --cache_len) is one line on stderr and ends the conversation (exit 2). Sampling in --chat uses
the key fold_in(key(--seed), turn).

A reply that stops at --max_new_tokens rather than at an end-of-turn token is flagged by a line
` [... stopped at --max_new_tokens=N]` on stderr, in every mode.

Prints each reply, then prefill and decode tokens/s (--chat: per turn, with the new and cached
token counts). Compilation is reported separately: the first run of a shape compiles for tens of
seconds on 2 CPU cores, later runs read the persistent compilation cache (under
~/.cache/meta-jax-monorepo/jax_cache, as the tests use).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import os
import pathlib
import sys
from typing import TextIO

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import cache  # noqa: E402
from common import errors  # noqa: E402
from common.models import loader  # noqa: E402
from common.models import spec  # noqa: E402
from common.sampling import kv_cache  # noqa: E402
from common.sampling import sampler  # noqa: E402

# Prompt lengths are padded to a multiple of this (sampler.generate's prompt_bucket).
_BUCKET = 16
# --chat: the smallest cache, and the limit when the GGUF does not give the model's context.
_MIN_CACHE = 256
_DEFAULT_CACHE_LIMIT = 4096


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--model', default='smollm2', help='asset name, alias or GGUF path')
  p.add_argument('--workdir', default=None, help="a run's directory (model.json): its newest model")
  p.add_argument('--prompt', action='append', default=[], help='a prompt (repeat for a batch)')
  p.add_argument('--batch_file', default=None, help='a file with one prompt per line')
  p.add_argument('--system', default=None, help='system message (chat template)')
  p.add_argument('--raw', action='store_true', help='no chat template: continue the text')
  p.add_argument('--stream', action='store_true', help='print the reply as it is decoded')
  p.add_argument(
    '--stream_chunk', type=int, default=4, help='--stream: tokens decoded between prints'
  )
  p.add_argument(
    '--chat',
    action='store_true',
    help='multi-turn conversation: one user turn per stdin line (EOF or an empty line ends it)',
  )
  p.add_argument(
    '--cache_len',
    type=int,
    default=None,
    help="--chat: the most KV-cache slots to hold (default: the model's context + 16)",
  )
  p.add_argument('--max_new_tokens', type=int, default=256)
  p.add_argument('--temperature', type=float, default=0.0, help='0 = greedy')
  p.add_argument('--top_p', type=float, default=None)
  p.add_argument('--top_k', type=int, default=None)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--dtype', default='float32', help='compute dtype (weights stay float32)')
  p.add_argument('--show_entropy', action='store_true', help='print per-token model entropies')
  return p.parse_args(argv)


_DTYPES = ('float32', 'bfloat16')


def _enable_compilation_cache() -> None:
  """The persistent cache (unless the environment already chose one, as the tests do)."""
  if jax.config.jax_compilation_cache_dir:
    return
  jax.config.update('jax_compilation_cache_dir', str(cache.cache_dir('jax_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def _context_length(args: argparse.Namespace) -> int | None:
  """The model's context: the run's (model.json) with --workdir, else the GGUF's."""
  if args.workdir:
    return spec.read(args.workdir).context_length
  return loader.context_length(args.model)


def check_args(args: argparse.Namespace) -> None:
  """Flag values the sampler would reject deep inside, as one line each."""
  if args.max_new_tokens < 1:
    raise errors.UserError(f'--max_new_tokens must be >= 1, got {args.max_new_tokens}')
  if args.top_k is not None and args.top_k < 1:
    raise errors.UserError(f'--top_k must be >= 1, got {args.top_k}')
  if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
    raise errors.UserError(f'--top_p must be in (0, 1], got {args.top_p}')
  if args.dtype not in _DTYPES:
    raise errors.UserError(f'--dtype must be one of {", ".join(_DTYPES)}, got {args.dtype!r}')
  if (args.top_k is not None or args.top_p is not None) and args.temperature <= 0:
    raise errors.UserError('--top_k/--top_p need --temperature > 0 (temperature 0 is greedy)')
  if args.stream_chunk < 1:
    raise errors.UserError(f'--stream_chunk must be >= 1, got {args.stream_chunk}')
  if args.chat and (args.prompt or args.batch_file or args.raw):
    raise errors.UserError(
      '--chat reads the user turns from stdin: drop --prompt/--batch_file/--raw'
    )
  if args.cache_len is not None and not args.chat:
    raise errors.UserError('--cache_len applies to --chat only')
  if args.cache_len is not None and args.cache_len < 1:
    raise errors.UserError(f'--cache_len must be >= 1, got {args.cache_len}')


def check_lengths(ids: list[list[int]], max_new_tokens: int, context: int | None) -> None:
  """Every prompt has a token, and prompt + reply fit the model's context (the KV cache is
  allocated for that many positions up front: 10^8 new tokens would ask for ~77 GB)."""
  empty = [i for i, x in enumerate(ids) if not x]
  if empty:
    raise errors.UserError(f'prompt {empty[0]} is empty: nothing to continue (give some text)')
  longest = max(len(x) for x in ids)
  if context is not None and longest + max_new_tokens > context:
    raise errors.UserError(
      f'the longest prompt ({longest} tokens) plus --max_new_tokens={max_new_tokens} exceeds the '
      f"model's context of {context} tokens; use --max_new_tokens <= {max(context - longest, 0)}"
    )


def read_prompts(args: argparse.Namespace) -> list[str]:
  prompts = list(args.prompt)
  if args.batch_file:
    path = pathlib.Path(args.batch_file)
    if not path.is_file():
      raise errors.UserError(f'--batch_file {path} does not exist')
    prompts += [line.rstrip('\n') for line in path.read_text().splitlines() if line.strip()]
  if not prompts:
    raise errors.UserError('give --prompt="..." or --batch_file=FILE (one prompt per line)')
  if args.stream and len(prompts) > 1:
    raise errors.UserError(
      f'--stream prints one reply as it is decoded: give one prompt, not {len(prompts)}'
    )
  return prompts


def encode(tokenizer, prompts: list[str], *, raw: bool, system: str | None) -> list[list[int]]:
  if raw:
    return [tokenizer.encode(p) for p in prompts]
  prefix = [{'role': 'system', 'content': system}] if system else []
  return [tokenizer.encode_chat([*prefix, {'role': 'user', 'content': p}]) for p in prompts]


def sampling_config(args: argparse.Namespace, tokenizer) -> sampler.SamplingConfig:
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  stops = tuple(tokenizer.stop_ids) or ((tokenizer.eos_id,) if tokenizer.eos_id is not None else ())
  return sampler.SamplingConfig(
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    stop_tokens=stops,
    pad_id=pad,
  )


def stopped_marker(max_new_tokens: int, row: int | None = None) -> str:
  """The stderr line after a reply that ran out of tokens before an end-of-turn token."""
  which = '' if row is None else f'[{row}] '
  return f' [... {which}stopped at --max_new_tokens={max_new_tokens}]'


class TextStream:
  """Writes a reply as its tokens arrive; in total exactly `tokenizer.decode(tokens)` (stripped of
  surrounding whitespace with strip=True), so streamed output equals the non-streamed.

  Each update decodes the reply so far and writes what is new, except text that may still change:
  trailing U+FFFD (the first bytes of a multi-byte character whose last byte is yet to come, as
  byte-level BPE and byte-fallback pieces split them) and, with strip, trailing whitespace (written
  once text follows it). Byte-level decoding is otherwise append-only (UTF-8 resynchronises after
  every complete or invalid sequence), so written text never has to be taken back.
  """

  def __init__(self, tokenizer, out: TextIO, *, strip: bool):
    self.tokenizer, self.out, self.strip = tokenizer, out, strip
    self.written = ''

  def update(self, tokens, *, final: bool = False) -> None:
    text = self.tokenizer.decode(np.asarray(tokens), skip_special=True)
    if self.strip:
      text = text.strip() if final else text.lstrip()
    while not final:
      held = text.rstrip('\ufffd')
      held = held.rstrip() if self.strip else held
      if held == text:
        break
      text = held
    if text.startswith(self.written):  # Always, for append-only decoding (see the docstring).
      self.out.write(text[len(self.written) :])
      self.out.flush()
      self.written = text

  def finish(self, tokens) -> None:
    self.update(tokens, final=True)
    self.out.write('\n')
    self.out.flush()


def _generate(
  model,
  ids: list[list[int]],
  *,
  config: sampler.SamplingConfig,
  key,
  timings: dict[str, float],
  stream: TextStream | None,
  stream_chunk: int,
  cache: kv_cache.KVCache | None = None,
) -> sampler.Generation:
  """sampler.generate; with a stream (one row), writes the reply as `generate_chunks` decodes it."""
  kw = dict(
    config=config,
    key=key,
    cache=cache,
    prompt_bucket=_BUCKET,
    return_cache=cache is not None,
    timings=timings,
  )
  if stream is None:
    return sampler.generate(model, ids, **kw)
  for gen in sampler.generate_chunks(model, ids, chunk=stream_chunk, **kw):
    stream.update(np.asarray(gen.tokens[0, : int(gen.lengths[0])]))
  stream.finish(np.asarray(gen.tokens[0, : int(gen.lengths[0])]))
  return gen


def _print_entropies(tokenizer, tokens: np.ndarray, entropies: np.ndarray) -> None:
  pieces = [tokenizer.decode([t], skip_special=False) for t in tokens]
  print('  ' + ' '.join(f'{p!r}:{e:.2f}' for p, e in zip(pieces, entropies, strict=True)))


def _flag_if_stopped(done, max_new_tokens: int, row: int | None = None) -> None:
  if not bool(done):
    sys.stdout.flush()  # The marker follows its reply on a terminal.
    print(stopped_marker(max_new_tokens, row), file=sys.stderr, flush=True)


def _speed(n_prefill: int, n_decode: int, timings: dict[str, float]) -> str:
  return (
    f'prefill {n_prefill} tokens in {timings["prefill_s"]:.2f} s '
    f'({n_prefill / timings["prefill_s"]:.1f} tok/s); decode {n_decode} tokens in '
    f'{timings["decode_s"]:.2f} s ({n_decode / timings["decode_s"]:.1f} tok/s); '
    f'compile {timings["compile_s"]:.1f} s'
  )


def run_prompts(args: argparse.Namespace, model, tokenizer, prompts: list[str]) -> int:
  """One-shot: every prompt (one ragged batch), replies printed in order."""
  raw = args.raw or tokenizer.chat_template is None
  if raw and not args.raw:
    shown = args.workdir or args.model
    print(f'note: {shown} has no chat template; continuing the raw text', file=sys.stderr)
  ids = encode(tokenizer, prompts, raw=raw, system=args.system)
  try:
    check_lengths(ids, args.max_new_tokens, _context_length(args))
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  stream = None
  if args.stream:
    stream = TextStream(tokenizer, sys.stdout, strip=not raw)
    if raw:
      sys.stdout.write(prompts[0])
      sys.stdout.flush()
  timings: dict[str, float] = {}
  out = _generate(
    model,
    ids,
    config=sampling_config(args, tokenizer),
    key=None if args.temperature <= 0 else jax.random.key(args.seed),
    timings=timings,
    stream=stream,
    stream_chunk=args.stream_chunk,
  )
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  for i, prompt in enumerate(prompts):
    if stream is None:
      reply = tokenizer.decode(tokens[i, : lengths[i]], skip_special=True)
      if len(prompts) > 1:
        print(f'=== [{i}] {prompt}')
      print(reply.strip() if not raw else prompt + reply)
    _flag_if_stopped(out.done[i], args.max_new_tokens, i if len(prompts) > 1 else None)
    if args.show_entropy:
      ent = np.asarray(out.model_entropies[i, : lengths[i]])
      _print_entropies(tokenizer, tokens[i, : lengths[i]], ent)
  n_prompt, n_new = sum(len(x) for x in ids), int(lengths.sum())
  print(f'\n[{len(prompts)} prompt(s)] {_speed(n_prompt, n_new, timings)}', file=sys.stderr)
  return 0


# ---------------------------------------------------------------------------------------------------
# --chat


def _common_prefix(a: list[int], b: list[int]) -> int:
  n = 0
  for x, y in zip(a, b, strict=False):
    if x != y:
      break
    n += 1
  return n


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _capacity(need: int, limit: int) -> int:
  """Cache slots for a conversation that needs `need`: the next power of two, within the limit."""
  return min(limit, max(_MIN_CACHE, 1 << (need - 1).bit_length()))


@functools.partial(jax.jit, static_argnames=('max_len',))
def _repack(cache: kv_cache.KVCache, keep: jax.Array, max_len: int) -> kv_cache.KVCache:
  """The cache of token positions [0, keep) only, compacted to the front (no prompt padding or
  dropped tokens left between them), in `max_len` >= cache.max_len slots."""
  cache = cache.evict([layer.positions >= keep for layer in cache.layers]).compact()
  grow = max_len - cache.max_len

  def pad(x, axis):
    return jnp.pad(x, [(0, grow if a == axis else 0) for a in range(x.ndim)])

  layers = tuple(
    kv_cache.LayerKV(
      kt=pad(layer.kt, 3),
      v=pad(layer.v, 2),
      positions=pad(layer.positions, 1),
      valid=pad(layer.valid, 1),
    )
    for layer in cache.layers
  )
  return kv_cache.KVCache(
    layers=layers, length=cache.length, next_position=jnp.full_like(cache.next_position, keep)
  )


@dataclasses.dataclass
class Conversation:
  """The --chat state: the messages, the KV cache and the tokens it holds (positions 0, 1, ...)."""

  messages: list[dict[str, str]]
  cache: kv_cache.KVCache | None = None
  cached: list[int] = dataclasses.field(default_factory=list)


def run_chat(args: argparse.Namespace, model, tokenizer, lines: TextIO) -> int:
  """--chat: one user turn per line of `lines` until EOF or an empty line (see the docstring)."""
  if tokenizer.chat_template is None:
    print(
      f'error: --chat needs a chat template and {args.model} has none; use --raw --prompt=...',
      file=sys.stderr,
    )
    return 2
  context = _context_length(args)
  if args.cache_len is not None:
    limit = args.cache_len
  else:
    limit = context + _BUCKET if context is not None else _DEFAULT_CACHE_LIMIT
  n = args.max_new_tokens
  config = sampling_config(args, tokenizer)
  conv = Conversation([{'role': 'system', 'content': args.system}] if args.system else [])
  interactive = lines.isatty()
  for turn in itertools.count(1):
    if interactive:
      print('> ', end='', file=sys.stderr, flush=True)
    line = lines.readline()
    if not line.strip():
      return 0
    conv.messages.append({'role': 'user', 'content': line.rstrip('\r\n')})
    ids = tokenizer.encode_chat(conv.messages)
    if context is not None and len(ids) + n > context:
      print(
        f'error: turn {turn}: the conversation ({len(ids)} tokens) plus --max_new_tokens={n} '
        f"exceeds the model's context of {context} tokens; stopping here",
        file=sys.stderr,
      )
      return 2
    # Reuse the cache up to the first token where the re-rendered history differs from it; at
    # least one token is prefilled (the logits of the last one start the reply).
    keep = min(_common_prefix(conv.cached, ids), len(ids) - 1)
    new = ids[keep:]
    need = keep + _round_up(len(new), _BUCKET) + n
    if need > limit:
      print(
        f'error: turn {turn}: the conversation needs {need} KV-cache slots (its tokens, the new '
        f'ones padded to {_BUCKET}, --max_new_tokens={n}), more than --cache_len={limit}; '
        'stopping here',
        file=sys.stderr,
      )
      return 2
    if conv.cache is None:
      conv.cache = kv_cache.KVCache.init(model.cfg, 1, _capacity(need, limit))
    elif keep < len(conv.cached) or conv.cache.max_len - int(conv.cache.length) < need - keep:
      size = conv.cache.max_len if need <= conv.cache.max_len else _capacity(need, limit)
      conv.cache = _repack(conv.cache, jnp.int32(keep), size)
    timings: dict[str, float] = {}
    stream = TextStream(tokenizer, sys.stdout, strip=True) if args.stream else None
    key = None
    if args.temperature > 0:
      key = jax.random.fold_in(jax.random.key(args.seed), turn)
    gen = _generate(
      model,
      [new],
      config=config,
      key=key,
      timings=timings,
      stream=stream,
      stream_chunk=args.stream_chunk,
      cache=conv.cache,
    )
    reply = np.asarray(gen.tokens[0, : int(gen.lengths[0])])
    conv.cache, conv.cached = gen.cache, ids + reply.tolist()
    text = tokenizer.decode(reply, skip_special=True)
    if stream is None:
      print(text.strip(), flush=True)
    _flag_if_stopped(gen.done[0], n)
    if args.show_entropy:
      _print_entropies(tokenizer, reply, np.asarray(gen.model_entropies[0, : len(reply)]))
    conv.messages.append({'role': 'assistant', 'content': text})
    print(
      f'[turn {turn}] {keep} tokens from the cache; {_speed(len(new), len(reply), timings)}',
      file=sys.stderr,
    )
  return 0


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    check_args(args)
    prompts = [] if args.chat else read_prompts(args)
    _enable_compilation_cache()
    if args.workdir:  # a model trained here: model.json + the newest checkpoint, LoRA merged
      model, tokenizer = spec.load_model(args.workdir, dtype=args.dtype)
    else:
      model, _, tokenizer = loader.load_pretrained(args.model, dtype=args.dtype)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.chat:
    try:
      return run_chat(args, model, tokenizer, sys.stdin)
    except KeyboardInterrupt:
      print(file=sys.stderr)
      return 130
  return run_prompts(args, model, tokenizer, prompts)


if __name__ == '__main__':
  sys.exit(main())
