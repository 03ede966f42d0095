"""`WORKDIR/model.json`: how to rebuild the decoder LM a run trains, so it can leave the run.

A run that trains a `common.models.decoder.Decoder` (alone, wrapped, or with adapters) records,
once its `train_loop.Run` exists:

  spec.write(run.workdir, decoder_config, tokenizer=..., path=(), adapters=None, context_length=...)

  model.json = {
    "version": 1,
    "config": {...},             # dataclasses.asdict(DecoderConfig)
    "path": ["lm"],              # where the Decoder sits in the train state's 'model' subtree
    "tokenizer": {"pretrained": "smollm2"}   # common.models.loader's converted tokenizer
               | {"dir": "tokenizer"}        # a Tokenizer.save() directory inside the workdir
               | {"file": "tokenizer.json", "eos": "<|endoftext|>"}  # a bare `tokenizers` file
               | null,                       # token ids only (e.g. the Markov language)
    "adapters": {"kind": "none"}
              | {"kind": "mergeable", "method": "lora", "layers": {path: {"rank": r, "alpha": a}}}
              | {"kind": "mixture", "method": "...", "layers": {path: ...}, ...},
    "context_length": 64 | null  # the longest sequence the run trained on / the model's context
  }

Everything a reader needs follows from that plus the newest checkpoint: `restore` reads the model
parameters with `common.checkpoint.restore_params` onto an abstract Decoder (with LoRA wrappers
where the adapters are mergeable; their fingerprints are verified), `load_model` gives (model,
tokenizer) for chatting (`python -m common.models.generate --workdir=RUN`), and `common.export`
writes Hugging Face safetensors or GGUF files. Mixture adapters (input-dependent routing, built by a
paper's own modules) cannot be rebuilt here, so they are read as raw arrays (`restore_mixture`) and
exported beside the base model, never merged into it.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import json
import os
import pathlib
import re
from typing import Any

from flax import nnx
import jax
import numpy as np

from common import checkpoint as ckpt_lib
from common import errors
from common import sharding
from common.adapters import core
from common.adapters import lora
from common.models import decoder
from common.models import loader
from common.models import tokenizer as tokenizer_lib

FILE = 'model.json'
VERSION = 1
ADAPTER_KINDS = ('none', 'mergeable', 'mixture')
_TOKENIZER_KINDS = ('pretrained', 'dir', 'file')

Params = dict[tuple[str | int, ...], np.ndarray]


class SpecError(errors.UserError):
  """A workdir without a usable model description, or a request it cannot serve."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """model.json, parsed; `workdir` is where it was read (tokenizer paths are relative to it)."""

  config: decoder.DecoderConfig
  path: tuple[str, ...] = ()
  tokenizer: dict | None = None
  adapters: dict = dataclasses.field(default_factory=lambda: {'kind': 'none'})
  context_length: int | None = None
  workdir: pathlib.Path | None = None

  @property
  def adapter_kind(self) -> str:
    return self.adapters['kind']

  def to_json(self) -> dict:
    return {
      'version': VERSION,
      'config': dataclasses.asdict(self.config),
      'path': list(self.path),
      'tokenizer': self.tokenizer,
      'adapters': self.adapters,
      'context_length': self.context_length,
    }


# ---------------------------------------------------------------------------------------------------
# Describing adapters.


def lora_adapters(layers: Mapping[str, int], alpha: float | None = None) -> dict:
  """The model.json entry of `common.adapters.lora.LoRA` adapters: {layer path: rank}; `alpha` as
  given to lora.factory / LoRA (None: the rank, i.e. scaling 1)."""
  return {
    'kind': 'mergeable',
    'method': 'lora',
    'layers': {str(p): {'rank': int(r), 'alpha': alpha} for p, r in layers.items()},
  }


def mixture_adapters(method: str, layers: Mapping[str, Any], **info: Any) -> dict:
  """The model.json entry of input-dependent adapters on `layers` (their paths; the values and
  `info` are the paper's own description, e.g. its adapter plan, kept for whoever rebuilds them)."""
  return {'kind': 'mixture', 'method': method, 'layers': dict(layers), **info}


def _check_adapters(adapters: Mapping) -> dict:
  adapters = json.loads(json.dumps(dict(adapters)))  # JSON-able, and a copy
  kind = adapters.get('kind')
  if kind not in ADAPTER_KINDS:
    raise SpecError(f'adapters kind {kind!r} is not one of {", ".join(ADAPTER_KINDS)}')
  if kind == 'mergeable' and adapters.get('method') != 'lora':
    raise SpecError(f'mergeable adapters of method {adapters.get("method")!r}: only lora is known')
  if kind != 'none' and not adapters.get('layers'):
    raise SpecError(f'{kind} adapters need their layer paths ("layers")')
  return adapters


# ---------------------------------------------------------------------------------------------------
# Writing and reading model.json.


def write(
  workdir: str | os.PathLike,
  config: decoder.DecoderConfig,
  *,
  tokenizer: str | tokenizer_lib.Tokenizer | Mapping | None = None,
  path: Sequence[str] = (),
  adapters: Mapping | None = None,
  context_length: int | None = None,
) -> ModelSpec:
  """Writes WORKDIR/model.json (process 0, atomically) and returns what it says.

  tokenizer: a pretrained model name or GGUF path (its loader-converted tokenizer), a Tokenizer
    (saved into WORKDIR/tokenizer/), a dict as in the module docstring, or None.
  path: attribute path of the Decoder inside the train state's model (GEM's wrapper: ('lm',)).
  adapters: `lora_adapters(...)`, `mixture_adapters(...)` or None (no adapters).
  """
  workdir = pathlib.Path(workdir)
  if isinstance(tokenizer, tokenizer_lib.Tokenizer):
    if jax.process_index() == 0:
      tokenizer.save(workdir / 'tokenizer')
    tokenizer = {'dir': 'tokenizer'}
  elif isinstance(tokenizer, str | os.PathLike):
    tokenizer = {'pretrained': _pretrained_name(tokenizer)}
  elif tokenizer is not None:
    tokenizer = dict(tokenizer)
    if len(set(tokenizer) & set(_TOKENIZER_KINDS)) != 1:
      raise SpecError(f'tokenizer entry {tokenizer} names none (or several) of {_TOKENIZER_KINDS}')
  spec = ModelSpec(
    config=config,
    path=tuple(str(p) for p in path),
    tokenizer=tokenizer,
    adapters=_check_adapters(adapters or {'kind': 'none'}),
    context_length=None if context_length is None else int(context_length),
    workdir=workdir,
  )
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / f'.{FILE}.tmp'
    tmp.write_text(json.dumps(spec.to_json(), indent=1) + '\n')
    os.replace(tmp, workdir / FILE)
  return spec


def _pretrained_name(name: str | os.PathLike) -> str:
  """An asset name stays a name; a GGUF path becomes absolute (the workdir may move, not it)."""
  p = pathlib.Path(name)
  return str(p.absolute()) if p.suffix == '.gguf' or p.is_file() else str(name)


def read(workdir: str | os.PathLike) -> ModelSpec:
  """WORKDIR/model.json as a ModelSpec; a missing or malformed file is a one-line SpecError."""
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise SpecError(f'{workdir} is not a run directory')
  file = workdir / FILE
  if not file.is_file():
    raise SpecError(
      f'{file} does not exist: this run did not record its model (only runs that train a '
      'common.models.decoder LM write it)'
    )
  try:
    d = json.loads(file.read_text())
    if d.get('version') != VERSION:
      raise SpecError(f'{file}: version {d.get("version")!r}, expected {VERSION}')
    return ModelSpec(
      config=decoder.DecoderConfig.from_dict(d['config']),
      path=tuple(d.get('path') or ()),
      tokenizer=d.get('tokenizer'),
      adapters=_check_adapters(d.get('adapters') or {'kind': 'none'}),
      context_length=d.get('context_length'),
      workdir=workdir,
    )
  except (ValueError, KeyError, TypeError) as e:
    raise SpecError(f'{file} is malformed: {e}') from None


# ---------------------------------------------------------------------------------------------------
# Tokenizers.


def file_tokenizer(
  path: str | os.PathLike, *, eos: str | None = None, bos: str | None = None, add_bos: bool = False
) -> tokenizer_lib.BPETokenizer:
  """A bare `tokenizers` JSON file (e.g. lm_pretrain's tokenizer.json) behind the Tokenizer API.

  `eos` / `bos` name special tokens in it (eos also ends a generated reply); the file's added
  special tokens are the special ids. It has no chat template, so prompts are continued as text.
  """
  from tokenizers import Tokenizer as HFTokenizer  # noqa: PLC0415

  path = pathlib.Path(path)
  if not path.is_file():
    raise SpecError(f'tokenizer file {path} does not exist')
  backend = HFTokenizer.from_file(str(path))
  ids = {t: backend.token_to_id(t) for t in (eos, bos) if t is not None}
  missing = [t for t, i in ids.items() if i is None]
  if missing:
    raise SpecError(f'{path} has no token {missing[0]!r}')
  special = [i for i, t in backend.get_added_tokens_decoder().items() if t.special]
  eos_id = ids.get(eos)
  return tokenizer_lib.BPETokenizer(
    backend,
    {
      'bos_id': ids.get(bos),
      'eos_id': eos_id,
      'add_bos': add_bos,
      'special_ids': sorted(special),
      'stop_ids': [] if eos_id is None else [eos_id],
      'pre': _pre_name(backend),
    },
  )


def _pre_name(backend) -> str | None:
  """'gpt2' for a byte-level BPE with GPT-2's split (what common.models.bpe trains), else None."""
  pre = json.loads(backend.to_str()).get('pre_tokenizer') or {}
  if pre.get('type') == 'ByteLevel' and pre.get('use_regex', True):
    return 'gpt2'
  return None


def tokenizer_from_vocab(
  tokens: Sequence[str],
  *,
  specials: Sequence[str],
  bos: str | None = None,
  eos: str | None = None,
  pad: str | None = None,
  add_bos: bool = False,
) -> tokenizer_lib.BPETokenizer:
  """A tokenizer whose ids are exactly `tokens` (id i = tokens[i]): a byte-level BPE with no merges.

  For small hand-made vocabularies (a character LM's): every non-special token must be one
  printable ASCII character other than space (GPT-2's byte alphabet spells those as themselves), so
  the same file is a valid byte-level BPE for `tokenizers`, transformers and GGUF readers.
  """
  from tokenizers import AddedToken  # noqa: PLC0415
  from tokenizers import Tokenizer as HFTokenizer  # noqa: PLC0415
  from tokenizers import decoders  # noqa: PLC0415
  from tokenizers import models  # noqa: PLC0415
  from tokenizers import pre_tokenizers  # noqa: PLC0415

  specials = list(specials)
  bad = [t for t in tokens if t not in specials and not (len(t) == 1 and '!' <= t <= '~')]
  if bad:
    raise SpecError(f'tokens {bad[:5]} are not single printable ASCII characters')
  if len(set(tokens)) != len(tokens):
    raise SpecError('tokens repeat')
  vocab = {t: i for i, t in enumerate(tokens)}
  backend = HFTokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
  eos_id = vocab.get(eos) if eos else None
  return tokenizer_lib.BPETokenizer(
    backend,
    {
      'bos_id': vocab.get(bos) if bos else None,
      'eos_id': eos_id,
      'pad_id': vocab.get(pad) if pad else None,
      'add_bos': add_bos,
      'special_ids': sorted(vocab[t] for t in specials),
      'stop_ids': [] if eos_id is None else [eos_id],
      'pre': 'gpt2',
    },
  )


def load_tokenizer(spec: ModelSpec) -> tokenizer_lib.Tokenizer | None:
  """The run's tokenizer, or None when it trained on token ids alone."""
  t = spec.tokenizer
  if t is None:
    return None
  if 'pretrained' in t:
    return loader.load_tokenizer(t['pretrained'])
  if 'dir' in t:
    directory = spec.workdir / t['dir']
    if not (directory / 'tokenizer_meta.json').is_file():
      raise SpecError(f'{directory} holds no saved tokenizer')
    return tokenizer_lib.load(directory)
  return file_tokenizer(
    spec.workdir / t['file'], eos=t.get('eos'), bos=t.get('bos'), add_bos=t.get('add_bos', False)
  )


# ---------------------------------------------------------------------------------------------------
# Parameters: restored from the newest checkpoint, as a model or as flat arrays.


class _FixedKeys:
  """Stands in for nnx.Rngs when building adapters abstractly: LoRA only calls `params()`, and the
  values are never used (a real nnx.Rngs inside eval_shape costs O(draws^2); smore.KeyStream)."""

  def params(self) -> jax.Array:
    return jax.random.key(0)


def _add_lora(model: nnx.Module, adapters: Mapping, dtype: str) -> None:
  layers = adapters['layers']

  def make(path: str, linear: nnx.Linear) -> lora.LoRA:
    knob = layers[path]
    return lora.LoRA(
      linear.in_features,
      linear.out_features,
      rank=knob['rank'],
      alpha=knob.get('alpha'),
      axes=lora.kernel_axes(linear),
      dtype=dtype,
      rngs=_FixedKeys(),
    )

  pattern = '|'.join(re.escape(p) for p in layers)
  core.wrap(model, pattern, make)
  core.freeze_base(model)


def _abstract(spec: ModelSpec, cfg: decoder.DecoderConfig, with_adapters: bool):
  """(graphdef, abstract state on one device) of the Decoder, LoRA-wrapped when asked."""
  captured = {}

  def split():
    with sharding.unsharded():
      model = decoder.Decoder(cfg, rngs=nnx.Rngs(0))
      if with_adapters:
        _add_lora(model, spec.adapters, cfg.dtype)
      captured['graphdef'], state = nnx.split(model)
    return state

  state = jax.eval_shape(split)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
  return captured['graphdef'], state


def latest_step(workdir: str | os.PathLike) -> int:
  """The newest checkpoint step of a run (what `restore` reads); a SpecError when there is none."""
  ckpts = pathlib.Path(workdir) / 'checkpoints'
  steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
  if not steps:
    raise SpecError(f'{workdir} has no checkpoint yet (nothing trained to export)')
  return max(steps)


def restore(
  workdir: str | os.PathLike, *, adapters: str = 'merge', dtype: str | None = None
) -> tuple[nnx.Module, ModelSpec]:
  """(model, spec) from the run's newest checkpoint, on the first local device.

  adapters: for mergeable (LoRA) runs, 'merge' folds them into the base kernels (core.merge; the
    model is then a plain Decoder), 'apply' keeps them as AdaptedLinear layers, 'none' drops them
    (the frozen base). Mixture runs accept 'none' only: their adapters are a paper's own modules.
  dtype: compute dtype (default the run's).
  """
  if adapters not in ('merge', 'apply', 'none'):
    raise SpecError(f"adapters={adapters!r}: use 'merge', 'apply' or 'none'")
  spec = read(workdir)
  cfg = spec.config if dtype is None else dataclasses.replace(spec.config, dtype=dtype)
  kind = spec.adapter_kind
  if kind == 'mixture':
    if adapters != 'none':
      raise SpecError(
        f'{spec.workdir}: its {spec.adapters.get("method")} adapters route by input, so they '
        'cannot be merged, and their modules live in the paper that trained them: use '
        "adapters='none' for the base model (common.export writes base + adapters separately)"
      )
    base, _, _ = restore_mixture(workdir)
    return build(cfg, base), spec
  graphdef, state = _abstract(spec, cfg, with_adapters=kind == 'mergeable')
  latest_step(workdir)
  target = state
  for key in reversed(spec.path):
    target = nnx.State({key: target})
  try:
    restored = ckpt_lib.restore_params(workdir, target)
  except ckpt_lib.CheckpointError as e:
    raise SpecError(f'{spec.workdir}: {e} (does model.json describe this run?)') from e
  for key in spec.path:
    restored = restored[key]
  model = nnx.merge(graphdef, restored)
  if kind == 'mergeable':
    if adapters == 'apply':
      return model, spec
    if adapters == 'merge':
      core.merge(model)
    model = build(cfg, decoder_params(model))
  return model, spec


def decoder_params(model: nnx.Module) -> Params:
  """{decoder parameter path: float32 numpy array} of a Decoder, with the vocabulary unpadded.

  A LoRA-wrapped Decoder gives its base kernels (`core.merge` first to include the adapters); the
  paths are those of the plain Decoder (common.models.families' table).
  """
  cfg = model.cfg
  out: Params = {}
  for path, var in nnx.to_flat_state(nnx.state(model)):
    if 'adapter' in path:
      continue
    path = tuple(p for p in path if p != 'base')
    out[path] = np.asarray(jax.device_get(var.get_value()), np.float32)
  return _unpad(cfg, out)


def _unpad(cfg: decoder.DecoderConfig, params: Params) -> Params:
  v = cfg.vocab_size
  out = dict(params)
  out[('embed', 'embedding')] = out[('embed', 'embedding')][:v]
  if ('lm_head', 'kernel') in out:
    out[('lm_head', 'kernel')] = out[('lm_head', 'kernel')][:, :v]
  return out


def build(cfg: decoder.DecoderConfig, params: Mapping[tuple, np.ndarray]) -> decoder.Decoder:
  """A Decoder on the first local device holding `params` (decoder paths; vocabulary unpadded or
  padded: padding rows are zeros). Every parameter must be given, with the decoder's shape."""
  graphdef, state = nnx.split(loader.abstract_model(cfg))
  device = jax.local_devices()[0]
  leaves, missing = [], []
  given = {tuple(k): v for k, v in params.items()}
  for path, var in nnx.to_flat_state(state):
    shape = var.get_value().shape
    if path not in given:
      missing.append('/'.join(map(str, path)))
      continue
    value = np.asarray(given.pop(path), np.float32)
    if value.shape != shape:
      if path[0] in ('embed', 'lm_head') and value.ndim == 2:
        value = _pad_vocab(value, shape)
      else:
        raise SpecError(
          f'parameter {"/".join(map(str, path))} has shape {value.shape}, not {shape}'
        )
    leaves.append((path, var.replace(jax.device_put(value, device))))
  if missing or given:
    extra = ['/'.join(map(str, p)) for p in given]
    raise SpecError(
      f'parameters do not fit the decoder: missing {missing[:4]}, unexpected {extra[:4]}'
    )
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _pad_vocab(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  out = np.zeros(shape, np.float32)
  if any(have > want for have, want in zip(value.shape, shape, strict=True)):
    raise SpecError(f'a vocabulary of shape {value.shape} does not fit {shape}')
  out[tuple(slice(0, n) for n in value.shape)] = value
  return out


def restore_mixture(workdir: str | os.PathLike) -> tuple[Params, dict[str, dict], int]:
  """(base decoder params, {layer path: {adapter leaf path: array}}, step) of a mixture run.

  Read without the paper's modules (`checkpoint.restore_tree`, fingerprints verified): each adapted
  layer's 'base' subtree gives the frozen kernel, its 'adapter' subtree the adapter's arrays.
  """
  spec = read(workdir)
  latest_step(workdir)
  try:
    step, tree = ckpt_lib.restore_tree(workdir, ('model', *spec.path))
  except ckpt_lib.CheckpointError as e:
    raise SpecError(str(e)) from e
  base: Params = {}
  adapters: dict[str, dict] = {}
  for keys, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = [str(getattr(k, 'key', k)) for k in keys]
    if parts[-1] == 'value':
      parts = parts[:-1]
    if 'adapter' in parts:
      i = parts.index('adapter')
      adapters.setdefault('/'.join(parts[:i]), {})['/'.join(parts[i + 1 :])] = np.asarray(value)
      continue
    path = tuple(int(p) if p.isdigit() else p for p in parts if p != 'base')
    base[path] = np.asarray(value, np.float32)
  unknown = sorted(set(adapters) - set(spec.adapters['layers']))
  if unknown:
    raise SpecError(f'checkpoint adapters at {unknown[:3]} are not in model.json')
  return _unpad(spec.config, base), adapters, step


def load_model(
  workdir: str | os.PathLike, *, dtype: str = 'float32', adapters: str = 'merge'
) -> tuple[nnx.Module, tokenizer_lib.Tokenizer]:
  """(model, tokenizer) of a run, to chat with or continue text (see `restore` for `adapters`).

  A run that trained on token ids alone (no tokenizer) is a SpecError: there is no text to read.
  """
  spec = read(workdir)
  tok = load_tokenizer(spec)
  if tok is None:
    raise SpecError(f'{spec.workdir}: the run trained on token ids with no tokenizer; no text')
  model, _ = restore(workdir, adapters=adapters, dtype=dtype)
  return model, tok
