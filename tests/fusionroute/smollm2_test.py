"""The SmolLM2 arm's pieces (projects/fusionroute/smollm2.py): merged LoRA experts, rows, pairs.

The default tests use a tiny random decoder (no weights); `real_model` ones load SmolLM2."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import sharding
from common.adapters import core as adapters
from common.models import decoder
from projects.fusionroute import input_pipeline as ip
from projects.fusionroute import smollm2 as sm
from tests.fusionroute import conftest


def _tiny(seed: int = 0) -> decoder.Decoder:
  with sharding.unsharded():
    return decoder.Decoder(conftest.decoder_config(), rngs=nnx.Rngs(seed))


def _randomise_adapters(model, seed: int = 1, scale: float = 0.3):
  """LoRA's B starts at zero (delta 0); random B makes the merge check non-trivial."""
  for i, layer in enumerate(adapters.adapted(model).values()):
    b = layer.adapter.b
    b[...] = scale * jax.random.normal(jax.random.key(seed + i), b[...].shape)


def test_merged_params_give_the_adapted_models_logits_in_a_plain_decoder():
  adapted = _tiny()
  paths = sm.add_lora(adapted, rank=2, seed=0)
  assert len(paths) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
  _randomise_adapters(adapted)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 40, (2, 9)), jnp.int32)
  want = adapted(tokens)
  merged = sm.merged_params(adapted)
  plain = _tiny(seed=5)  # other weights, overwritten by the merged ones
  plain_tree = nnx.to_pure_dict(nnx.state(plain, nnx.Param))
  assert jax.tree.structure(merged) == jax.tree.structure(plain_tree)
  sm.load_params(plain, merged)
  np.testing.assert_allclose(np.asarray(plain(tokens)), np.asarray(want), rtol=1e-4, atol=1e-4)
  # merged_params leaves the adapted model as it was (not merged in place)
  assert not any(layer.merged for layer in adapters.adapted(adapted).values())
  np.testing.assert_allclose(np.asarray(adapted(tokens)), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_merged_params_of_fresh_lora_equal_the_base():
  base = _tiny()
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(base, nnx.Param)))
  sm.add_lora(base, rank=2, seed=0)  # B = 0: delta = 0
  merged = sm.merged_params(base)
  jax.tree.map(np.testing.assert_array_equal, merged, before)


def test_reply_row_masks_the_reply_and_its_end_only():
  prompt, reply = [1, 10, 11, 12], [20, 21, 2]
  row = ip.reply_row(prompt, reply, seq_len=8, domain=1)
  np.testing.assert_array_equal(row['inputs'][:6], [1, 10, 11, 12, 20, 21])
  np.testing.assert_array_equal(row['targets'][:6], [10, 11, 12, 20, 21, 2])
  np.testing.assert_array_equal(row['loss_mask'], [0, 0, 0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(row['segment_ids'], [1] * 6 + [0] * 2)
  assert int(row['domain']) == 1
  with pytest.raises(ValueError, match='seq_len'):
    ip.reply_row(prompt, reply, seq_len=5, domain=0)


class _Tok:
  """Characters as ids (3 + ord), <|im_end|> = 2: enough of a tokenizer for `pairs`."""

  eos_id = 2

  def encode(self, text, add_bos=False):
    return [3 + ord(c) for c in text]

  def decode(self, ids):
    return ''.join(chr(i - 3) for i in ids if i >= 3)

  def encode_chat(self, messages):
    return self.encode(messages[-1]['content'])


def test_pairs_reject_the_own_experts_wrong_answer_first_and_skip_all_correct():
  tok = _Tok()
  ex = [
    {'task': 'basic_arithmetic', 'question': '1 + 1 =', 'answer': '2', 'metadata': '{}'},
    {'task': 'basic_arithmetic', 'question': '2 + 2 =', 'answer': '4', 'metadata': '{}'},
  ]
  examples = {'math': ex}

  def ans(*texts):
    toks = [tok.encode(t) + [2] for t in texts]
    width = max(map(len, toks))
    arr = np.asarray([t + [0] * (width - len(t)) for t in toks])
    return {'math': (arr, np.asarray([len(t) for t in toks]))}

  answers = [ans('3', '4'), ans('5', '4')]  # expert 0 (math's own) wrong on the first only
  out = sm.pairs(tok, examples, answers, prompt_len=12, response_len=4)
  assert len(out['chosen']) == 1
  assert out['expert'].tolist() == [0] and out['domain'].tolist() == [0]
  with pytest.raises(ValueError, match='no preference pairs'):
    sm.pairs(tok, examples, [ans('2', '4')], prompt_len=12, response_len=4)


@pytest.mark.real_model
def test_smollm2_experts_share_the_vocabulary_and_prompts_end_with_the_assistant_header():
  model, tok = sm.pretrained()
  ex = sm.load_examples(4, 4)['math']['train'][0]
  prompt = sm.prompt_ids(tok, ex)
  assert tok.decode(prompt[-3:], skip_special=False).endswith('assistant\n')
  assert sm.reply_ids(tok, ex['answer'])[-1] == tok.eos_id
  base = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  sm.add_lora(model, rank=2, seed=0)
  merged = sm.merged_params(model)
  jax.tree.map(np.testing.assert_array_equal, merged, base)
