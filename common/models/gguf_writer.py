"""Decoder parameters + tokenizer -> a float32 GGUF that `common.models.loader` reads (llama.cpp's
layout): the reverse of the loader's conversion.

  gguf_writer.write(path, cfg, params, tokenizer, context_length=64, name='my-run')

Tensors go through `families.from_decoder` (kernels to (out, in), llama's Q/K rows permuted to
llama.cpp's interleaved order, Gemma norms stored as 1 + w, vocabulary unpadded), metadata is what
`families.config_from_metadata` reads back, and the tokenizer is written as GGUF tokenizer metadata:
a byte-level BPE as `gpt2` (tokens by id in GPT-2's byte alphabet, merges, token types: control for
special ids, user-defined for other added tokens; `tokenizer.ggml.pre` from the tokenizer) and a
sentencepiece model as `llama` (pieces, scores, types). A tokenizer smaller than the model's
vocabulary is padded with unused `<|export_pad_i|>` tokens (llama.cpp expects one token per row).

Exact for llama and qwen2 (the loader gets back the same float32 numbers); Gemma's norms round once,
(1 + w) - 1 in float32. Gemma-3 GGUFs cannot say query_pre_attn_scalar (readers assume head_dim), so
a config with another value is refused rather than written wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
import pathlib

import numpy as np

from common.models import decoder
from common.models import families
from common.models import spec as spec_lib
from common.models import tokenizer as tokenizer_lib


class GGUFWriteError(spec_lib.SpecError):
  """A model or tokenizer this writer cannot express as GGUF; says what."""


def _metadata(w, arch: str, cfg: decoder.DecoderConfig, context_length: int | None) -> None:
  a = arch
  w.add_uint32(f'{a}.block_count', cfg.num_layers)
  if context_length:
    w.add_uint32(f'{a}.context_length', int(context_length))
  w.add_uint32(f'{a}.embedding_length', cfg.d_model)
  w.add_uint32(f'{a}.feed_forward_length', cfg.mlp_dim)
  w.add_uint32(f'{a}.attention.head_count', cfg.num_heads)
  w.add_uint32(f'{a}.attention.head_count_kv', cfg.num_kv_heads)
  w.add_uint32(f'{a}.attention.key_length', cfg.head_dim)
  w.add_uint32(f'{a}.attention.value_length', cfg.head_dim)
  w.add_uint32(f'{a}.rope.dimension_count', cfg.head_dim)
  w.add_uint32(f'{a}.vocab_size', cfg.vocab_size)
  w.add_float32(f'{a}.rope.freq_base', float(cfg.rope_theta))
  w.add_float32(f'{a}.attention.layer_norm_rms_epsilon', float(cfg.norm_eps))
  if cfg.attn_logit_softcap:
    w.add_float32(f'{a}.attn_logit_softcapping', float(cfg.attn_logit_softcap))
  if arch == 'gemma3':
    if cfg.query_pre_attn_scalar not in (None, float(cfg.head_dim)):
      raise GGUFWriteError(
        f'gemma3 GGUF cannot store query_pre_attn_scalar={cfg.query_pre_attn_scalar} (readers use '
        f'head_dim {cfg.head_dim}); export --format=safetensors instead'
      )
    if any(cfg.is_local_layer(i) for i in range(cfg.num_layers)):
      w.add_uint32(f'{a}.attention.sliding_window', int(cfg.sliding_window))
      w.add_uint32(f'{a}.attention.sliding_window_pattern', int(cfg.sliding_window_pattern))
      w.add_float32(f'{a}.rope.freq_base_swa', float(cfg.rope_local_theta or cfg.rope_theta))


def _pad_token(i: int) -> str:
  """The token string of padding row i (the model's rows past the tokenizer's ids): a name no
  real vocabulary uses, so a GGUF reader sees a full, unique token list."""
  return f'<|export_pad_{i}|>'


def _bpe_metadata(w, tok: tokenizer_lib.BPETokenizer, vocab: int) -> None:
  backend = tok.backend
  n = tok.vocab_size
  added = backend.get_added_tokens_decoder()
  tokens, types = [], []
  for i in range(n):
    t = backend.id_to_token(i)
    if t is None:
      raise GGUFWriteError(f'tokenizer id {i} has no token (ids must be contiguous)')
    tokens.append(t)
    if i in tok.special_ids:
      types.append(tokenizer_lib.CONTROL)
    elif i in added:
      types.append(tokenizer_lib.USER_DEFINED)
    else:
      types.append(tokenizer_lib.NORMAL)
  model = json.loads(backend.to_str())['model']
  if model.get('type') != 'BPE':
    raise GGUFWriteError(f'a {model.get("type")} tokenizer is not a BPE: GGUF cannot hold it')
  merges = [m if isinstance(m, str) else ' '.join(m) for m in model.get('merges', [])]
  pre = tok.meta.get('pre') or spec_lib._pre_name(backend)  # noqa: SLF001 - one module's helper
  if pre not in tokenizer_lib.PRE_TOKENIZERS:
    raise GGUFWriteError(
      f'the tokenizer\'s pre-tokenizer ({pre!r}) has no GGUF name the loader reads '
      f'({", ".join(sorted(tokenizer_lib.PRE_TOKENIZERS))})'
    )
  pad = [_pad_token(i) for i in range(n, vocab)]
  w.add_string('tokenizer.ggml.model', 'gpt2')
  w.add_string('tokenizer.ggml.pre', pre)
  w.add_array('tokenizer.ggml.tokens', tokens + pad)
  w.add_array('tokenizer.ggml.token_type', types + [tokenizer_lib.UNUSED] * len(pad))
  w.add_array('tokenizer.ggml.merges', merges)


def _spm_metadata(w, tok: tokenizer_lib.SentencePieceTokenizer, vocab: int) -> None:
  from sentencepiece import sentencepiece_model_pb2 as pb  # noqa: PLC0415

  proto = pb.ModelProto.FromString(tok.proto_bytes)
  pieces = [p.piece for p in proto.pieces]
  scores = [float(p.score) for p in proto.pieces]
  types = [int(p.type) for p in proto.pieces]  # sentencepiece's enum is llama.cpp's token type
  pad = vocab - len(pieces)
  w.add_string('tokenizer.ggml.model', 'llama')
  w.add_string('tokenizer.ggml.pre', 'default')
  w.add_array('tokenizer.ggml.tokens', pieces + [_pad_token(i) for i in range(len(pieces), vocab)])
  w.add_array('tokenizer.ggml.scores', scores + [0.0] * pad)
  w.add_array('tokenizer.ggml.token_type', types + [tokenizer_lib.UNUSED] * pad)
  w.add_bool('tokenizer.ggml.add_space_prefix', bool(proto.normalizer_spec.add_dummy_prefix))


def _tokenizer_metadata(w, tok: tokenizer_lib.Tokenizer, vocab: int) -> None:
  if tok.vocab_size > vocab:
    raise GGUFWriteError(f'the tokenizer has {tok.vocab_size} ids > the model\'s {vocab}')
  if isinstance(tok, tokenizer_lib.BPETokenizer):
    _bpe_metadata(w, tok, vocab)
  elif isinstance(tok, tokenizer_lib.SentencePieceTokenizer):
    _spm_metadata(w, tok, vocab)
  else:
    raise GGUFWriteError(f'{type(tok).__name__} has no GGUF form')
  for key, value in (
    ('bos_token_id', tok.bos_id),
    ('eos_token_id', tok.eos_id),
    ('padding_token_id', tok.pad_id),
    ('unknown_token_id', tok.unk_id),
  ):
    if value is not None:
      w.add_uint32(f'tokenizer.ggml.{key}', int(value))
  w.add_bool('tokenizer.ggml.add_bos_token', bool(tok.add_bos))
  w.add_bool('tokenizer.ggml.add_eos_token', bool(tok.add_eos))
  if tok.chat_template is not None:
    w.add_string('tokenizer.chat_template', tok.chat_template)


def write(
  path: str | os.PathLike,
  cfg: decoder.DecoderConfig,
  params: Mapping[tuple, np.ndarray],
  tokenizer: tokenizer_lib.Tokenizer,
  *,
  context_length: int | None = None,
  name: str | None = None,
) -> None:
  """Writes a float32 GGUF of the decoder (see the module docstring), atomically."""
  import gguf  # noqa: PLC0415

  if tokenizer is None:
    raise GGUFWriteError(
      'GGUF files carry their tokenizer, and this run trained on token ids with none: export '
      '--format=safetensors instead'
    )
  arch = families.arch_of(cfg)
  fam = families.family(arch)
  path = pathlib.Path(path)
  tmp = path.with_name(f'.{path.name}.tmp')
  w = gguf.GGUFWriter(str(tmp), arch)
  try:
    if name:
      w.add_string('general.name', name)
    w.add_uint32('general.file_type', int(gguf.LlamaFileType.ALL_F32))
    _metadata(w, arch, cfg, context_length)
    _tokenizer_metadata(w, tokenizer, cfg.vocab_size)
    order = sorted(params, key=_tensor_order)
    for p in order:
      tensor_name, array = families.from_decoder(fam, cfg, p, params[p])
      w.add_tensor(tensor_name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
  finally:
    w.close()
  os.replace(tmp, path)


def _tensor_order(path: tuple) -> tuple:
  """token_embd, the blocks in order, output_norm, output (llama.cpp's usual order)."""
  if path[0] == 'embed':
    return (0, 0, '')
  if path[0] == 'layers':
    return (1, int(path[1]), '/'.join(map(str, path[2:])))
  return (2, 0 if path[0] == 'final_norm' else 1, '')
