"""Tiny GGUF files in each family's llama.cpp layout, plus a numpy reference forward on them.

The reference reads the GGUF tensors as llama.cpp does, independently of common.models.families:
llama rotates adjacent pairs of the stored (permuted) Q/K rows (GGML "normal" RoPE), gemma3 and
qwen2 rotate halves (NeoX), Gemma norms multiply by the stored scale (which already includes the
+1). A loader that gets a transpose, the un-permutation or the norm offset wrong cannot match it.

Weights are random; matrices are written in several quantized types (Q8_0, Q4_1, Q5_0, F16, and
Q4_K / Q6_K from random blocks, since gguf-py cannot quantize K-quants) and the reference uses their
dequantized values, so the check is exact up to float rounding.
"""

from __future__ import annotations

import dataclasses
import pathlib

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType

# GPT-2 byte-level alphabet, for the BPE vocabularies.
_BS = list(range(ord('!'), ord('~') + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
_CS = _BS[:] + [256 + n for n in range(256 - len(_BS))]
_BS += [b for b in range(256) if b not in _BS]
BYTE_CHARS = [chr(c) for _, c in sorted(zip(_BS, _CS, strict=True))]

BPE_SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
BPE_MERGES = [
  ('Ġ', 't'),
  ('h', 'e'),
  ('Ġt', 'he'),
  ('i', 'n'),
  ('Ġ', 'a'),
  ('e', 'r'),
  ('o', 'n'),
  ('Ġ', 'w'),
  ('l', 'l'),
  ('Ġw', 'or'),
  ('o', 'r'),
  ('Ġwor', 'ld'),
  ('l', 'd'),
  ('1', '2'),
  ('Ġ', 'Ġ'),
]
CHATML = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
  " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
  '{{ bos_token }}{% for message in messages %}<start_of_turn>'
  "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
  "{{ message['content'] }}<end_of_turn>\n{% endfor %}"
  '{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}'
)
SPM_PIECES = ['▁', '▁t', 'he', '▁the', 'in', '▁a', 'er', 'on', '▁w', 'll', '▁wor', 'or', 'ld']


def bpe_vocab() -> tuple[list[str], list[int], list[str]]:
  """(tokens, token types, merges) of a small byte-level BPE with ChatML specials first."""
  tokens = BPE_SPECIALS + BYTE_CHARS
  for a, b in BPE_MERGES:
    if a + b not in tokens:
      tokens.append(a + b)
  # 'ld' and 'or' are merged after they are used; make sure every piece exists.
  types = [3] * len(BPE_SPECIALS) + [1] * (len(tokens) - len(BPE_SPECIALS))
  tokens.append('<tool>')  # a user-defined (added, not special) token
  types.append(4)
  return tokens, types, [f'{a} {b}' for a, b in BPE_MERGES]


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
  """(pieces, scores, types) of a small Gemma-style sentencepiece BPE with byte fallback."""
  tokens = ['<pad>', '<eos>', '<bos>', '<unk>', '<mask>', '<start_of_turn>', '<end_of_turn>']
  types = [3, 3, 3, 2, 3, 3, 3]
  tokens += ['  ', '\n']  # whitespace user-defined pieces, the first stored with a raw space pair
  types += [4, 4]
  tokens += [f'<0x{b:02X}>' for b in range(256)]
  types += [6] * 256
  letters = [chr(c) for c in range(ord('a'), ord('z') + 1)]
  tokens += letters + SPM_PIECES
  types += [1] * (len(letters) + len(SPM_PIECES))
  scores = [0.0] * (len(tokens) - len(letters) - len(SPM_PIECES))
  scores += [-100.0 - i for i in range(len(letters))] + [-float(i) for i in range(len(SPM_PIECES))]
  return tokens, scores, types


@dataclasses.dataclass(frozen=True)
class Spec:
  """Shapes of a tiny model of one family."""

  arch: str
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  mlp_dim: int = 256
  rope_theta: float = 10000.0
  eps: float = 1e-5
  untied: bool = False
  sliding_window: int = 3
  sliding_window_pattern: int | None = 2  # None: leave it out of the metadata
  local_rope_theta: float | None = 100.0  # None: leave it out (gemma3 default 1e4)


LLAMA = Spec('llama')
GEMMA3 = Spec('gemma3', num_kv_heads=1, head_dim=32, rope_theta=1e6, eps=1e-6)
QWEN2 = Spec('qwen2', rope_theta=1e6, eps=1e-6, untied=True)


def _tensor_types(name: str) -> Q:
  """A spread of storage types across tensors (each family exercises several)."""
  if name.endswith('norm.weight') or name.endswith('.bias'):
    return Q.F32
  if name == 'token_embd.weight':
    return Q.Q8_0
  if 'ffn_down' in name:
    return Q.Q6_K if name.startswith('blk.0') else Q.Q4_K
  if 'attn_q.' in name or 'ffn_gate' in name:
    return Q.Q4_1
  if 'attn_k.' in name or 'attn_output' in name:
    return Q.Q5_0
  if 'attn_v.' in name:
    return Q.F16
  return Q.Q8_0


def _random_kquant(rng, rows: int, cols: int, qtype: Q) -> np.ndarray:
  """Random but valid K-quant blocks (finite f16 scales), since gguf-py cannot quantize these."""
  block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
  blocks = rng.integers(0, 256, (rows, cols // block_elems, block_bytes), dtype=np.uint8)
  scale = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
  if qtype == Q.Q4_K:  # d, dmin (f16) lead the block
    blocks[..., 0:2] = scale
    blocks[..., 2:4] = scale
  else:  # Q6_K: d (f16) ends the block
    blocks[..., -2:] = scale
  return blocks.reshape(rows, -1)


def write(path: pathlib.Path, spec: Spec, seed: int = 0, *, truncate_to: int | None = None) -> dict:
  """Writes a random model of `spec` to `path`; returns {GGUF tensor name: dequantized float64}."""
  rng = np.random.default_rng(seed)
  w = gguf.GGUFWriter(str(path), spec.arch)
  a = spec.arch
  w.add_string('general.name', f'tiny-{a}')
  w.add_uint32(f'{a}.block_count', spec.num_layers)
  w.add_uint32(f'{a}.context_length', 64)
  w.add_uint32(f'{a}.embedding_length', spec.d_model)
  w.add_uint32(f'{a}.feed_forward_length', spec.mlp_dim)
  w.add_uint32(f'{a}.attention.head_count', spec.num_heads)
  w.add_uint32(f'{a}.attention.head_count_kv', spec.num_kv_heads)
  w.add_float32(f'{a}.rope.freq_base', spec.rope_theta)
  w.add_float32(f'{a}.attention.layer_norm_rms_epsilon', spec.eps)
  if a == 'gemma3':
    w.add_uint32(f'{a}.attention.key_length', spec.head_dim)
    w.add_uint32(f'{a}.attention.value_length', spec.head_dim)
    w.add_uint32(f'{a}.attention.sliding_window', spec.sliding_window)
    if spec.sliding_window_pattern is not None:
      w.add_uint32(f'{a}.attention.sliding_window_pattern', spec.sliding_window_pattern)
    if spec.local_rope_theta is not None:
      w.add_float32(f'{a}.rope.freq_base_swa', spec.local_rope_theta)
  else:
    w.add_uint32(f'{a}.rope.dimension_count', spec.head_dim)

  if a == 'gemma3':
    tokens, scores, types = spm_vocab()
    w.add_string('tokenizer.ggml.model', 'llama')
    w.add_string('tokenizer.ggml.pre', 'default')
    w.add_array('tokenizer.ggml.tokens', tokens)
    w.add_array('tokenizer.ggml.scores', scores)
    w.add_array('tokenizer.ggml.token_type', types)
    w.add_uint32('tokenizer.ggml.bos_token_id', 2)
    w.add_uint32('tokenizer.ggml.eos_token_id', 1)
    w.add_uint32('tokenizer.ggml.unknown_token_id', 3)
    w.add_uint32('tokenizer.ggml.padding_token_id', 0)
    w.add_bool('tokenizer.ggml.add_bos_token', True)
    w.add_bool('tokenizer.ggml.add_space_prefix', False)
    w.add_string('tokenizer.chat_template', GEMMA_TEMPLATE)
  else:
    tokens, types, merges = bpe_vocab()
    w.add_string('tokenizer.ggml.model', 'gpt2')
    w.add_string('tokenizer.ggml.pre', 'qwen2' if a == 'qwen2' else 'smollm')
    w.add_array('tokenizer.ggml.tokens', tokens)
    w.add_array('tokenizer.ggml.token_type', types)
    w.add_array('tokenizer.ggml.merges', merges)
    w.add_uint32('tokenizer.ggml.bos_token_id', 1)
    w.add_uint32('tokenizer.ggml.eos_token_id', 2)
    w.add_uint32('tokenizer.ggml.padding_token_id', 2)
    w.add_bool('tokenizer.ggml.add_bos_token', False)
    w.add_string('tokenizer.chat_template', CHATML)
  vocab = len(tokens)

  d, h, kv, hd, f = spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.mlp_dim
  shapes = {'token_embd.weight': (vocab, d), 'output_norm.weight': (d,)}
  if spec.untied:
    shapes['output.weight'] = (vocab, d)
  for i in range(spec.num_layers):
    p = f'blk.{i}.'
    shapes |= {
      p + 'attn_norm.weight': (d,),
      p + 'attn_q.weight': (h * hd, d),
      p + 'attn_k.weight': (kv * hd, d),
      p + 'attn_v.weight': (kv * hd, d),
      p + 'attn_output.weight': (d, h * hd),
      p + 'ffn_norm.weight': (d,),
      p + 'ffn_gate.weight': (f, d),
      p + 'ffn_up.weight': (f, d),
      p + 'ffn_down.weight': (d, f),
    }
    if a == 'qwen2':
      shapes |= {p + 'attn_q.bias': (h * hd,), p + 'attn_k.bias': (kv * hd,)}
      shapes |= {p + 'attn_v.bias': (kv * hd,)}
    if a == 'gemma3':
      shapes |= {p + 'attn_q_norm.weight': (hd,), p + 'attn_k_norm.weight': (hd,)}
      shapes |= {p + 'post_attention_norm.weight': (d,), p + 'post_ffw_norm.weight': (d,)}

  ref = {}
  for name, shape in shapes.items():
    qtype = _tensor_types(name)
    if name.endswith('norm.weight'):
      # Stored scale: around 1 (Gemma's stored 1 + w as well: the GGUF holds the product's factor).
      x = 1.0 + 0.2 * rng.standard_normal(shape)
    elif name.endswith('.bias'):
      x = 0.5 * rng.standard_normal(shape)
    else:
      x = rng.standard_normal(shape) / np.sqrt(shape[-1]) * (3.0 if 'token_embd' in name else 1.0)
    x = x.astype(np.float32)
    if qtype in (Q.Q4_K, Q.Q6_K):
      raw = _random_kquant(rng, shape[0], shape[1], qtype)
    else:
      raw = gguf.quants.quantize(x, qtype)
    ref[name] = np.asarray(gguf.quants.dequantize(raw, qtype), np.float64).reshape(shape)
    w.add_tensor(name, raw, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  if truncate_to is not None:
    with open(path, 'r+b') as fh:
      fh.truncate(truncate_to)
  return ref


# ---------------------------------------------------------------------------------------------------
# Reference forward (float64 numpy, llama.cpp semantics on the stored tensors).


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, theta, neox: bool):
  """x [T, H, D]; GGML 'normal' mode rotates (x[2i], x[2i+1]), NeoX mode (x[i], x[i + D/2])."""
  d = x.shape[-1]
  freqs = theta ** (-np.arange(0, d, 2) / d)
  ang = pos[:, None, None] * freqs[None, None, :]
  cos, sin = np.cos(ang), np.sin(ang)
  if neox:
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
  a, b = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = a * cos - b * sin
  out[..., 1::2] = a * sin + b * cos
  return out


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def reference_logits(ref: dict, spec: Spec, tokens: np.ndarray) -> np.ndarray:
  """Logits [T, vocab] of one unpadded token sequence."""
  gemma = spec.arch == 'gemma3'
  t = len(tokens)
  pos = np.arange(t, dtype=np.float64)
  x = ref['token_embd.weight'][tokens]
  if gemma:
    x = x * np.sqrt(spec.d_model)
  h, kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
  for i in range(spec.num_layers):
    p = f'blk.{i}.'
    y = _rms(x, ref[p + 'attn_norm.weight'], spec.eps)
    q = y @ ref[p + 'attn_q.weight'].T + ref.get(p + 'attn_q.bias', 0.0)
    k = y @ ref[p + 'attn_k.weight'].T + ref.get(p + 'attn_k.bias', 0.0)
    v = y @ ref[p + 'attn_v.weight'].T + ref.get(p + 'attn_v.bias', 0.0)
    q, k, v = q.reshape(t, h, hd), k.reshape(t, kv, hd), v.reshape(t, kv, hd)
    local = gemma and (i + 1) % (spec.sliding_window_pattern or 6) != 0
    theta = spec.rope_theta
    if gemma:
      q = _rms(q, ref[p + 'attn_q_norm.weight'], spec.eps)
      k = _rms(k, ref[p + 'attn_k_norm.weight'], spec.eps)
      if local:
        theta = spec.local_rope_theta or 10000.0
    q, k = (
      _rope(q, pos, theta, neox=spec.arch != 'llama'),
      _rope(k, pos, theta, spec.arch != 'llama'),
    )
    k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)
    s = np.einsum('thd,shd->hts', q, k) / np.sqrt(hd)
    allowed = np.tril(np.ones((t, t), bool))
    if local:
      allowed &= (np.arange(t)[:, None] - np.arange(t)[None, :]) < spec.sliding_window
    s = np.where(allowed, s, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    o = np.einsum('hts,shd->thd', pr, v).reshape(t, h * hd) @ ref[p + 'attn_output.weight'].T
    if gemma:
      o = _rms(o, ref[p + 'post_attention_norm.weight'], spec.eps)
    x = x + o
    y = _rms(x, ref[p + 'ffn_norm.weight'], spec.eps)
    g = y @ ref[p + 'ffn_gate.weight'].T
    act = _gelu_tanh(g) if gemma else g / (1 + np.exp(-g))
    m = (act * (y @ ref[p + 'ffn_up.weight'].T)) @ ref[p + 'ffn_down.weight'].T
    if gemma:
      m = _rms(m, ref[p + 'post_ffw_norm.weight'], spec.eps)
    x = x + m
  x = _rms(x, ref['output_norm.weight'], spec.eps)
  return x @ ref.get('output.weight', ref['token_embd.weight']).T


def load_private(root: pathlib.Path, spec: Spec = LLAMA):
  """(model, config, tokenizer) of a tiny GGUF written under `root`, converted in a private cache
  there (so a test never reads or fills the user's cache)."""
  import pytest  # noqa: PLC0415

  from common.models import loader  # noqa: PLC0415

  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('MONOREPO_CACHE_DIR', str(root / 'cache'))
    write(root / 'tiny.gguf', spec)
    return loader.load_pretrained(root / 'tiny.gguf')
