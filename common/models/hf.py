"""The decoder in Hugging Face transformers' layout: config.json, safetensors names, tokenizer.

  hf.save(directory, cfg, params, tokenizer=tok, context_length=2048)   # what transformers loads
  model, cfg, tok = hf.load(directory)                                  # and back, without torch

`params` are decoder parameters by path (`common.models.spec.decoder_params`: float32, vocabulary
unpadded). The family comes from the config (`families.arch_of`): LlamaForCausalLM, Qwen2ForCausalLM
(qkv bias) or Gemma3ForCausalLM (text; the gemma switches). What changes on the way:
  * names: embed.embedding -> model.embed_tokens.weight, layers.i.attn.q_proj.kernel ->
    model.layers.i.self_attn.q_proj.weight, ...; the norms as in common.models.decoder's docstring
    (llama/qwen2 mlp_norm -> post_attention_layernorm; gemma3 post_attn_norm ->
    post_attention_layernorm, mlp_norm -> pre_feedforward_layernorm, post_mlp_norm ->
    post_feedforward_layernorm);
  * kernels (in, out) -> weights (out, in); RoPE needs nothing (both are rotate-half);
  * Gemma norms stay w (transformers' Gemma3RMSNorm applies 1 + w, as the decoder does);
  * tied embeddings: no lm_head.weight, tie_word_embeddings = true; the padded vocabulary's rows
    are dropped (vocab_size is the real one).
Files: model.safetensors (f32, metadata format=pt), config.json (rope in both transformers 5's
`rope_parameters` and the older `rope_theta` form), generation_config.json (stop ids), and the
tokenizer: tokenizer.json (byte-level BPE; a BOS-adding post-processor when the model adds BOS) or
tokenizer.model (sentencepiece), tokenizer_config.json with the chat template and special tokens,
plus our tokenizer_meta.json so `load` gets back exactly the same Tokenizer.

`load` is our reader of such a directory (ours or a transformers checkpoint of these families in
f32/f16, one file or sharded): names mapped back, config rebuilt, a Decoder built.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
import pathlib
from typing import Any

import numpy as np

from common.models import decoder
from common.models import families
from common.models import spec as spec_lib
from common.models import tokenizer as tokenizer_lib

ARCHITECTURES = {  # family -> (transformers class, model_type)
  'llama': ('LlamaForCausalLM', 'llama'),
  'qwen2': ('Qwen2ForCausalLM', 'qwen2'),
  'gemma3': ('Gemma3ForCausalLM', 'gemma3_text'),
}
_MODEL_TYPES = {mt: arch for arch, (_, mt) in ARCHITECTURES.items()}
# transformers needs a number; RoPE itself has no limit. Used when the run did not record one.
DEFAULT_CONTEXT = 4096
WEIGHTS = 'model.safetensors'

_GLOBAL = {
  ('embed', 'embedding'): 'model.embed_tokens.weight',
  ('final_norm', 'scale'): 'model.norm.weight',
  ('lm_head', 'kernel'): 'lm_head.weight',
}
_BLOCK = {
  ('attn_norm', 'scale'): 'input_layernorm.weight',
  **{('attn', f'{p}_proj', 'kernel'): f'self_attn.{p}_proj.weight' for p in 'qkvo'},
  **{('attn', f'{p}_proj', 'bias'): f'self_attn.{p}_proj.bias' for p in 'qkv'},
  **{('attn', f'{p}_norm', 'scale'): f'self_attn.{p}_norm.weight' for p in 'qk'},
  **{('mlp', f'{p}_proj', 'kernel'): f'mlp.{p}_proj.weight' for p in ('gate', 'up', 'down')},
}
_NORMS = {
  'llama': {('mlp_norm', 'scale'): 'post_attention_layernorm.weight'},
  'qwen2': {('mlp_norm', 'scale'): 'post_attention_layernorm.weight'},
  'gemma3': {
    ('post_attn_norm', 'scale'): 'post_attention_layernorm.weight',
    ('mlp_norm', 'scale'): 'pre_feedforward_layernorm.weight',
    ('post_mlp_norm', 'scale'): 'post_feedforward_layernorm.weight',
  },
}


class HFError(spec_lib.SpecError):
  """A directory or config that is not a transformers model of a supported family."""


def hf_name(arch: str, path: tuple) -> str:
  """transformers' state-dict name of a decoder parameter path."""
  path = tuple(path)
  if path in _GLOBAL:
    return _GLOBAL[path]
  block = {**_BLOCK, **_NORMS[arch]}
  if len(path) > 2 and path[0] == 'layers' and tuple(path[2:]) in block:
    return f'model.layers.{int(path[1])}.{block[tuple(path[2:])]}'
  raise HFError(f'decoder parameter {"/".join(map(str, path))} has no {arch} name')


def param_path(arch: str, name: str) -> tuple | None:
  """The decoder path of a transformers name (None for buffers we recompute: rotary inv_freq)."""
  for path, n in _GLOBAL.items():
    if n == name:
      return path
  parts = name.split('.', 3)
  if len(parts) == 4 and parts[:2] == ['model', 'layers'] and parts[2].isdigit():
    for sub, n in {**_BLOCK, **_NORMS[arch]}.items():
      if n == parts[3]:
        return ('layers', int(parts[2]), *sub)
  if name.endswith('rotary_emb.inv_freq'):
    return None
  raise HFError(f'{arch} tensor {name!r} has no place in the decoder')


def to_hf(arch: str, params: Mapping[tuple, np.ndarray]) -> dict[str, np.ndarray]:
  """{transformers name: f32 array}: kernels transposed to (out, in)."""
  out = {}
  for path, w in params.items():
    w = np.asarray(w, np.float32)
    out[hf_name(arch, path)] = np.ascontiguousarray(w.T if path[-1] == 'kernel' else w)
  return out


def from_hf(arch: str, tensors: Mapping[str, np.ndarray], *, tied: bool) -> spec_lib.Params:
  """Decoder params from transformers tensors (a tied model's stored lm_head copy is dropped)."""
  out = {}
  for name, w in tensors.items():
    path = param_path(arch, name)
    if path is None or (tied and path == ('lm_head', 'kernel')):
      continue
    w = np.asarray(w, np.float32)
    out[path] = np.ascontiguousarray(w.T if path[-1] == 'kernel' else w)
  return out


# ---------------------------------------------------------------------------------------------------
# config.json


def config_json(
  cfg: decoder.DecoderConfig,
  *,
  tokenizer: tokenizer_lib.Tokenizer | None = None,
  context_length: int | None = None,
) -> dict[str, Any]:
  """transformers' config.json of `cfg` (families.arch_of picks the family or says why none)."""
  arch = families.arch_of(cfg)
  cls, model_type = ARCHITECTURES[arch]
  theta = float(cfg.rope_theta)
  d: dict[str, Any] = {
    'architectures': [cls],
    'model_type': model_type,
    'vocab_size': cfg.vocab_size,
    'hidden_size': cfg.d_model,
    'intermediate_size': cfg.mlp_dim,
    'num_hidden_layers': cfg.num_layers,
    'num_attention_heads': cfg.num_heads,
    'num_key_value_heads': cfg.num_kv_heads,
    'head_dim': cfg.head_dim,
    'rms_norm_eps': cfg.norm_eps,
    'tie_word_embeddings': cfg.tie_embeddings,
    'max_position_embeddings': int(context_length or DEFAULT_CONTEXT),
    'attention_dropout': 0.0,
    'initializer_range': 0.02,
    'use_cache': True,
    'torch_dtype': 'float32',
    'bos_token_id': getattr(tokenizer, 'bos_id', None),
    'eos_token_id': getattr(tokenizer, 'eos_id', None),
    'pad_token_id': getattr(tokenizer, 'pad_id', None),
  }
  if arch in ('llama', 'qwen2'):
    d.update(
      hidden_act='silu',
      rope_theta=theta,
      rope_parameters={'rope_type': 'default', 'rope_theta': theta},
    )
  if arch == 'llama':
    d.update(attention_bias=False, mlp_bias=False)
  if arch == 'qwen2':
    d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
  if arch == 'gemma3':
    local = float(cfg.rope_local_theta or cfg.rope_theta)
    d.update(
      hidden_activation='gelu_pytorch_tanh',
      query_pre_attn_scalar=_number(cfg.query_pre_attn_scalar or cfg.head_dim),
      # transformers builds the sliding mask even when no layer is local: any value then.
      sliding_window=cfg.sliding_window or int(context_length or DEFAULT_CONTEXT),
      layer_types=[
        'sliding_attention' if cfg.is_local_layer(i) else 'full_attention'
        for i in range(cfg.num_layers)
      ],
      rope_theta=theta,
      rope_local_base_freq=local,
      rope_parameters={
        'full_attention': {'rope_type': 'default', 'rope_theta': theta},
        'sliding_attention': {'rope_type': 'default', 'rope_theta': local},
      },
      attn_logit_softcapping=cfg.attn_logit_softcap,
      final_logit_softcapping=None,
      attention_bias=False,
    )
  return d


def _number(x: float) -> int | float:
  """An integral value as an int (transformers' strict configs type some of these as int)."""
  return int(x) if float(x).is_integer() else float(x)


def _rope_theta(d: Mapping, layer_type: str | None) -> float | None:
  rp = d.get('rope_parameters') or d.get('rope_scaling')
  if rp and layer_type is not None and layer_type in rp:
    rp = rp[layer_type]
  if rp:
    kind = rp.get('rope_type', rp.get('type', 'default'))
    if kind != 'default':
      raise HFError(f'RoPE type {kind!r} (scaling): DecoderConfig has no RoPE scaling')
    if 'rope_theta' in rp:
      return float(rp['rope_theta'])
  return None


def _pattern(layer_types: list[str]) -> int:
  local = [t == 'sliding_attention' for t in layer_types]
  if not any(local):
    return 0
  for n in range(1, len(local) + 1):
    if local == [(i + 1) % n != 0 for i in range(len(local))]:
      return n
  raise HFError(f'layer types {layer_types} are not "every N-th layer global"')


def config_from_json(
  d: Mapping[str, Any], *, dtype: str = 'float32', vocab_pad_multiple: int = 128
) -> decoder.DecoderConfig:
  """The DecoderConfig of a transformers config.json of a supported family."""
  model_type = d.get('model_type')
  if model_type not in _MODEL_TYPES:
    raise HFError(
      f'model_type {model_type!r} is not one of {", ".join(_MODEL_TYPES)} (the families the '
      'decoder computes)'
    )
  arch = _MODEL_TYPES[model_type]
  heads = int(d['num_attention_heads'])
  c: dict[str, Any] = dict(
    vocab_size=int(d['vocab_size']),
    d_model=int(d['hidden_size']),
    num_layers=int(d['num_hidden_layers']),
    num_heads=heads,
    num_kv_heads=int(d.get('num_key_value_heads') or heads),
    head_dim=int(d.get('head_dim') or d['hidden_size'] // heads),
    mlp_dim=int(d['intermediate_size']),
    norm_eps=float(d['rms_norm_eps']),
    tie_embeddings=bool(d.get('tie_word_embeddings', arch == 'gemma3')),
    vocab_pad_multiple=vocab_pad_multiple,
    dtype=dtype,
  )
  if arch == 'gemma3':
    theta = _rope_theta(d, 'full_attention') or float(d.get('rope_theta', 1e6))
    local = _rope_theta(d, 'sliding_attention') or float(d.get('rope_local_base_freq', 1e4))
    pattern = d.get('sliding_window_pattern', 6)
    layer_types = d.get('layer_types') or [
      'sliding_attention' if (i + 1) % pattern else 'full_attention' for i in range(c['num_layers'])
    ]
    pattern = _pattern(layer_types)
    c.update(
      rope_theta=theta,
      activation='gelu_tanh',
      qk_norm=True,
      post_norms=True,
      embed_scale=True,
      norm_plus_one=True,
      sliding_window=int(d['sliding_window']) if pattern else None,
      sliding_window_pattern=pattern,
      rope_local_theta=local,
      attn_logit_softcap=d.get('attn_logit_softcapping') or None,
      query_pre_attn_scalar=float(d.get('query_pre_attn_scalar', 256)),
    )
    if d.get('final_logit_softcapping'):
      raise HFError('final_logit_softcapping is set: DecoderConfig has no such field')
  else:
    c['rope_theta'] = _rope_theta(d, None) or float(d.get('rope_theta', 10000.0))
    if d.get('hidden_act', 'silu') != 'silu':
      raise HFError(f'hidden_act {d.get("hidden_act")!r}: the {arch} decoder uses silu')
    if arch == 'qwen2':
      c['qkv_bias'] = True
      if d.get('use_sliding_window'):
        raise HFError('use_sliding_window is set: the qwen2 decoder attends globally')
    elif d.get('attention_bias') or d.get('mlp_bias'):
      raise HFError('llama attention_bias / mlp_bias: the llama decoder has no biases')
  return decoder.DecoderConfig(**c)


# ---------------------------------------------------------------------------------------------------
# Tokenizer files.


def _token(tok: tokenizer_lib.Tokenizer, i: int | None) -> str | None:
  return None if i is None else tok.id_to_token(i)


def save_tokenizer(
  directory: pathlib.Path, tok: tokenizer_lib.Tokenizer, context_length: int | None
) -> list[str]:
  """Writes the tokenizer as transformers reads it (and our tokenizer_meta.json); returns names."""
  tok.save(directory)  # tokenizer.json or tokenizer.model, and tokenizer_meta.json
  files = ['tokenizer_meta.json']
  if isinstance(tok, tokenizer_lib.BPETokenizer):
    from tokenizers import Tokenizer as HFTokenizer  # noqa: PLC0415
    from tokenizers import processors  # noqa: PLC0415

    backend = HFTokenizer.from_str(tok.backend.to_str())
    if tok.add_bos and tok.bos_id is not None and backend.post_processor is None:
      bos = tok.id_to_token(tok.bos_id)
      backend.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, tok.bos_id)]
      )
    backend.save(str(directory / 'tokenizer.json'))
    files.append('tokenizer.json')
    cls = 'PreTrainedTokenizerFast'
  else:
    files.append('tokenizer.model')
    cls = 'GemmaTokenizer'
  config = {
    'tokenizer_class': cls,
    'bos_token': _token(tok, tok.bos_id),
    'eos_token': _token(tok, tok.eos_id),
    'pad_token': _token(tok, tok.pad_id),
    'unk_token': _token(tok, tok.unk_id),
    'add_bos_token': tok.add_bos,
    'add_eos_token': tok.add_eos,
    'clean_up_tokenization_spaces': False,
    'model_max_length': int(context_length or DEFAULT_CONTEXT),
  }
  if tok.chat_template is not None:
    config['chat_template'] = tok.chat_template
  _write_json(directory / 'tokenizer_config.json', config)
  special = {k: v for k, v in config.items() if k.endswith('_token') and v is not None}
  _write_json(directory / 'special_tokens_map.json', special)
  return [*files, 'tokenizer_config.json', 'special_tokens_map.json']


def _write_json(path: pathlib.Path, obj: Any) -> None:
  tmp = path.with_name(f'.{path.name}.tmp')
  tmp.write_text(json.dumps(obj, indent=2) + '\n')
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# Whole directories.


def save(
  directory: str | os.PathLike,
  cfg: decoder.DecoderConfig,
  params: Mapping[tuple, np.ndarray],
  *,
  tokenizer: tokenizer_lib.Tokenizer | None = None,
  context_length: int | None = None,
) -> list[str]:
  """Writes a transformers model directory (see the module docstring); returns the file names."""
  from safetensors import numpy as st_numpy  # noqa: PLC0415

  directory = pathlib.Path(directory)
  config = config_json(cfg, tokenizer=tokenizer, context_length=context_length)
  arch = families.arch_of(cfg)
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise HFError(f'the tokenizer has {tokenizer.vocab_size} ids > the model\'s {cfg.vocab_size}')
  directory.mkdir(parents=True, exist_ok=True)
  tmp = directory / f'.{WEIGHTS}.tmp'
  st_numpy.save_file(to_hf(arch, params), str(tmp), metadata={'format': 'pt'})
  os.replace(tmp, directory / WEIGHTS)
  _write_json(directory / 'config.json', config)
  files = [WEIGHTS, 'config.json']
  if tokenizer is not None:
    stops = list(tokenizer.stop_ids) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    generation = {'bos_token_id': tokenizer.bos_id, 'eos_token_id': stops or None}
    generation['pad_token_id'] = tokenizer.pad_id
    _write_json(directory / 'generation_config.json', generation)
    files += ['generation_config.json', *save_tokenizer(directory, tokenizer, context_length)]
  return files


def read_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of model.safetensors, or of the shards a model.safetensors.index.json names."""
  from safetensors import numpy as st_numpy  # noqa: PLC0415

  index = directory / f'{WEIGHTS}.index.json'
  if index.is_file():
    shards = sorted(set(json.loads(index.read_text())['weight_map'].values()))
  elif (directory / WEIGHTS).is_file():
    shards = [WEIGHTS]
  else:
    raise HFError(f'{directory} has no {WEIGHTS}')
  out = {}
  for shard in shards:
    out.update(st_numpy.load_file(str(directory / shard)))
  return out


def load(
  directory: str | os.PathLike, *, dtype: str = 'float32', vocab_pad_multiple: int = 128
) -> tuple[decoder.Decoder, decoder.DecoderConfig, tokenizer_lib.Tokenizer | None]:
  """(model, config, tokenizer or None) of a transformers directory of a supported family."""
  directory = pathlib.Path(directory)
  if not (directory / 'config.json').is_file():
    raise HFError(f'{directory} has no config.json')
  cfg = config_from_json(
    json.loads((directory / 'config.json').read_text()),
    dtype=dtype,
    vocab_pad_multiple=vocab_pad_multiple,
  )
  params = from_hf(families.arch_of(cfg), read_tensors(directory), tied=cfg.tie_embeddings)
  model = spec_lib.build(cfg, params)
  tok = None
  if (directory / 'tokenizer_meta.json').is_file():
    tok = tokenizer_lib.load(directory)
  return model, cfg, tok
