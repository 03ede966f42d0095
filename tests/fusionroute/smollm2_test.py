"""The SmolLM2 arm's pieces (projects/fusionroute/smollm2.py): merged LoRA experts, rows, pairs.

The default tests use a tiny random decoder (no weights); `real_model` ones load SmolLM2."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import config as config_lib
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


# ---------------------------------------------------------------------------------------------------
# The launcher's arm (experts.source='smollm2').


def _rows(n: int, domain: int) -> list[dict]:
  return [ip.reply_row([1, 3 + i], [4 + i, 2], 4, domain) for i in range(n)]


def test_sft_source_is_balanced_and_visits_every_row_once_per_epoch():
  rows = [_rows(3, 0), _rows(2, 1), _rows(4, 2)]
  src = sm.SFTSource(rows, seed=7)
  items = [src[g] for g in range(3 * 12)]
  assert [int(r['domain']) for r in items[:6]] == [0, 1, 2, 0, 1, 2]
  for dom, n in enumerate((3, 2, 4)):
    firsts = [int(r['inputs'][1]) for r in items[dom::3][:n]]  # the first epoch of the domain
    assert sorted(firsts) == [3 + i for i in range(n)]
  again = sm.SFTSource(rows, seed=7)
  for g in (0, 5, 35, (1 << 36) + 11):  # a function of (seed, g) only: resumable
    np.testing.assert_array_equal(src[g]['inputs'], again[g]['inputs'])
  other = [int(sm.SFTSource(rows, seed=8)[g]['inputs'][1]) for g in range(36)]
  assert other != [int(r['inputs'][1]) for r in items]
  with pytest.raises(ValueError, match='no SFT rows'):
    sm.SFTSource([rows[0], []], seed=0)


def test_grade_scores_verbose_answers_with_the_verifier_and_cuts_at_the_length():
  tok = _Tok()
  problems = [
    {'task': 'basic_arithmetic', 'question': '1 + 1 =', 'answer': '2', 'metadata': '{}'},
    {'task': 'basic_arithmetic', 'question': '2 + 3 =', 'answer': '5', 'metadata': '{}'},
    {'task': 'basic_arithmetic', 'question': '2 + 2 =', 'answer': '4', 'metadata': '{}'},
  ]
  texts = ['The answer is 2.', '6', '4']
  toks = [tok.encode(t) + [2] for t in texts]
  width = max(map(len, toks)) + 2
  tokens = np.asarray([t + [3 + ord('9')] * (width - len(t)) for t in toks])  # junk after the end
  lengths = np.asarray([len(toks[0]), 2, 1])  # the last: cut before its answer's end
  answers, correct = sm.grade(problems, tokens, lengths, tok=tok)
  assert answers == ['The answer is 2.', '6', '4']
  np.testing.assert_array_equal(correct, [True, False, True])


def test_check_config_names_what_the_arm_needs():
  from experiments.fusionroute.configs import base

  def one_line_error(config, match, check=sm.check_config):
    with pytest.raises(config_lib.ConfigError, match=match) as e:
      check(config)
    assert '\n' not in str(e.value)

  one_line_error(base.get_config('smoke,experts.source=smollm2'), 'needs experts.lora_steps')
  one_line_error(base.get_config('smollm2,data.flaw=carry9'), 'no planted flaw')
  one_line_error(base.get_config('smollm2,data.eval_per_domain=100'), r"\{'math': 94\}")
  one_line_error(base.get_config('smollm2,data.pair_prompts=600'), 'leaves no SFT rows')
  # Math rows are 31-35 tokens long, string and logic rows 62 and more (measured).
  one_line_error(
    base.get_config('smollm2,data.seq_len=50'), r"data.seq_len=50 .*\{'SFT string': \d+"
  )
  sm.check_config(base.get_config('smollm2'))  # the arm's seq_len keeps rows of every domain
  three = base.get_config('smollm2')
  three.experts.lora_steps = (1, 2, 3)
  one_line_error(three, 'one entry per LoRA expert', check=sm.expert_specs)
  specs = sm.expert_specs(base.get_config('smollm2'))
  assert specs == sm.EXPERT_SPECS  # the default arm reads the pilot's cached adapters


def test_router_questions_are_distinct_and_neither_trained_on_nor_held_out():
  """The router's pairs and SFT rows never repeat a question, and none is one the experts were
  fine-tuned on (the same reasoning-gym train split, EXPERT_SPECS) or one the evaluation asks."""
  from experiments.fusionroute.configs import base

  config = base.get_config('smollm2')
  router = sm.router_examples(config)
  experts = sm.load_examples(sm.TRAIN_EXAMPLES, 0, seed=0)
  evaluated = {p['question'] for p in sm.eval_problems(config)}
  for dom in sm.DOMAINS:
    questions = [ex['question'] for ex in router[dom]]
    assert len(questions) == len(set(questions)) > config.data.pair_prompts
    trained = {ex['question'] for ex in experts[dom]['train']}
    assert not set(questions) & (trained | evaluated), dom
  assert len(router['math']) == 485  # basic_arithmetic repeats itself; still 421 SFT questions
