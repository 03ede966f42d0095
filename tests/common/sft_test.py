"""SFT tokenization, packing and loss on a tiny synthetic model with a ChatML tokenizer."""

from flax import nnx
import jax
import numpy as np
import pytest

from common import losses
from common import sft
from tests.common.models import synthetic_gguf as syn

SEQ_LEN = 64


@pytest.fixture(scope='module')
def lm(tmp_path_factory):
  """(model, tokenizer) from a tiny llama-layout GGUF, converted in a private cache."""
  model, _, tok = syn.load_private(tmp_path_factory.mktemp('sft'))
  return model, tok


def _chats(n, seed=0):
  rng = np.random.default_rng(seed)
  words = ['the', 'world', 'in', 'a', 'wor', 'on', 'hello', 'x', '12', 'é']
  say = lambda k: ' '.join(rng.choice(words, k))  # noqa: E731
  return [
    [
      {'role': 'user', 'content': say(rng.integers(1, 5))},
      {'role': 'assistant', 'content': say(rng.integers(1, 6))},
    ]
    for _ in range(n)
  ]


def test_chat_mask_covers_reply_and_end_of_turn_only(lm):
  _, tok = lm
  ex = sft.tokenize_chat(
    tok, [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'the world'}]
  )
  prompt, reply = ex.tokens[ex.loss_mask == 0], ex.tokens[ex.loss_mask == 1]
  assert (
    tok.decode(prompt, skip_special=False)
    == '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'
  )
  assert tok.decode(reply, skip_special=False) == 'the world<|im_end|>'  # no trailing newline
  assert np.all(np.diff(ex.loss_mask) >= 0)  # one prompt block, then one reply block
  assert ex.num_targets == len(reply)
  with pytest.raises(sft.SFTError, match='last message'):
    sft.tokenize_chat(tok, [{'role': 'user', 'content': 'hi'}])


def test_plain_text_example_appends_eos(lm):
  _, tok = lm
  ex = sft.tokenize(tok, {'prompt': 'Q: the', 'response': ' world'})
  assert ex.tokens[-1] == tok.eos_id
  assert tok.decode(ex.tokens[ex.loss_mask == 1], skip_special=False) == ' world<|im_end|>'


def test_packing_preserves_every_example(lm):
  _, tok = lm
  examples = [sft.tokenize(tok, {'messages': m}) for m in _chats(12)]
  batch = sft.pack(examples, SEQ_LEN)
  assert batch['inputs'].shape[1] == SEQ_LEN and batch['inputs'].shape[0] < len(examples)
  seen = []
  for row in range(batch['inputs'].shape[0]):
    for seg in range(1, batch['segment_ids'][row].max() + 1):
      sel = batch['segment_ids'][row] == seg
      np.testing.assert_array_equal(batch['positions'][row, sel], np.arange(sel.sum()))
      seen.append(
        (batch['inputs'][row, sel], batch['targets'][row, sel], batch['loss_mask'][row, sel])
      )
  assert len(seen) == len(examples)
  for ex in examples:  # each example appears exactly once, shifted by one
    matches = [
      s
      for s in seen
      if len(s[0]) == len(ex.tokens) - 1
      and np.array_equal(s[0], ex.tokens[:-1])
      and np.array_equal(s[1], ex.tokens[1:])
      and np.array_equal(s[2], ex.loss_mask[1:])
    ]
    assert matches
  padding = batch['segment_ids'] == 0
  assert not batch['loss_mask'][padding].any()
  streamed = list(sft.packed_batches(examples, SEQ_LEN, batch_size=2))
  assert all(b['inputs'].shape == (2, SEQ_LEN) for b in streamed)
  assert sum(int(b['segment_ids'].max(axis=1).sum()) for b in streamed) == len(examples)
  with pytest.raises(sft.SFTError, match='num_rows=1'):
    sft.pack(examples, SEQ_LEN, num_rows=1)


@nnx.jit
def _loss(model, batch):
  return sft.sft_loss(model, batch)


def test_packed_loss_is_token_weighted_mean_of_unpacked_losses(lm):
  model, tok = lm
  examples = [sft.tokenize(tok, {'messages': m}) for m in _chats(9, seed=1)]
  packed = sft.pack(examples, SEQ_LEN)
  rows = packed['inputs'].shape[0]
  loss, metrics = _loss(model, packed)
  per_example = [_loss(model, sft.pack([ex], SEQ_LEN, num_rows=rows)) for ex in examples]
  counts = np.array([float(m['reply_tokens']) for _, m in per_example])
  np.testing.assert_array_equal(counts, [ex.num_targets for ex in examples])
  weighted = sum(float(x) * c for (x, _), c in zip(per_example, counts, strict=True)) / counts.sum()
  assert float(metrics['reply_tokens']) == counts.sum()
  np.testing.assert_allclose(float(loss), weighted, rtol=1e-5)


@nnx.jit
def _logits(model, batch):
  return model(batch['inputs'], segment_ids=batch['segment_ids'], positions=batch['positions'])


@nnx.jit
def _param_grads(model, batch):
  return nnx.state(nnx.grad(lambda m: sft.sft_loss(m, batch)[0])(model), nnx.Param)


def test_prompt_tokens_contribute_no_gradient(lm):
  model, tok = lm
  batch = sft.pack([sft.tokenize(tok, {'messages': m}) for m in _chats(4, seed=2)], SEQ_LEN)
  logits = _logits(model, batch)
  grad = jax.grad(lambda lg: losses.cross_entropy(lg, batch['targets'], batch['loss_mask'])[0])(
    logits
  )
  prompt = batch['loss_mask'] == 0
  assert not np.asarray(grad)[prompt].any()
  assert np.abs(np.asarray(grad)[~prompt]).sum() > 0

  # Changing what prompt positions "should" predict leaves the parameter gradient unchanged.
  shifted = np.where(prompt, (batch['targets'] + 7) % tok.vocab_size, batch['targets'])
  grads = [_param_grads(model, b) for b in (batch, dict(batch, targets=shifted))]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
