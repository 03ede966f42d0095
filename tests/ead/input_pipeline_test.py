"""The character tokenizer and the expression prompts of EAD's smoke task."""

import json

import pytest

from projects.ead import input_pipeline


def test_char_tokenizer_round_trip_and_errors():
  tok = input_pipeline.CharTokenizer()
  ids = tok.encode('36-38=', add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert tok.decode(ids[1:]) == '36-38='
  with pytest.raises(ValueError, match='not in the arithmetic vocabulary'):
    tok.encode('3 + x')


def test_expression_prompt_and_verifier():
  ex = {'metadata': json.dumps({'expression': '3 + 4 - 2'}), 'answer': '5'}
  assert input_pipeline.expression_prompt(ex) == '3+4-2='
  tok = input_pipeline.CharTokenizer()
  prompt = input_pipeline.prompts(
    [{'index': 0, 'task': 'chain_sum', 'question': 'q', **ex}], 'test', lambda e: [1]
  )[0]
  assert prompt.uid == input_pipeline.TEST_UID_OFFSET
  verify = input_pipeline.make_verifier(tok.decode)
  assert verify(prompt, tok.encode('5', add_bos=False, add_eos=True)) == 1.0
  assert verify(prompt, tok.encode('6', add_bos=False, add_eos=True)) == 0.0
