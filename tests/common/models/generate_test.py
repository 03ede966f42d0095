"""The generate CLI (`python -m common.models.generate`): flags, output, one-line errors, and the
issue's musts on real weights.

The default-suite tests run the CLI's `main` in-process on a tiny synthetic GGUF (no fetched asset)
and check that what it prints is exactly what the sampler generates for the chat-templated prompts,
so the CLI cannot drift from the tested library. The real_model tests run the CLI as a user would, in
a subprocess, and check the issue's musts: SmolLM2 knows the capital of France, Gemma-3-270M (base)
continues plain text, and Qwen2.5-Coder writes a function that passes an assert (run in a separate
Python process with a timeout, never in the test process).
"""

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
from common.sampling import sampler
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
