"""Real GGUF weights against transformers (PyTorch, CPU, float32) loading the same files.

Run after fetching: `python -m common.assets fetch smollm2 gemma3_270m qwen2_5_coder_0_5b`, with the
reference stack installed (`pip install -r requirements-reference.txt`), then
`python -m pytest -m real_model tests/common/models/real_model_test.py -q -s` (-s prints the
measured differences). A model that is not fetched is skipped with the fetch command.

Tolerances. Both sides run float32 on the same dequantized weights, so differences are rounding
from different op orders accumulated over 18-30 layers: we require max |logit difference| <= 2e-3
times the largest |logit| of the prompt (about 5e-2 absolute at these scales). Measured on short
prompts: at most 1.3e-4 (SmolLM2), 8.2e-5 (Gemma), 7.0e-5 (Qwen), i.e. ~4e-6 relative. On a
640-token Gemma input, positions past 600 reach 2.2e-2 (6e-4 relative): each layer fed
transformers' float64 hidden states matches to float32 rounding, and a window of 511 or 513
instead of 512 gives errors of 0.6-2.3, so this is float32 rounding amplified by Gemma's 1e5-sized
residual stream, not a masking or RoPE mismatch. Greedy decoding must reproduce transformers' first
32 tokens, or differ first at a step where the top-2 logit gap is below 1e-3 (a float32 tie).

transformers parses GGUF metadata with gguf's GGUFReader, which takes minutes on Gemma's 262k-token
vocabulary; the fixture swaps in common.models.loader's reader, which gguf_test checks field by
field against GGUFReader (and test_fast_reader_on_real_metadata checks on a real file here).
"""

import contextlib
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import assets
from common import sharding
from common.models import loader

pytestmark = pytest.mark.real_model

MODELS = ('smollm2', 'gemma3_270m', 'qwen2_5_coder_0_5b')
LOGIT_RTOL = 2e-3  # of the largest |logit| in the prompt
TIE_GAP = 1e-3
NEW_TOKENS = 32

TEXTS = (
  "Hello world! How's it going?",
  '  leading spaces and  double  spaces\tand tabs\n\nnewlines\r\n',
  'def f(x):\n    return x ** 2  # square\n',
  'Numbers: 1234567890 3.14159 -42 1e-5',
  'Unicode: café naïve 日本語 한국어 Ελληνικά 🤖🎉',
  '<|im_start|>user\nHi<|im_end|>\n<start_of_turn>model\n<end_of_turn>',
  'literal <eos> and <bos> and <pad> and <unk> in text',
  '',
  'a\u2581b ▁▁ x',
  'emoji family 👨‍👩‍👧 and zero width\u200b joiner',
  '    \n\n\n    indented\n\t\t\ttabs',
  "I'm you're we'll they'd it's CAN'T",
)
PLAIN_PROMPTS = (
  'The three primary colors are',
  'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
)
CHAT = (
  ({'role': 'user', 'content': 'Write a haiku about the sea.'},),
  (
    {'role': 'system', 'content': 'You answer in one sentence.'},
    {'role': 'user', 'content': 'Why is the sky blue?'},
  ),
)


@contextlib.contextmanager
def _fast_gguf_reader():
  import gguf  # noqa: PLC0415

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(gguf, 'GGUFReader', loader._reader_class())
    yield


class Pair:
  """Our model and transformers' on the same GGUF."""

  def __init__(self, name):
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    torch.manual_seed(0)
    self.name = name
    src = loader.resolve(name)
    start = time.monotonic()
    self.model, self.cfg, self.tok = loader.load_pretrained(name)
    self.load_s = time.monotonic() - start
    with _fast_gguf_reader():
      kwargs = {'gguf_file': src.path.name}
      self.hf_tok = transformers.AutoTokenizer.from_pretrained(str(src.path.parent), **kwargs)
      self.hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(src.path.parent), dtype=torch.float32, attn_implementation='eager', **kwargs
      ).eval()
    self.torch = torch
    # Every prompt of a family is padded to one length, so each jitted function compiles once
    # (causal attention: positions after a prompt do not change its logits).
    self.bucket = -(-(max(len(p) for p in self.prompts()) + NEW_TOKENS + 16) // 16) * 16
    graphdef, state = nnx.split(self.model)
    self.state = state
    self._forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    # Logits at one position only (Gemma's full [T, 262144] logits per step would dominate).
    self._last = jax.jit(
      lambda s, x, n: (
        lambda m: m.logits_from_hidden(jax.lax.dynamic_index_in_dim(m.hidden_states(x), n, 1))
      )(nnx.merge(graphdef, s))[:, 0]
    )

  def prompts(self) -> list[list[int]]:
    if self.tok.chat_template is None:  # Gemma-3-270M is a base model
      return [self.tok.encode(p) for p in PLAIN_PROMPTS]
    return [self.tok.encode_chat(list(m)) for m in CHAT] + [self.tok.encode(PLAIN_PROMPTS[1])]

  def _padded(self, ids) -> np.ndarray:
    buf = np.zeros((1, self.bucket), np.int32)
    buf[0, : len(ids)] = ids
    return buf

  def logits(self, ids) -> np.ndarray:
    return np.asarray(self._forward(self.state, jnp.asarray(self._padded(ids))))[0, : len(ids)]

  def hf_logits(self, ids) -> np.ndarray:
    with self.torch.no_grad():
      return self.hf(self.torch.tensor([ids])).logits[0].float().numpy()

  def greedy(self, ids, n=NEW_TOKENS) -> tuple[list[int], list[np.ndarray]]:
    """Full-recompute greedy decoding on the fixed-length buffer (one compile)."""
    buf = self._padded(ids)
    out, steps = [], []
    for i in range(n):
      row = np.asarray(self._last(self.state, jnp.asarray(buf), len(ids) + i - 1))[0]
      steps.append(row[: self.cfg.vocab_size])
      out.append(int(np.argmax(steps[-1])))
      buf[0, len(ids) + i] = out[-1]
    return out, steps

  def hf_greedy(self, ids, n=NEW_TOKENS) -> tuple[list[int], list[np.ndarray]]:
    torch = self.torch
    out, steps, past, x = [], [], None, torch.tensor([ids])
    with torch.no_grad():
      for _ in range(n):
        r = self.hf(x, past_key_values=past, use_cache=True)
        past = r.past_key_values
        steps.append(r.logits[0, -1].float().numpy())
        out.append(int(np.argmax(steps[-1])))
        x = torch.tensor([[out[-1]]])
    return out, steps


@pytest.fixture(scope='module', params=MODELS)
def pair(request):
  name = request.param
  if not assets.is_fetched(name):
    pytest.skip(f'{name} is not fetched: python -m common.assets fetch {name}')
  pytest.importorskip('torch', reason='pip install -r requirements-reference.txt')
  pytest.importorskip('transformers', reason='pip install -r requirements-reference.txt')
  return Pair(name)


def test_logits_match_transformers(pair):
  worst = 0.0
  for ids in pair.prompts():
    ours, ref = pair.logits(ids), pair.hf_logits(ids)
    v = ref.shape[-1]
    assert v == pair.cfg.vocab_size or v == pair.cfg.padded_vocab
    diff = np.abs(ours[:, :v] - ref).max()
    scale = np.abs(ref).max()
    worst = max(worst, diff / scale)
    print(
      f'\n{pair.name}: {len(ids)} tokens, max |dlogit| {diff:.2e} (max |logit| {scale:.1f}, '
      f'mean |dlogit| {np.abs(ours[:, :v] - ref).mean():.1e}); load {pair.load_s:.1f} s'
    )
    assert diff <= LOGIT_RTOL * scale
    np.testing.assert_array_equal(ours[:, :v].argmax(-1), ref.argmax(-1))
  assert worst <= LOGIT_RTOL


def test_long_context_logits_match_transformers(pair):
  """Past Gemma's 512-token sliding window, where local and global layers really differ."""
  if pair.name != 'gemma3_270m':
    pytest.skip('gemma3 only (the sliding window)')
  text = ' '.join(f'{i} bottles of beer on the wall, take one down.' for i in range(99, 0, -1))
  ids = pair.tok.encode(text)[:640]
  assert len(ids) == 640
  ours = np.asarray(pair._forward(pair.state, jnp.asarray([ids], jnp.int32)))[0]
  ref = pair.hf_logits(ids)
  diff = np.abs(ours[:, : ref.shape[-1]] - ref)
  print(
    f'\n{pair.name}: 640 tokens, max |dlogit| {diff.max():.2e} (positions >= 512: '
    f'{diff[512:].max():.2e}; max |logit| {np.abs(ref).max():.1f})'
  )
  assert diff.max() <= LOGIT_RTOL * np.abs(ref).max()


def test_token_ids_match_transformers(pair):
  for text in TEXTS:
    assert pair.tok.encode(text) == pair.hf_tok.encode(text), repr(text)
    ids = pair.hf_tok.encode(text)
    assert pair.tok.decode(ids, skip_special=False) == pair.hf_tok.decode(ids), repr(text)
    assert pair.tok.decode(ids) == pair.hf_tok.decode(ids, skip_special_tokens=True), repr(text)
  assert (pair.tok.bos_id, pair.tok.eos_id) == (pair.hf_tok.bos_token_id, pair.hf_tok.eos_token_id)
  if pair.tok.chat_template is not None:
    for messages in CHAT:
      for gen in (True, False):
        rendered = pair.hf_tok.apply_chat_template(
          list(messages), tokenize=False, add_generation_prompt=gen
        )
        assert pair.tok.apply_chat_template(messages, add_generation_prompt=gen) == rendered
        assert pair.tok.encode_chat(messages, gen) == pair.hf_tok.encode(
          rendered, add_special_tokens=False
        )


def _top2_gap(row: np.ndarray) -> float:
  top = np.sort(row)[-2:]
  return float(top[1] - top[0])


def test_greedy_tokens_match_transformers(pair):
  for ids in pair.prompts():
    ours, our_steps = pair.greedy(ids)
    ref, ref_steps = pair.hf_greedy(ids)
    k = next((i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b), None)
    print(f'\n{pair.name}: greedy {pair.tok.decode(ours)!r}')
    if k is not None:
      gaps = _top2_gap(our_steps[k]), _top2_gap(ref_steps[k])
      print(f'  first difference at token {k}: top-2 gaps ours {gaps[0]:.1e}, hf {gaps[1]:.1e}')
      assert min(gaps) < TIE_GAP, f'greedy tokens differ at {k}: {ours} vs {ref}'


def test_smollm2_knows_the_capital_of_france(pair):
  if pair.name != 'smollm2':
    pytest.skip('SmolLM2 only')
  ids = pair.tok.encode_chat([{'role': 'user', 'content': 'What is the capital of France?'}])
  out, _ = pair.greedy(ids)
  stop = next((i for i, t in enumerate(out) if t in pair.tok.stop_ids), len(out))
  reply = pair.tok.decode(out[:stop])
  print(f'\nsmollm2: {reply!r}')
  assert 'Paris' in reply


def test_sharded_real_model_matches_unsharded(pair):
  if pair.name != 'smollm2':
    pytest.skip('SmolLM2 only (the cheapest model)')
  mesh = sharding.make_mesh((('data', 1), ('fsdp', 4), ('tensor', 2)))
  model, _, _ = loader.load_pretrained('smollm2', mesh=mesh)
  ids = pair.prompts()[0]
  graphdef, state = nnx.split(model)
  with jax.set_mesh(mesh):
    got = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray([ids])))
  want = pair.logits(ids)
  # Same weights and maths, only the summation order differs (contractions split over 8 devices):
  # float32 rounding over 30 layers, relative to the logits' scale, not to each logit (a small
  # logit carries the absolute error of the large ones). Measured: 1.4e-4 at a scale of 37.6
  # (4e-6); a sharding bug (a missing reduction, shards in the wrong order) is O(1).
  diff, scale = np.abs(got[0] - want).max(), np.abs(want).max()
  print(f'\nsharded vs unsharded: max |dlogit| {diff:.2e} (max |logit| {scale:.1f})')
  assert diff <= 2e-5 * scale
  np.testing.assert_array_equal(got[0].argmax(-1), want.argmax(-1))


def test_fast_reader_on_real_metadata(pair):
  if pair.name != 'smollm2':
    pytest.skip('SmolLM2 only (GGUFReader itself takes minutes on the larger vocabularies)')
  import gguf  # noqa: PLC0415

  path = assets.path('smollm2')
  fast, slow = loader.open_gguf(path), gguf.GGUFReader(path)
  for key, field in slow.fields.items():
    assert fast.fields[key].contents() == field.contents(), key
  assert all(
    np.array_equal(a.data, b.data) for a, b in zip(fast.tensors, slow.tensors, strict=True)
  )
