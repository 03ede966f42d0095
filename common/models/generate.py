"""Chat with (or continue text from) a pretrained LM from the command line.

  python -m common.models.generate --model=smollm2 --prompt="What is the capital of France?"
  python -m common.models.generate --model=smollm2 --batch_file=prompts.txt --temperature=0.7 --top_p=0.9
  python -m common.models.generate --model=gemma3_270m --raw --prompt="The old lighthouse keeper"

Chat mode (the default) wraps each prompt in the model's own chat template (`tokenizer.encode_chat`)
and stops at its end-of-turn tokens; `--raw` feeds the text as is (base models such as Gemma-3-270M
have no template, so they default to raw). Greedy unless --temperature > 0. `--batch_file` holds one
prompt per line, generated as one ragged batch. The weights come from `common.models.loader` (fetch
them first: `python -m common.assets fetch smollm2`); sampling from `common.sampling.sampler`.

Prints each reply, then prefill and decode tokens/s. Compilation is reported separately: the first
run of a shape compiles for tens of seconds on 2 CPU cores, later runs read the persistent
compilation cache (under ~/.cache/meta-jax-monorepo/jax_cache, as the tests use).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import cache  # noqa: E402
from common import errors  # noqa: E402
from common.models import loader  # noqa: E402
from common.sampling import sampler  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--model', default='smollm2', help='asset name, alias or GGUF path')
  p.add_argument('--prompt', action='append', default=[], help='a prompt (repeat for a batch)')
  p.add_argument('--batch_file', default=None, help='a file with one prompt per line')
  p.add_argument('--system', default=None, help='system message (chat mode)')
  p.add_argument('--raw', action='store_true', help='no chat template: continue the text')
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
  return prompts


def encode(tokenizer, prompts: list[str], *, raw: bool, system: str | None) -> list[list[int]]:
  if raw:
    return [tokenizer.encode(p) for p in prompts]
  prefix = [{'role': 'system', 'content': system}] if system else []
  return [tokenizer.encode_chat([*prefix, {'role': 'user', 'content': p}]) for p in prompts]


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    check_args(args)
    prompts = read_prompts(args)
    _enable_compilation_cache()
    model, _, tokenizer = loader.load_pretrained(args.model, dtype=args.dtype)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  raw = args.raw or tokenizer.chat_template is None
  if raw and not args.raw:
    print(f'note: {args.model} has no chat template; continuing the raw text', file=sys.stderr)
  ids = encode(tokenizer, prompts, raw=raw, system=args.system)
  try:
    check_lengths(ids, args.max_new_tokens, loader.context_length(args.model))
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  stops = tuple(tokenizer.stop_ids) or ((tokenizer.eos_id,) if tokenizer.eos_id is not None else ())
  config = sampler.SamplingConfig(
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    stop_tokens=stops,
    pad_id=pad,
  )
  timings: dict[str, float] = {}
  out = sampler.generate(
    model,
    ids,
    config=config,
    key=None if args.temperature <= 0 else jax.random.key(args.seed),
    timings=timings,
  )
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  for i, prompt in enumerate(prompts):
    reply = tokenizer.decode(tokens[i, : lengths[i]], skip_special=True)
    if len(prompts) > 1:
      print(f'=== [{i}] {prompt}')
    print(reply.strip() if not raw else prompt + reply)
    if args.show_entropy:
      ent = np.asarray(out.model_entropies[i, : lengths[i]])
      pieces = [tokenizer.decode([t], skip_special=False) for t in tokens[i, : lengths[i]]]
      print('  ' + ' '.join(f'{p!r}:{e:.2f}' for p, e in zip(pieces, ent, strict=True)))
  n_prompt, n_new = sum(len(x) for x in ids), int(lengths.sum())
  print(
    f'\n[{len(prompts)} prompt(s)] prefill {n_prompt} tokens in {timings["prefill_s"]:.2f} s '
    f'({n_prompt / timings["prefill_s"]:.1f} tok/s); decode {n_new} tokens in '
    f'{timings["decode_s"]:.2f} s ({n_new / timings["decode_s"]:.1f} tok/s); '
    f'compile {timings["compile_s"]:.1f} s',
    file=sys.stderr,
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
