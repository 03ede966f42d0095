"""GGUF architectures -> DecoderConfig and decoder parameter paths, one entry per model family.

llama.cpp's GGUF files describe a model twice: hyperparameters as `{arch}.*` metadata keys and
weights as `blk.{i}.*` tensors in the llama.cpp layout. This module is the one place that knows how
each supported architecture maps onto `common.models.decoder` (the loader in
`common.models.loader` only reads, converts and places arrays), so adding a family means adding
one `Family` here.

Conventions chosen (and tested against numpy references and, with real weights, `transformers`):
  * Kernels are (in, out): a GGUF matrix dequantizes to numpy (out, in), HF's nn.Linear layout, and
    is transposed.
  * llama: llama.cpp permutes the Q/K rows of every head (interleaved-pair RoPE); the decoder uses
    HF's rotate-half RoPE, so the rows are un-permuted exactly as transformers does. gemma3 and
    qwen2 are stored unpermuted.
  * gemma3: GGUF stores RMSNorm scales as 1 + w. We subtract 1 and set `norm_plus_one`, so loaded
    parameters equal HF Gemma's (weight decay and adapters see the same numbers as there, and a
    freshly initialised gemma3 model has the same parameterisation as a loaded one).
  * Untied output: a GGUF that stores `output.weight` gets an untied `lm_head` holding it, as
    transformers does. Qwen2.5-0.5B is tied upstream, but this GGUF quantized the head separately
    (Q8_0 vs Q5_0 for the embedding), so keeping it reproduces the reference logits.
  * Metadata the GGUF does not carry falls back to what llama.cpp and transformers assume for the
    architecture (gemma3: every 6th layer global, local RoPE base 1e4, query scale
    head_dim ** -0.5).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import dataclasses
import re
from typing import Any

import numpy as np

from common import errors
from common.models import decoder


class UnsupportedModelError(errors.UserError):
  """A GGUF whose architecture or features the decoder cannot represent; says which."""


@dataclasses.dataclass(frozen=True)
class Family:
  """How one GGUF architecture maps onto the decoder."""

  arch: str
  make_config: Callable[[Mapping[str, Any], Mapping[str, tuple[int, ...]]], decoder.DecoderConfig]
  permuted_qk: bool = False  # llama.cpp's interleaved-RoPE row order in attn_q / attn_k
  norm_offset: float = 0.0  # subtracted from every stored RMSNorm scale


def _get(meta: Mapping[str, Any], arch: str, key: str, default: Any = KeyError) -> Any:
  full = f'{arch}.{key}'
  if full in meta:
    return meta[full]
  if default is KeyError:
    raise UnsupportedModelError(f'GGUF metadata lacks {full!r}, which a {arch} model needs')
  return default


def _reject_unsupported(meta: Mapping[str, Any], arch: str) -> None:
  """Raises for features that change the maths but that DecoderConfig has no field for."""
  scaling = str(_get(meta, arch, 'rope.scaling.type', 'none'))
  factor = float(_get(meta, arch, 'rope.scaling.factor', 1.0))
  if scaling not in ('none', '') and factor != 1.0:
    raise UnsupportedModelError(
      f'{arch} GGUF uses RoPE scaling {scaling!r} (factor {factor}); DecoderConfig has no RoPE '
      'scaling field yet'
    )
  softcap = _get(meta, arch, 'final_logit_softcapping', None)
  if softcap:
    raise UnsupportedModelError(
      f'{arch} GGUF uses a final logit softcap of {softcap}; DecoderConfig has no such field yet'
    )


def _common(meta: Mapping[str, Any], arch: str, shapes: Mapping[str, tuple]) -> dict[str, Any]:
  _reject_unsupported(meta, arch)
  d = int(_get(meta, arch, 'embedding_length'))
  heads = int(_get(meta, arch, 'attention.head_count'))
  if 'token_embd.weight' not in shapes:
    raise UnsupportedModelError(f'{arch} GGUF has no token_embd.weight tensor')
  # The embedding's rows are the vocabulary (`{arch}.vocab_size` is optional and often absent).
  vocab = int(shapes['token_embd.weight'][0])
  meta_vocab = _get(meta, arch, 'vocab_size', vocab)
  if int(meta_vocab) != vocab:
    raise UnsupportedModelError(
      f'{arch} GGUF says vocab_size {meta_vocab} but token_embd has {vocab} rows'
    )
  head_dim = int(_get(meta, arch, 'attention.key_length', d // heads))
  rope_dim = int(_get(meta, arch, 'rope.dimension_count', head_dim))
  if rope_dim != head_dim:
    raise UnsupportedModelError(
      f'{arch} GGUF rotates {rope_dim} of {head_dim} head dimensions (partial RoPE); the decoder '
      'rotates all of them'
    )
  return dict(
    vocab_size=int(vocab),
    d_model=d,
    num_layers=int(_get(meta, arch, 'block_count')),
    num_heads=heads,
    num_kv_heads=int(_get(meta, arch, 'attention.head_count_kv', heads)),
    head_dim=head_dim,
    mlp_dim=int(_get(meta, arch, 'feed_forward_length')),
    rope_theta=float(_get(meta, arch, 'rope.freq_base', 10000.0)),
    norm_eps=float(_get(meta, arch, 'attention.layer_norm_rms_epsilon')),
    tie_embeddings='output.weight' not in shapes,
    attn_logit_softcap=_get(meta, arch, 'attn_logit_softcapping', None) or None,
  )


def _llama(meta, shapes) -> decoder.DecoderConfig:
  return decoder.DecoderConfig(**_common(meta, 'llama', shapes))


def _qwen2(meta, shapes) -> decoder.DecoderConfig:
  return decoder.DecoderConfig(**_common(meta, 'qwen2', shapes), qkv_bias=True)


# llama.cpp (src/llama-model.cpp, LLM_ARCH_GEMMA3) and transformers' Gemma3TextConfig both hard-code
# these when the GGUF does not say otherwise; the HF config of Gemma-3-270M agrees.
GEMMA3_DEFAULT_PATTERN = 6
GEMMA3_DEFAULT_LOCAL_ROPE = 10000.0


def _sliding_pattern(value: Any, num_layers: int) -> int:
  """`attention.sliding_window_pattern`: an int N, or llama.cpp's per-layer bools (True = local)."""
  if isinstance(value, int | np.integer):
    return int(value)
  flags = [bool(v) for v in value]
  for n in range(1, num_layers + 1):
    if flags == [(i + 1) % n != 0 for i in range(len(flags))]:
      return n
  raise UnsupportedModelError(
    f'gemma3 sliding-window layers {flags} are not "every N-th layer global", the only pattern '
    'DecoderConfig can express'
  )


def _gemma3(meta, shapes) -> decoder.DecoderConfig:
  c = _common(meta, 'gemma3', shapes)
  pattern = _get(meta, 'gemma3', 'attention.sliding_window_pattern', GEMMA3_DEFAULT_PATTERN)
  window = _get(meta, 'gemma3', 'attention.sliding_window', None)
  return decoder.DecoderConfig(
    **c,
    activation='gelu_tanh',
    qk_norm=True,
    post_norms=True,
    embed_scale=True,
    norm_plus_one=True,
    sliding_window=int(window) if window else None,
    sliding_window_pattern=_sliding_pattern(pattern, c['num_layers']) if window else 0,
    rope_local_theta=float(_get(meta, 'gemma3', 'rope.freq_base_swa', GEMMA3_DEFAULT_LOCAL_ROPE)),
    # transformers' default query_pre_attn_scalar (256) and llama.cpp's 1/sqrt(head_dim) agree for
    # every Gemma-3 size except 27B (d_model / num_heads); GGUF stores neither, so say it here.
    query_pre_attn_scalar=float(c['head_dim']),
  )


FAMILIES: dict[str, Family] = {
  f.arch: f
  for f in (
    Family('llama', _llama, permuted_qk=True),
    Family('gemma3', _gemma3, norm_offset=1.0),
    Family('qwen2', _qwen2),
  )
}


def family(arch: str) -> Family:
  """The Family of a GGUF `general.architecture`, or a one-line error naming it."""
  try:
    return FAMILIES[arch]
  except KeyError:
    raise UnsupportedModelError(
      f'unsupported GGUF architecture {arch!r}; supported: {", ".join(FAMILIES)}'
    ) from None


def config_from_metadata(
  meta: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> decoder.DecoderConfig:
  """DecoderConfig from GGUF metadata (`general.architecture`, `{arch}.*`) and tensor shapes.

  `shapes` maps GGUF tensor names to their numpy (dequantized) shapes, e.g. token_embd.weight ->
  (vocab, d_model): which tensors exist decides tying, and the embedding decides the vocabulary.
  """
  arch = meta.get('general.architecture')
  if arch is None:
    raise UnsupportedModelError('GGUF metadata has no general.architecture')
  return family(str(arch)).make_config(meta, shapes)


# ---------------------------------------------------------------------------------------------------
# Tensors.

_BLOCK = re.compile(r'^blk\.(\d+)\.(.+)$')
_GLOBAL_NAMES = {
  'token_embd.weight': ('embed', 'embedding'),
  'output_norm.weight': ('final_norm', 'scale'),
  'output.weight': ('lm_head', 'kernel'),
}
_BLOCK_NAMES = {
  'attn_norm.weight': ('attn_norm', 'scale'),
  'attn_q.weight': ('attn', 'q_proj', 'kernel'),
  'attn_k.weight': ('attn', 'k_proj', 'kernel'),
  'attn_v.weight': ('attn', 'v_proj', 'kernel'),
  'attn_q.bias': ('attn', 'q_proj', 'bias'),
  'attn_k.bias': ('attn', 'k_proj', 'bias'),
  'attn_v.bias': ('attn', 'v_proj', 'bias'),
  'attn_output.weight': ('attn', 'o_proj', 'kernel'),
  'attn_q_norm.weight': ('attn', 'q_norm', 'scale'),
  'attn_k_norm.weight': ('attn', 'k_norm', 'scale'),
  'post_attention_norm.weight': ('post_attn_norm', 'scale'),
  'ffn_norm.weight': ('mlp_norm', 'scale'),
  'ffn_gate.weight': ('mlp', 'gate_proj', 'kernel'),
  'ffn_up.weight': ('mlp', 'up_proj', 'kernel'),
  'ffn_down.weight': ('mlp', 'down_proj', 'kernel'),
  'post_ffw_norm.weight': ('post_mlp_norm', 'scale'),
}
# Present in some GGUFs but derivable or unused by this decoder: llama.cpp's precomputed RoPE
# frequencies (we recompute them; llama-3 frequency scaling is rejected via the metadata).
_IGNORED = re.compile(r'^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd)$')


def param_path(name: str) -> tuple[str | int, ...] | None:
  """Decoder parameter path of a GGUF tensor name (None for tensors the decoder does not use)."""
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  m = _BLOCK.match(name)
  if m and m.group(2) in _BLOCK_NAMES:
    return ('layers', int(m.group(1)), *_BLOCK_NAMES[m.group(2)])
  if _IGNORED.match(name):
    return None
  raise UnsupportedModelError(f'GGUF tensor {name!r} has no place in the decoder')


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute` of Q/K rows (convert_hf_to_gguf.py); w is (out, ...).

  llama.cpp stores each head's rows as interleaved (x0, x_half, x1, x_half+1, ...) pairs so that
  adjacent-pair RoPE matches HF's rotate-half; this restores HF's row order.
  """
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's permutation (used by tests to build llama-layout GGUFs)."""
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_decoder(
  fam: Family, cfg: decoder.DecoderConfig, name: str, w: np.ndarray
) -> tuple[tuple[str | int, ...], np.ndarray] | None:
  """(decoder path, f32 array in the decoder's layout) for one dequantized GGUF tensor.

  `w` has numpy's GGUF shape: (out, in) for matrices, as in HF. Returns None for ignored tensors.
  The embedding and lm_head keep the unpadded vocabulary; the loader pads.
  """
  path = param_path(name)
  if path is None:
    return None
  w = np.asarray(w, np.float32)
  leaf, module = path[-1], path[-2]
  if fam.permuted_qk and module in ('q_proj', 'k_proj'):
    w = unpermute_rows(w, cfg.num_heads if module == 'q_proj' else cfg.num_kv_heads)
  if leaf == 'scale' and fam.norm_offset:
    w = w - np.float32(fam.norm_offset)
  if leaf == 'kernel':
    w = w.T
  return path, np.ascontiguousarray(w)


# ---------------------------------------------------------------------------------------------------
# The other way (export): which family a DecoderConfig is, and decoder parameters as GGUF tensors.

# The switches that make a decoder a Gemma-3: all of them, or none.
_GEMMA3_SWITCHES = {
  'activation': 'gelu_tanh',
  'qk_norm': True,
  'post_norms': True,
  'embed_scale': True,
  'norm_plus_one': True,
}


def arch_of(cfg: decoder.DecoderConfig) -> str:
  """The family ('llama' | 'qwen2' | 'gemma3') whose published architecture computes exactly `cfg`.

  gemma3 needs every Gemma switch (gelu_tanh, qk_norm, post_norms, embed_scale, norm_plus_one) and
  no qkv bias; otherwise qkv_bias makes qwen2 and none makes llama, both without sliding windows,
  attention softcaps or a query scale other than head_dim. Anything in between (a llama with
  qk-norm, say) is an UnsupportedModelError naming the switches, since no family computes it.
  """
  gemma = {k: getattr(cfg, k) == v for k, v in _GEMMA3_SWITCHES.items()}
  problems = []
  if any(gemma.values()):
    arch = 'gemma3'
    missing = [k for k, ok in gemma.items() if not ok]
    if missing:
      problems.append(f'gemma3 switches {", ".join(missing)} are not set like the others')
    if cfg.qkv_bias:
      problems.append('qkv_bias (gemma3 has none)')
  else:
    arch = 'qwen2' if cfg.qkv_bias else 'llama'
    if cfg.sliding_window is not None and cfg.sliding_window_pattern:
      problems.append(f'sliding_window={cfg.sliding_window} (only gemma3 has local layers)')
    if cfg.attn_logit_softcap:
      problems.append(f'attn_logit_softcap={cfg.attn_logit_softcap} (only gemma3)')
    if cfg.query_pre_attn_scalar not in (None, float(cfg.head_dim)):
      problems.append(f'query_pre_attn_scalar={cfg.query_pre_attn_scalar} (only gemma3)')
  if problems:
    raise UnsupportedModelError(
      f'this decoder is no {arch} model that other tools can load: {"; ".join(problems)}'
    )
  return arch


_GLOBAL_TENSORS = {v: k for k, v in _GLOBAL_NAMES.items()}
_BLOCK_TENSORS = {v: k for k, v in _BLOCK_NAMES.items()}


def tensor_name(path: tuple[str | int, ...]) -> str:
  """GGUF tensor name of a decoder parameter path (the inverse of `param_path`)."""
  path = tuple(path)
  if path in _GLOBAL_TENSORS:
    return _GLOBAL_TENSORS[path]
  if len(path) > 2 and path[0] == 'layers' and tuple(path[2:]) in _BLOCK_TENSORS:
    return f'blk.{int(path[1])}.{_BLOCK_TENSORS[tuple(path[2:])]}'
  raise UnsupportedModelError(f'decoder parameter {"/".join(map(str, path))} has no GGUF name')


def from_decoder(
  fam: Family, cfg: decoder.DecoderConfig, path: tuple[str | int, ...], w: np.ndarray
) -> tuple[str, np.ndarray]:
  """(GGUF name, f32 array in numpy's GGUF shape) of one decoder parameter: `to_decoder` reversed.

  Kernels are transposed to (out, in), llama's Q/K rows permuted to llama.cpp's order and Gemma's
  norm scales stored as 1 + w. Exact except that last one: (1 + w) - 1 rounds in float32.
  """
  name = tensor_name(path)
  w = np.asarray(w, np.float32)
  leaf, module = path[-1], path[-2]
  if leaf == 'kernel':
    w = w.T
  if leaf == 'scale' and fam.norm_offset:
    w = w + np.float32(fam.norm_offset)
  if fam.permuted_qk and module in ('q_proj', 'k_proj'):
    w = permute_rows(w, cfg.num_heads if module == 'q_proj' else cfg.num_kv_heads)
  return name, np.ascontiguousarray(w)
