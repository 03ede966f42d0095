"""Tokenizers built from GGUF-style metadata on tiny synthetic vocabularies (no fetched asset).

Real vocabularies are compared id for id with transformers in real_model_test.py; here each rule
the builders implement is pinned on a vocabulary small enough to reason about by hand.
"""

import pytest

from common.models import tokenizer as tokenizer_lib
from tests.common.models import synthetic_gguf as syn


def _bpe_md(pre='smollm', **extra):
  tokens, types, merges = syn.bpe_vocab()
  return {
    'tokenizer.ggml.model': 'gpt2',
    'tokenizer.ggml.pre': pre,
    'tokenizer.ggml.tokens': tokens,
    'tokenizer.ggml.token_type': types,
    'tokenizer.ggml.merges': merges,
    'tokenizer.ggml.bos_token_id': 1,
    'tokenizer.ggml.eos_token_id': 2,
    'tokenizer.ggml.padding_token_id': 2,
    'tokenizer.ggml.add_bos_token': False,
    'tokenizer.chat_template': syn.CHATML,
    **extra,
  }


def _spm_md(**extra):
  tokens, scores, types = syn.spm_vocab()
  return {
    'tokenizer.ggml.model': 'llama',
    'tokenizer.ggml.tokens': tokens,
    'tokenizer.ggml.scores': scores,
    'tokenizer.ggml.token_type': types,
    'tokenizer.ggml.bos_token_id': 2,
    'tokenizer.ggml.eos_token_id': 1,
    'tokenizer.ggml.unknown_token_id': 3,
    'tokenizer.ggml.padding_token_id': 0,
    'tokenizer.ggml.add_bos_token': True,
    'tokenizer.ggml.add_space_prefix': False,
    **extra,
  }


@pytest.fixture(scope='module')
def bpe():
  return tokenizer_lib.from_gguf_metadata(_bpe_md())


@pytest.fixture(scope='module')
def spm():
  return tokenizer_lib.from_gguf_metadata(
    _spm_md(**{'tokenizer.chat_template': syn.GEMMA_TEMPLATE})
  )


def test_bpe_merges_and_specials(bpe):
  the, world = bpe.token_to_id('Ġthe'), bpe.token_to_id('Ġworld')
  assert bpe.encode(' the world') == [the, world]
  assert bpe.encode('<|im_start|>user') == [1, *bpe.encode('user')]
  assert bpe.encode('a<tool>b') == [*bpe.encode('a'), bpe.token_to_id('<tool>'), *bpe.encode('b')]
  assert (bpe.bos_id, bpe.eos_id, bpe.pad_id, bpe.add_bos) == (1, 2, 2, False)
  assert bpe.stop_ids == (0, 2)  # eos = <|im_end|>, plus <|endoftext|>
  assert bpe.vocab_size == len(syn.bpe_vocab()[0])


def test_bpe_decode_roundtrips_and_skips_specials(bpe):
  text = 'Ünïcödé 日本 🤖  two  spaces\n\ttab 12345'
  assert bpe.decode(bpe.encode(text)) == text
  ids = bpe.encode('<|im_start|>hi<tool><|im_end|>')
  assert bpe.decode(ids) == 'hi<tool>'  # user-defined tokens are not special
  assert bpe.decode(ids, skip_special=False) == '<|im_start|>hi<tool><|im_end|>'


def test_pre_tokenizer_regex_follows_gguf_pre(bpe):
  """GPT-2's regex keeps '12' together (so the merge applies); Qwen2's splits single digits."""
  qwen = tokenizer_lib.from_gguf_metadata(_bpe_md(pre='qwen2'))
  assert bpe.encode('12') == [bpe.token_to_id('12')]
  assert qwen.encode('12') == [qwen.token_to_id('1'), qwen.token_to_id('2')]
  with pytest.raises(tokenizer_lib.TokenizerError, match="pre-tokenizer 'mystery'"):
    tokenizer_lib.from_gguf_metadata(_bpe_md(pre='mystery'))


def test_chat_template(bpe):
  messages = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]
  assert (
    bpe.apply_chat_template(messages[:1])
    == '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'
  )
  full = bpe.apply_chat_template(messages, add_generation_prompt=False)
  assert full == '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n'
  assert bpe.encode_chat(messages, add_generation_prompt=False) == bpe.encode(full)
  custom = bpe.apply_chat_template(messages[:1], chat_template='{{ messages[0].content | upper }}')
  assert custom == 'HI'
  bare = tokenizer_lib.from_gguf_metadata(_bpe_md(**{'tokenizer.chat_template': None}))
  with pytest.raises(tokenizer_lib.TokenizerError, match='no chat template'):
    bare.apply_chat_template(messages)


def test_end_of_turn_is_the_stop_token_the_template_closes_a_reply_with(bpe, spm):
  # ChatML: <|im_end|>, not <|endoftext|> (the lower stop id); Gemma: <end_of_turn>, not <eos>.
  assert bpe.end_of_turn_id() == bpe.token_to_id('<|im_end|>') != bpe.stop_ids[0]
  assert spm.end_of_turn_id() == spm.token_to_id('<end_of_turn>') != spm.eos_id
  plain = tokenizer_lib.from_gguf_metadata(
    _bpe_md(**{'tokenizer.chat_template': '{% for m in messages %}{{ m.content }}{% endfor %}'})
  )
  with pytest.raises(tokenizer_lib.TokenizerError, match='no stop token'):
    plain.end_of_turn_id()


def test_spm_pieces_bos_and_byte_fallback(spm):
  ids = spm.encode('the world')
  assert ids[0] == 2 and spm.add_bos  # BOS by default, as llama.cpp / transformers do for Gemma
  assert [spm.id_to_token(i) for i in ids[1:]] == ['t', 'he', '▁wor', 'ld']
  e_acute = spm.encode('é', add_bos=False)
  assert [spm.id_to_token(i) for i in e_acute] == ['<0xC3>', '<0xA9>']
  text = 'héllo  wörld\nnew line 日本'
  assert spm.decode(spm.encode(text)) == text
  assert (spm.bos_id, spm.eos_id, spm.unk_id, spm.pad_id) == (2, 1, 3, 0)
  assert spm.stop_ids == (1, 6)  # <eos> and <end_of_turn>


def test_spm_gemma_fixes(spm):
  """Fix 1: whitespace pieces stored with raw spaces match '  '; fix 2: control tokens in text."""
  assert spm.token_to_id('▁▁') == 7 and spm.token_to_id('  ') is None
  assert spm.encode('a  b', add_bos=False) == [
    *spm.encode('a', add_bos=False),
    7,
    *spm.encode('b', add_bos=False),
  ]
  ids = spm.encode('<start_of_turn>user\nhi<end_of_turn><eos>', add_bos=False)
  assert ids[0] == 5 and ids[-2:] == [6, 1]
  assert spm.decode(ids) == 'user\nhi'
  assert spm.decode(ids, skip_special=False) == '<start_of_turn>user\nhi<end_of_turn><eos>'


def test_spm_chat_template_writes_bos_itself(spm):
  ids = spm.encode_chat([{'role': 'user', 'content': 'hi'}])
  assert ids[0] == 2 and ids.count(2) == 1
  assert (
    spm.decode(ids, skip_special=False)
    == '<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n'
  )


@pytest.mark.parametrize('kind', ['bpe', 'spm'])
def test_add_tokens_and_save_load(kind, tmp_path):
  tok = tokenizer_lib.from_gguf_metadata(_bpe_md() if kind == 'bpe' else _spm_md())
  n = tok.vocab_size
  ids = tok.add_tokens(['<think>', '</think>', '<think>'])
  assert ids == [n, n + 1, n] and tok.vocab_size == n + 2
  assert tok.add_tokens(['<think>']) == [n]  # already there: no growth
  text = 'a<think>b</think>'
  encoded = tok.encode(text, add_bos=False)
  assert n in encoded and n + 1 in encoded
  assert tok.decode(encoded) == 'ab'
  tok.save(tmp_path)
  again = tokenizer_lib.load(tmp_path)
  assert type(again) is type(tok) and again.vocab_size == n + 2
  for t in (text, 'the world  x', '<|im_start|>é'):
    assert again.encode(t) == tok.encode(t)
  assert (again.stop_ids, again.special_ids) == (tok.stop_ids, tok.special_ids)


def test_unsupported_tokenizer_model():
  with pytest.raises(tokenizer_lib.TokenizerError, match="'bert'"):
    tokenizer_lib.from_gguf_metadata({'tokenizer.ggml.model': 'bert'})
