"""projects.ebpo.input_pipeline: tokenizer, prompt rendering, verifier on real reasoning-gym data."""

import ml_collections
import numpy as np
import pytest

from projects.ebpo import input_pipeline as ip


def test_char_tokenizer_round_trip_and_errors():
  tok = ip.CharTokenizer()
  ids = tok.encode('36-38=')
  assert ids[0] == tok.bos_id and tok.decode(ids) == '36-38='
  assert tok.decode(tok.encode('-2', add_bos=False, add_eos=True) + [5, 6]) == '-2'  # stops at EOS
  with pytest.raises(ValueError, match='not in the arithmetic vocabulary'):
    tok.encode('3 apples')


def test_smoke_prompts_and_verifier_on_the_built_data():
  train = ip.load_examples('smoke', 'train')
  test = ip.load_examples('smoke', 'test')
  assert len(train) == 4000 and 0 < len(test) <= 400
  assert {r['task'] for r in train} == {'chain_sum', 'basic_arithmetic'}
  assert not {r['question'] for r in train} & {r['question'] for r in test}
  tok = ip.CharTokenizer()
  prompts = ip.prompts(test[:20], 'test', lambda ex: tok.encode(ip.expression_prompt(ex)))
  assert all(p.uid >= ip.TEST_UID_OFFSET for p in prompts)
  assert max(len(p.tokens) for p in prompts) <= 12  # the smoke config's rl.prompt_len
  verify = ip.make_verifier(tok.decode)
  for p in prompts:
    gold = np.asarray(tok.encode(p.payload['answer'], add_bos=False, add_eos=True))
    assert verify(p, gold) == 1.0
    wrong = np.asarray(tok.encode(str(int(p.payload['answer']) + 1), add_bos=False))
    assert verify(p, wrong) == 0.0
    assert verify(p, np.zeros(0, np.int32)) == 0.0  # empty completion: 0, never an exception


def test_policy_text_of_the_tiny_policy_renders_expressions():
  text = ip.policy_text(ml_collections.ConfigDict({'kind': 'tiny', 'name': ''}))
  ex = ip.load_examples('smoke', 'test')[0]
  assert text.render(ex) == text.tok.encode(ip.expression_prompt(ex))
  assert text.stop == tuple(text.tok.stop_ids) and text.pad == text.tok.pad_id


@pytest.mark.real_model
def test_policy_text_of_smollm2_renders_the_chat_template():
  text = ip.policy_text(ml_collections.ConfigDict({'kind': 'pretrained', 'name': 'smollm2'}))
  ex = ip.load_examples('smollm2', 'test')[0]
  assert text.render(ex) == ip.chat_prompt_tokens(text.tok, ex)
  rendered = text.tok.decode(text.render(ex), skip_special=False)
  assert rendered.endswith('assistant\n')  # the generation prompt: the policy answers next
  assert ex['question'].strip() + ip.CHAT_INSTRUCTION in rendered
  assert text.stop and text.pad is not None
