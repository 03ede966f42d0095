"""The generate CLI (`python -m common.models.generate`): flags, output, one-line errors, --stream,
--chat, the --max_new_tokens marker, and the issue's musts on real weights.

The default-suite tests run the CLI's `main` in-process on a tiny synthetic GGUF (no fetched asset)
and check that what it prints is exactly what the sampler generates for the chat-templated prompts,
so the CLI cannot drift from the tested library: --stream prints exactly the non-streamed output,
and each --chat reply is exactly what generating afresh from the whole templated history gives,
while only the tokens the KV cache lacks are prefilled. The tiny model's replies are random bytes,
mostly invalid UTF-8: a hard case for incremental detokenisation (and, in --chat, re-tokenisation).
The real_model tests run the CLI as a user would, in a subprocess, and check the issue's musts:
SmolLM2 knows the capital of France, Gemma-3-270M (base) continues plain text, and Qwen2.5-Coder
writes a function that passes an assert (run in a separate Python process with a timeout, never in
the test process); and in-process, that SmolLM2's --chat (streamed or not) equals regenerating the
templated history.
"""

import dataclasses
import io
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from common import assets
from common import testing
from common.models import generate
from common.models import loader
from common.models import spec
from common.sampling import sampler
from tests.common.models import model_runs
from tests.common.models import synthetic_gguf as syn

ROOT = pathlib.Path(__file__).resolve().parents[3]
# The user's cache (converted weights of the fetched models), before the fixture below hides it.
_USER_CACHE = os.environ.get('MONOREPO_CACHE_DIR')
TIMING = re.compile(r'prefill \d+ tokens in [\d.]+ s \([\d.]+ tok/s\); decode \d+ tokens in')


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path / 'cache'))


@pytest.fixture(scope='module')
def tiny_gguf(tmp_path_factory):
  path = tmp_path_factory.mktemp('gguf') / 'tiny-llama.gguf'
  syn.write(path, syn.LLAMA, seed=3)
  return path


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and '\n' not in err, err
  return err


def test_cli_prints_what_the_sampler_generates(tiny_gguf, tmp_path, capsys):
  prompts = ['the world', 'hello there']
  batch = tmp_path / 'prompts.txt'
  batch.write_text(prompts[1] + '\n\n')  # blank lines are skipped
  rc = generate.main(
    [
      f'--model={tiny_gguf}',
      f'--prompt={prompts[0]}',
      f'--batch_file={batch}',
      '--max_new_tokens=6',
    ]
  )
  out = capsys.readouterr()
  assert rc == 0, out.err
  assert TIMING.search(out.err), out.err
  model, _, tok = loader.load_pretrained(tiny_gguf)
  ids = [tok.encode_chat([{'role': 'user', 'content': p}]) for p in prompts]
  assert ids[0][:1] == [tok.token_to_id('<|im_start|>')]  # the GGUF's ChatML template was applied
  config = sampler.SamplingConfig(
    max_new_tokens=6, temperature=0.0, stop_tokens=tok.stop_ids, pad_id=tok.pad_id
  )
  gen = sampler.generate(model, ids, config=config)
  tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
  expected = []
  for i, p in enumerate(prompts):
    expected += [f'=== [{i}] {p}', tok.decode(tokens[i, : lengths[i]]).strip()]
  assert out.out == ''.join(line + '\n' for line in expected)


def test_cli_sampling_flags_are_deterministic_given_the_seed(tiny_gguf, capsys):
  argv = [f'--model={tiny_gguf}', '--raw', '--prompt=the', '--max_new_tokens=8', '--temperature=2']
  runs = []
  for seed in (0, 0, 1):
    assert generate.main([*argv, '--top_k=50', '--top_p=0.95', f'--seed={seed}']) == 0
    runs.append(capsys.readouterr().out)
  assert runs[0] == runs[1]
  assert all(r.startswith('the') for r in runs)  # raw mode echoes the prompt, then continues
  assert runs[0] != runs[2]  # 8 tokens at temperature 2 over 300 tokens: a tie is ~impossible


@pytest.mark.parametrize(
  'flags, match',
  [
    (['--max_new_tokens=0'], '--max_new_tokens must be >= 1'),
    (['--top_p=1.5', '--temperature=1'], r'--top_p must be in \(0, 1\]'),
    (['--top_k=0', '--temperature=1'], '--top_k must be >= 1'),
    (['--top_k=5'], 'need --temperature > 0'),
    (['--dtype=float64'], '--dtype must be one of'),
    (['--batch_file=/nonexistent/prompts.txt'], 'does not exist'),
    ([], 'give --prompt'),
    (['--stream', '--prompt=y'], '--stream prints one reply as it is decoded: give one prompt'),
    (['--stream', '--stream_chunk=0'], '--stream_chunk must be >= 1'),
    (['--chat'], '--chat reads the user turns from stdin'),
    (['--cache_len=64'], '--cache_len applies to --chat only'),
  ],
)
def test_bad_flags_are_one_line(tiny_gguf, capsys, flags, match):
  prompt = [] if not flags or flags[0].startswith('--batch') else ['--prompt=x']
  assert generate.main([f'--model={tiny_gguf}', *prompt, *flags]) == 2
  assert re.search(match, _one_error_line(capsys))


def test_missing_asset_and_bad_files_are_one_line(tiny_gguf, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv('MONOREPO_ASSETS_DIR', str(tmp_path / 'no_assets'))
  assert generate.main(['--model=smollm2', '--prompt=hi']) == 2
  assert 'python -m common.assets fetch smollm2' in _one_error_line(capsys)
  truncated = tmp_path / 'cut.gguf'
  truncated.write_bytes(tiny_gguf.read_bytes()[:-1000])
  assert generate.main([f'--model={truncated}', '--prompt=hi']) == 2
  assert 'truncated' in _one_error_line(capsys)
  assert generate.main([f'--model={tmp_path / "nope.gguf"}', '--prompt=hi']) == 2
  assert 'neither a model asset' in _one_error_line(capsys)


# ---------------------------------------------------------------------------------------------------
# Real weights (python -m pytest -m real_model tests/common/models/generate_test.py -s).


def _cli(*flags: str, timeout: int = 900) -> str:
  env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': testing.xla_flags_with_devices(1),
  }
  env.pop('MONOREPO_CACHE_DIR')
  if _USER_CACHE:
    env['MONOREPO_CACHE_DIR'] = _USER_CACHE
  p = subprocess.run(
    [sys.executable, '-m', 'common.models.generate', *flags],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert TIMING.search(p.stderr), p.stderr[-3000:]
  print(f'\n$ python -m common.models.generate {" ".join(flags)}\n{p.stdout}{p.stderr}')
  return p.stdout


def _need(name: str) -> None:
  if not assets.is_fetched(name):
    pytest.skip(f'{name} is not fetched: python -m common.assets fetch {name}')


@pytest.mark.real_model
def test_smollm2_cli_answers_paris():
  _need('smollm2')
  assert 'Paris' in _cli('--model=smollm2', '--prompt=What is the capital of France?')


@pytest.mark.real_model
def test_smollm2_chat_equals_regenerating_the_history(capsys, monkeypatch):
  _need('smollm2')
  if _USER_CACHE:  # the converted weights, as _cli uses them
    monkeypatch.setenv('MONOREPO_CACHE_DIR', _USER_CACHE)
  else:
    monkeypatch.delenv('MONOREPO_CACHE_DIR')
  turns = ['Remember this number: 42.', 'What number did I ask you to remember?', 'Add 8 to it.']
  model, _, tok = loader.load_pretrained('smollm2')
  config = sampler.SamplingConfig(48, temperature=0.0, stop_tokens=tok.stop_ids, pad_id=tok.pad_id)
  messages, replies = [], []
  for turn in turns:
    messages.append({'role': 'user', 'content': turn})
    gen = sampler.generate(model, [tok.encode_chat(messages)], config=config)
    text = tok.decode(np.asarray(gen.tokens[0, : int(gen.lengths[0])]))
    messages.append({'role': 'assistant', 'content': text})
    replies.append(text.strip() + '\n')
  assert '42' in replies[2]  # the number came from turn 1
  for flags in ([], ['--stream']):
    monkeypatch.setattr(sys, 'stdin', io.StringIO(''.join(t + '\n' for t in turns)))
    assert generate.main(['--model=smollm2', '--chat', '--max_new_tokens=48', *flags]) == 0
    assert capsys.readouterr().out == ''.join(replies)


@pytest.mark.real_model
def test_gemma3_base_continues_plain_text():
  _need('gemma3_270m')
  prompt = 'The old lighthouse keeper climbed the stairs every evening'
  out = _cli('--model=gemma3_270m', f'--prompt={prompt}', '--max_new_tokens=32')
  assert out.startswith(prompt)
  words = re.findall(r"[A-Za-z']+", out[len(prompt) :])
  # Fluent English rather than noise: mostly common words, a sentence boundary.
  common = {'the', 'a', 'to', 'of', 'and', 'in', 'he', 'his', 'was', 'at', 'on', 'it', 'for'}
  assert len(words) >= 15, out
  assert sum(w.lower() in common for w in words) >= 4, out
  assert re.search(r'[.!?]', out[len(prompt) :]), out


QWEN_PROMPT = (
  'Write a Python function is_palindrome(s) that returns True if the string s reads the same '
  'forwards and backwards, ignoring case and non-alphanumeric characters. Reply with one Python '
  'code block.'
)
QWEN_ASSERT = (
  "assert is_palindrome('A man, a plan, a canal: Panama') and is_palindrome('Noon') "
  "and not is_palindrome('palindrome')"
)


@pytest.mark.real_model
def test_qwen_coder_writes_a_function_that_passes_the_assert(tmp_path):
  _need('qwen2_5_coder_0_5b')
  out = _cli('--model=qwen2_5_coder_0_5b', f'--prompt={QWEN_PROMPT}', '--max_new_tokens=256')
  blocks = re.findall(r'```(?:python)?\n(.*?)```', out, re.S)
  assert blocks, f'no code block in the reply:\n{out}'
  script = tmp_path / 'solution.py'
  script.write_text(blocks[0] + '\n\n' + QWEN_ASSERT + '\nprint("assert passed")\n')
  p = subprocess.run(
    [sys.executable, '-I', str(script)], capture_output=True, text=True, timeout=30, check=False
  )
  assert p.returncode == 0 and 'assert passed' in p.stdout, p.stderr[-2000:]


@pytest.mark.parametrize(
  'flags, match',
  [
    (['--raw', '--prompt='], 'prompt 0 is empty'),
    (['--prompt=hi', '--max_new_tokens=100000000'], "exceeds the model's context of 64 tokens"),
  ],
)
def test_empty_raw_prompt_and_a_reply_past_the_context_are_one_line(
  tiny_gguf, capsys, flags, match
):
  assert generate.main([f'--model={tiny_gguf}', *flags]) == 2
  assert re.search(match, _one_error_line(capsys))


def test_workdir_chats_with_the_run_s_model(tmp_path, capsys):
  """--workdir: a LoRA run's model (merged) and tokenizer from model.json + its checkpoint."""
  workdir = tmp_path / 'run'
  model_runs.fit_run(workdir, 'lora')
  prompts = ['the world', 'hello there']
  argv = [f'--workdir={workdir}', *(f'--prompt={p}' for p in prompts), '--max_new_tokens=5']
  rc = generate.main(argv)
  out = capsys.readouterr()
  assert rc == 0, out.err
  model, tok = spec.load_model(workdir)
  ids = [tok.encode_chat([{'role': 'user', 'content': p}]) for p in prompts]
  config = sampler.SamplingConfig(
    max_new_tokens=5, temperature=0.0, stop_tokens=tok.stop_ids, pad_id=tok.pad_id
  )
  gen = sampler.generate(model, ids, config=config)
  tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
  expected = []
  for i, p in enumerate(prompts):
    expected += [f'=== [{i}] {p}', tok.decode(tokens[i, : lengths[i]]).strip()]
  assert out.out == ''.join(line + '\n' for line in expected)
  # The context is the run's (model.json: 64 tokens), and a bad workdir is one line.
  assert generate.main([f'--workdir={workdir}', '--prompt=the world', '--max_new_tokens=60']) == 2
  assert 'context of 64 tokens' in _one_error_line(capsys)
  assert generate.main([f'--workdir={tmp_path / "nowhere"}', '--prompt=x']) == 2
  assert 'is not a run directory' in _one_error_line(capsys)


# ---------------------------------------------------------------------------------------------------
# --stream, the --max_new_tokens marker, --chat.


def _markers(err: str) -> list[str]:
  return [line for line in err.splitlines() if 'stopped at --max_new_tokens' in line]


@pytest.mark.parametrize(
  'flags',
  [[], ['--temperature=2', '--top_k=50', '--seed=1'], ['--raw', '--temperature=1', '--seed=2']],
  ids=['greedy', 'sampled', 'raw-sampled'],
)
def test_stream_prints_exactly_the_non_streamed_output(tiny_gguf, capsys, flags):
  argv = [f'--model={tiny_gguf}', '--prompt=hello there', '--max_new_tokens=12', *flags]
  assert generate.main(argv) == 0
  want = capsys.readouterr()
  assert '\ufffd' in want.out  # invalid or split UTF-8 in the reply: the hard case for streaming
  assert _markers(want.err) == [' [... stopped at --max_new_tokens=12]']
  for chunk in (1, 5):
    assert generate.main([*argv, '--stream', f'--stream_chunk={chunk}']) == 0
    got = capsys.readouterr()
    assert got.out == want.out
    assert _markers(got.err) == _markers(want.err)
    assert TIMING.search(got.err), got.err


class _Writes(io.StringIO):
  def __init__(self):
    super().__init__()
    self.writes = []

  def write(self, text):
    self.writes.append(text)
    return super().write(text)


@pytest.mark.parametrize('strip', [True, False])
def test_text_stream_writes_whole_characters_as_tokens_arrive(tiny_gguf, strip):
  _, _, tok = loader.load_pretrained(tiny_gguf)
  text = ' h\u00e9llo w\u00f6rld \u20ac5\n '
  ids = tok.encode(text)
  euro = tok.encode('\u20ac')
  assert len(euro) == 3  # one token per UTF-8 byte
  j = next(i for i in range(len(ids)) if ids[i : i + 3] == euro)
  out = _Writes()
  stream = generate.TextStream(tok, out, strip=strip)
  seen = []  # what is written after each token
  for i in range(1, len(ids) + 1):
    stream.update(ids[:i])
    seen.append(out.getvalue())
  stream.finish(ids)
  assert out.getvalue() == (text.strip() if strip else text) + '\n'
  # Written as the tokens arrive, never half a character (the input is valid UTF-8: no U+FFFD).
  assert all('\ufffd' not in w for w in out.writes)
  assert all((text.strip() if strip else text).startswith(w) for w in seen)
  before = text[: text.index('\u20ac')]
  written = before.strip() if strip else before  # with strip, trailing spaces wait
  assert seen[j - 1] == seen[j] == seen[j + 1] == written
  assert seen[j + 2] == (before.lstrip() if strip else before) + '\u20ac'
  assert seen[-1] == (text.strip() if strip else text)


def test_a_reply_cut_at_max_new_tokens_is_flagged(tiny_gguf, capsys, monkeypatch):
  prompts = ['hi', 'the world']
  argv = [f'--model={tiny_gguf}', *(f'--prompt={p}' for p in prompts), '--max_new_tokens=4']
  assert generate.main(argv) == 0
  assert _markers(capsys.readouterr().err) == [
    ' [... [0] stopped at --max_new_tokens=4]',
    ' [... [1] stopped at --max_new_tokens=4]',
  ]
  # Make row 0's second token an end-of-turn token: row 0 ends there, unflagged.
  model, _, tok = loader.load_pretrained(tiny_gguf)
  ids = [tok.encode_chat([{'role': 'user', 'content': p}]) for p in prompts]
  config = sampler.SamplingConfig(4, temperature=0.0, stop_tokens=tok.stop_ids, pad_id=tok.pad_id)
  tokens = np.asarray(sampler.generate(model, ids, config=config).tokens)
  stop = int(tokens[0, 1])
  assert stop not in tokens[1]
  orig = generate.sampling_config
  monkeypatch.setattr(
    generate,
    'sampling_config',
    lambda args, tok: dataclasses.replace(orig(args, tok), stop_tokens=(*tok.stop_ids, stop)),
  )
  assert generate.main(argv) == 0
  assert _markers(capsys.readouterr().err) == [' [... [1] stopped at --max_new_tokens=4]']


def _common_prefix(a, b):
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


CHAT_SCRIPTS = {
  # One-token replies ('  ', '>', 'd') that re-tokenise to themselves: each turn prefills exactly
  # the template's tail after the reply and the new user turn.
  'clean': (['a', 'or', 'hi'], 1),
  # Replies of invalid UTF-8 (U+FFFD once decoded) re-tokenise to other tokens: the cache is cut
  # back to where the re-rendered history departs from what the model generated.
  'retokenised': (['hi', 'the world', 'what'], 4),
}


@pytest.mark.parametrize('stream', [False, True], ids=['whole', 'stream'])
@pytest.mark.parametrize('script', CHAT_SCRIPTS)
def test_chat_keeps_the_cache_and_matches_regenerating_the_history(
  tiny_gguf, capsys, monkeypatch, script, stream
):
  turns, n = CHAT_SCRIPTS[script]
  # The tiny GGUF declares a context of 64 tokens, too few for three ChatML turns (RoPE has no
  # limit of its own).
  monkeypatch.setattr(loader, 'context_length', lambda _: 256)
  # A cache of 64 slots to start with: compacted (no room left after the bucket padding) on turn 2,
  # grown to 128 on turn 3.
  monkeypatch.setattr(generate, '_MIN_CACHE', 64)
  sizes = []
  repack = generate._repack
  monkeypatch.setattr(
    generate, '_repack', lambda c, keep, max_len: sizes.append(max_len) or repack(c, keep, max_len)
  )
  monkeypatch.setattr(sys, 'stdin', io.StringIO(''.join(t + '\n' for t in turns) + '\nunread\n'))
  flags = ['--stream', '--stream_chunk=1'] if stream else []
  rc = generate.main([f'--model={tiny_gguf}', '--chat', f'--max_new_tokens={n}', *flags])
  out = capsys.readouterr()
  assert rc == 0, out.err
  # The reference: generate afresh from the whole templated history, turn by turn.
  model, _, tok = loader.load_pretrained(tiny_gguf)
  config = sampler.SamplingConfig(n, temperature=0.0, stop_tokens=tok.stop_ids, pad_id=tok.pad_id)
  messages, ids, cached, replies, prefills, cut = [], [], [], [], [], []
  for turn in turns:
    messages.append({'role': 'user', 'content': turn})
    before, ids = ids, tok.encode_chat(messages)
    keep = _common_prefix(cached, ids)
    assert len(ids) > keep >= len(before)  # the history before the last reply is never prefilled
    prefills.append((keep, len(ids) - keep))
    cut.append(keep < len(cached))
    gen = sampler.generate(model, [ids], config=config)
    reply = [int(t) for t in np.asarray(gen.tokens[0, : int(gen.lengths[0])])]
    text = tok.decode(reply)
    replies.append(text.strip() + '\n')
    messages.append({'role': 'assistant', 'content': text})
    cached = ids + reply
  assert out.out == ''.join(replies)
  got = re.findall(r'\[turn \d+\] (\d+) tokens from the cache; prefill (\d+) tokens', out.err)
  assert [(int(a), int(b)) for a, b in got] == prefills
  assert not any(cut) if script == 'clean' else any(cut)
  assert len(_markers(out.err)) == 3  # no reply reached an end-of-turn token
  assert sizes == [64, 128]


def test_chat_stops_in_one_line_past_the_context_or_the_cache(tiny_gguf, capsys, monkeypatch):
  def chat(*flags):
    monkeypatch.setattr(sys, 'stdin', io.StringIO('hi\nthe world\nwhat\n'))
    rc = generate.main([f'--model={tiny_gguf}', '--chat', '--max_new_tokens=3', *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith('error: '), err
    return err

  err = chat()  # the GGUF's context: 64 tokens
  assert re.fullmatch(
    r"error: turn 3: the conversation \(\d+ tokens\) plus --max_new_tokens=3 exceeds the "
    r"model's context of 64 tokens; stopping here",
    err[-1],
  )
  assert sum(line.startswith('[turn ') for line in err) == 2
  err = chat('--cache_len=40')
  assert re.fullmatch(
    r'error: turn 2: the conversation needs \d+ KV-cache slots .* more than --cache_len=40; '
    'stopping here',
    err[-1],
  )
