"""Tokenizers rebuilt from GGUF metadata, behind one small interface shared by every model family.

A GGUF carries its tokenizer as metadata (vocabulary, merges or scores, token types, special ids, a
Jinja chat template) rather than as a tokenizer.json, and transformers' GGUF path needs torch even
for tokenizers. So we rebuild them with the light libraries that define the reference behaviour:

  * byte-level BPE (`tokenizer.ggml.model == 'gpt2'`: SmolLM2, Qwen2.5) with the `tokenizers`
    library: vocabulary + merges, the pre-tokenizer `tokenizer.ggml.pre` names (GPT-2's regex, or
    Qwen2's single-digit regex), control tokens as special added tokens, user-defined ones as plain
    added tokens (what transformers' GGUF converter builds);
  * sentencepiece (`'llama'` model, Gemma) as a `ModelProto` built from pieces, scores and types,
    with the two fixes Gemma files need (shared/docs/assets.md 3.3): whitespace-only user-defined
    pieces are stored with raw spaces and are re-spelled with U+2581; and control tokens must be
    recognised in text. For the latter we split the text on every control token before
    sentencepiece sees it (what transformers does) instead of re-typing them USER_DEFINED: that also
    covers ids 0-3, so a literal '<eos>' in a string becomes id 1 as in transformers, and the
    pieces keep their CONTROL type for decoding.

Chat templates are rendered from the GGUF's own Jinja template with the same sandboxed environment
transformers uses (trim_blocks, lstrip_blocks, `tojson`, `raise_exception`). Built tokenizers are
saved next to the converted weights (`save` / `load`), so the slow GGUF parse happens once.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
import datetime
import functools
import json
import os
import pathlib
import re
from typing import Any

from common import errors

# llama.cpp token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# End-of-turn markers of the chat formats we know; those present as special tokens stop generation.
_STOP_TOKENS = ('<|im_end|>', '<|endoftext|>', '<end_of_turn>', '<|eot_id|>', '<|end|>', '<eos>')

GPT2_SPLIT = None  # ByteLevel's built-in GPT-2 regex.
QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r'|\s*[\r\n]+|\s+(?!\S)|\s+'
)
LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r'| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+'
)
# tokenizer.ggml.pre -> split regex (llama.cpp's names; transformers maps them the same way).
PRE_TOKENIZERS = {
  'default': GPT2_SPLIT,
  'gpt2': GPT2_SPLIT,
  'gpt-2': GPT2_SPLIT,
  'smollm': GPT2_SPLIT,
  'qwen2': QWEN2_SPLIT,
  'deepseek-r1-qwen': QWEN2_SPLIT,
  'llama3': LLAMA3_SPLIT,
  'llama-bpe': LLAMA3_SPLIT,
  'llama-v3': LLAMA3_SPLIT,
}

SPM_WHITESPACE = '\u2581'


class TokenizerError(errors.UserError):
  """A tokenizer that cannot be built or used as asked (unknown kind, no chat template, ...)."""


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
  bs = list(range(ord('!'), ord('~') + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs), strict=True))


@functools.cache
def _jinja_env():
  import jinja2  # noqa: PLC0415
  from jinja2 import sandbox  # noqa: PLC0415

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
      x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )

  env = sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=['jinja2.ext.loopcontrols']
  )
  env.filters['tojson'] = tojson
  env.globals['raise_exception'] = raise_exception
  env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
  return _jinja_env().from_string(source)


class Tokenizer(abc.ABC):
  """encode / decode / chat templates / special ids, whatever the backend.

  Attributes:
    bos_id, eos_id, pad_id, unk_id: special ids (None when the model has none).
    stop_ids: ids that end a generated reply (eos and the chat format's end-of-turn markers).
    add_bos: whether `encode` prepends BOS by default (the GGUF's add_bos_token).
    chat_template: the Jinja source, or None (e.g. a base model).
  """

  kind: str

  def __init__(self, meta: Mapping[str, Any]):
    self.meta = dict(meta)
    self.bos_id = meta.get('bos_id')
    self.eos_id = meta.get('eos_id')
    self.pad_id = meta.get('pad_id')
    self.unk_id = meta.get('unk_id')
    self.add_bos = bool(meta.get('add_bos', False))
    self.add_eos = bool(meta.get('add_eos', False))
    self.chat_template = meta.get('chat_template')
    self.special_ids = frozenset(meta.get('special_ids', ()))
    self.stop_ids = tuple(meta.get('stop_ids', ()))

  # -- backend hooks --------------------------------------------------------------------------------

  @abc.abstractmethod
  def _encode(self, text: str) -> list[int]:
    """Ids of `text`, special tokens in it parsed, nothing added."""

  @abc.abstractmethod
  def _decode(self, ids: list[int], skip_special: bool) -> str: ...

  @abc.abstractmethod
  def id_to_token(self, i: int) -> str | None: ...

  @abc.abstractmethod
  def token_to_id(self, token: str) -> int | None: ...

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (ids are 0 .. vocab_size - 1)."""

  @abc.abstractmethod
  def _add_tokens(self, tokens: list[str], special: bool) -> None: ...

  @abc.abstractmethod
  def _save_backend(self, directory: pathlib.Path) -> None: ...

  # -- public API -----------------------------------------------------------------------------------

  def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
    """Token ids of `text`; special tokens written in it (e.g. '<|im_start|>') become their ids.

    add_bos: prepend BOS; None uses the model's default (Gemma yes, SmolLM2 / Qwen no).
    """
    ids = self._encode(text)
    if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
      ids = [self.bos_id, *ids]
    if (add_eos or self.add_eos) and self.eos_id is not None:
      ids = [*ids, self.eos_id]
    return ids

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    """Text of `ids`; with skip_special, control tokens (BOS, <|im_end|>, ...) are dropped."""
    return self._decode([int(i) for i in ids], skip_special)

  def apply_chat_template(
    self,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    **kwargs: Any,
  ) -> str:
    """Renders [{'role': ..., 'content': ...}, ...] with the model's Jinja chat template.

    add_generation_prompt: end with the assistant header, so the model writes the reply next.
    chat_template: overrides the model's template (e.g. for a base model that has none).
    Extra kwargs (tools=..., documents=...) reach the template, as in transformers.
    """
    source = chat_template or self.chat_template
    if source is None:
      raise TokenizerError(
        'this tokenizer has no chat template (a base model such as Gemma-3-270M); pass '
        'chat_template=... or use plain-text prompts'
      )
    context = {
      'bos_token': self._token_text(self.bos_id),
      'eos_token': self._token_text(self.eos_id),
      'pad_token': self._token_text(self.pad_id),
      'unk_token': self._token_text(self.unk_id),
      'tools': None,
      'documents': None,
      **kwargs,
    }
    return _compile_template(source).render(
      messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **context
    )

  def encode_chat(
    self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs
  ) -> list[int]:
    """Ids of the rendered chat; adds no BOS of its own (templates that want one write it)."""
    return self.encode(
      self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_bos=False
    )

  def end_of_turn_id(self) -> int:
    """The stop token the chat template closes an assistant turn with (SmolLM2 and Qwen2.5:
    <|im_end|>, not <|endoftext|>, their lower stop id). A reply written for the model (an SFT
    target, a reference trace) must end with it, as the model's own replies do."""
    user = [{'role': 'user', 'content': 'q'}]
    prompt = self.encode_chat(user, True)
    turn = self.encode_chat([*user, {'role': 'assistant', 'content': 'a'}], False)
    stops = set(self.stop_ids)
    found = [i for i in turn[len(prompt) :] if i in stops]
    if not found:
      raise TokenizerError('the chat template closes an assistant turn with no stop token')
    return found[0]

  def add_tokens(self, tokens: Sequence[str], special: bool = True) -> list[int]:
    """Adds tokens that are not yet in the vocabulary (at the end); returns the ids of all `tokens`.

    Special tokens are matched whole in text and dropped by decode(skip_special=True). To grow a
    model's embedding to match, use `common.models.vocab.extend_vocab`.
    """
    new = [t for t in dict.fromkeys(tokens) if self.token_to_id(t) is None]
    if new:
      self._add_tokens(new, special)
    ids = [self.token_to_id(t) for t in tokens]
    if special:
      self.special_ids = self.special_ids | frozenset(ids)
      self.meta['special_ids'] = sorted(self.special_ids)
    self.meta.setdefault('added', []).extend({'token': t, 'special': special} for t in new)
    return ids

  def save(self, directory: str | os.PathLike) -> None:
    """Writes the tokenizer into `directory` (created if needed); `load` reads it back."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self._save_backend(directory)
    meta = {**self.meta, 'kind': self.kind, 'special_ids': sorted(self.special_ids)}
    (directory / 'tokenizer_meta.json').write_text(json.dumps(meta, indent=1) + '\n')

  def _token_text(self, i: int | None) -> str | None:
    return None if i is None else self.id_to_token(i)

  def __repr__(self) -> str:
    return (
      f'{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, '
      f'stop={list(self.stop_ids)}, chat_template={self.chat_template is not None})'
    )


class BPETokenizer(Tokenizer):
  """Byte-level BPE on the `tokenizers` library (SmolLM2, Qwen2.5)."""

  kind = 'bpe'

  def __init__(self, backend, meta: Mapping[str, Any]):
    super().__init__(meta)
    self.backend = backend

  def _encode(self, text: str) -> list[int]:
    return self.backend.encode(text, add_special_tokens=False).ids

  def _decode(self, ids: list[int], skip_special: bool) -> str:
    if skip_special:
      # The backend skips only tokens it registered as special; we also honour `special_ids`.
      ids = [i for i in ids if i not in self.special_ids]
    return self.backend.decode(ids, skip_special_tokens=skip_special)

  def id_to_token(self, i: int) -> str | None:
    return self.backend.id_to_token(int(i))

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def _add_tokens(self, tokens: list[str], special: bool) -> None:
    from tokenizers import AddedToken  # noqa: PLC0415

    added = [AddedToken(t, special=special, normalized=False) for t in tokens]
    if special:
      self.backend.add_special_tokens(added)
    else:
      self.backend.add_tokens(added)

  def _save_backend(self, directory: pathlib.Path) -> None:
    self.backend.save(str(directory / 'tokenizer.json'))


class SentencePieceTokenizer(Tokenizer):
  """sentencepiece BPE with byte fallback (Gemma), special tokens split out before encoding."""

  kind = 'spm'

  def __init__(self, proto_bytes: bytes, meta: Mapping[str, Any]):
    super().__init__(meta)
    self._load_proto(proto_bytes)

  def _load_proto(self, proto_bytes: bytes) -> None:
    import sentencepiece  # noqa: PLC0415

    self.proto_bytes = proto_bytes
    self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto_bytes)
    self._pieces = {self.sp.id_to_piece(i): i for i in self.special_ids}
    # Longest first, so '<start_of_turn>' wins over a shorter special that is its prefix.
    alternatives = sorted(self._pieces, key=len, reverse=True)
    self._split = re.compile('|'.join(map(re.escape, alternatives))) if alternatives else None

  def _encode(self, text: str) -> list[int]:
    if self._split is None:
      return list(self.sp.encode(text))
    ids, start = [], 0
    for m in self._split.finditer(text):
      if m.start() > start:
        ids += self.sp.encode(text[start : m.start()])
      ids.append(self._pieces[m.group()])
      start = m.end()
    if start < len(text):
      ids += self.sp.encode(text[start:])
    return ids

  def _decode(self, ids: list[int], skip_special: bool) -> str:
    out, run = [], []
    for i in ids:
      if i in self.special_ids:
        if run:
          out.append(self.sp.decode(run))
          run = []
        if not skip_special:
          out.append(self.sp.id_to_piece(i))
      else:
        run.append(i)
    if run:
      out.append(self.sp.decode(run))
    return ''.join(out)

  def id_to_token(self, i: int) -> str | None:
    return self.sp.id_to_piece(int(i)) if 0 <= int(i) < self.sp.get_piece_size() else None

  def token_to_id(self, token: str) -> int | None:
    i = self.sp.piece_to_id(token)
    # piece_to_id returns unk for unknown pieces; only the real unk piece maps to it.
    return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def _add_tokens(self, tokens: list[str], special: bool) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb  # noqa: PLC0415

    proto = pb.ModelProto.FromString(self.proto_bytes)
    kind = (
      pb.ModelProto.SentencePiece.CONTROL if special else pb.ModelProto.SentencePiece.USER_DEFINED
    )
    for t in tokens:
      proto.pieces.add(piece=t, score=0.0, type=kind)
    if special:  # so _load_proto builds the split regex with them
      first = len(proto.pieces) - len(tokens)
      self.special_ids = self.special_ids | frozenset(range(first, len(proto.pieces)))
    self._load_proto(proto.SerializeToString())

  def _save_backend(self, directory: pathlib.Path) -> None:
    (directory / 'tokenizer.model').write_bytes(self.proto_bytes)


# ---------------------------------------------------------------------------------------------------
# Building from GGUF metadata.


def _special_meta(md: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int]) -> dict:
  def opt(key):
    v = md.get(f'tokenizer.ggml.{key}')
    return None if v is None else int(v)

  special = {i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)}
  eos = opt('eos_token_id')
  index = {t: i for i, t in enumerate(tokens) if i in special}
  stops = {eos} if eos is not None else set()
  stops |= {index[t] for t in _STOP_TOKENS if t in index}
  return {
    'bos_id': opt('bos_token_id'),
    'eos_id': eos,
    'pad_id': opt('padding_token_id'),
    'unk_id': opt('unknown_token_id'),
    'add_eos': bool(md.get('tokenizer.ggml.add_eos_token', False)),
    'chat_template': md.get('tokenizer.chat_template'),
    'special_ids': sorted(special),
    'stop_ids': sorted(stops),
  }


def from_gguf_metadata(md: Mapping[str, Any]) -> Tokenizer:
  """Builds the tokenizer a GGUF's `tokenizer.*` metadata describes (values as Python objects)."""
  model = md.get('tokenizer.ggml.model')
  if model == 'gpt2':
    return _bpe_from_gguf(md)
  if model == 'llama':
    return _spm_from_gguf(md)
  raise TokenizerError(
    f"unsupported GGUF tokenizer model {model!r}; supported: 'gpt2' (byte-level BPE), "
    "'llama' (sentencepiece)"
  )


def _bpe_from_gguf(md: Mapping[str, Any]) -> BPETokenizer:
  from tokenizers import AddedToken  # noqa: PLC0415
  from tokenizers import Regex  # noqa: PLC0415
  from tokenizers import Tokenizer as HFTokenizer  # noqa: PLC0415
  from tokenizers import decoders  # noqa: PLC0415
  from tokenizers import models  # noqa: PLC0415
  from tokenizers import pre_tokenizers  # noqa: PLC0415

  tokens = list(md['tokenizer.ggml.tokens'])
  types = list(md.get('tokenizer.ggml.token_type') or [NORMAL] * len(tokens))
  pre = md.get('tokenizer.ggml.pre', 'default')
  if pre not in PRE_TOKENIZERS:
    raise TokenizerError(
      f'unsupported BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: '
      f'{", ".join(sorted(PRE_TOKENIZERS))}'
    )
  alphabet = _bytes_to_unicode()
  letters = set(alphabet.values())
  # A token outside the byte alphabet (rare llama.cpp spelling) is re-spelled byte by byte.
  spelled = [t if set(t) <= letters else ''.join(alphabet[b] for b in t.encode()) for t in tokens]
  vocab = {t: i for i, t in enumerate(spelled)}
  merges = [tuple(m.split(' ', 1)) for m in md.get('tokenizer.ggml.merges', ())]
  backend = HFTokenizer(
    models.BPE(
      vocab=vocab,
      merges=merges,
      dropout=None,
      continuing_subword_prefix='',
      end_of_word_suffix='',
      fuse_unk=False,
    )
  )
  split = PRE_TOKENIZERS[pre]
  if split is None:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  else:
    backend.pre_tokenizer = pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(split), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  backend.decoder = decoders.ByteLevel()
  # Control tokens spelled outside the alphabet are llama.cpp mislabels; transformers skips them.
  control = [
    AddedToken(t, special=True, normalized=False)
    for t, ty in zip(tokens, types, strict=True)
    if ty in (CONTROL, UNKNOWN) and set(t) <= letters
  ]
  backend.add_special_tokens(control)
  user = [
    AddedToken(t, special=False, normalized=False)
    for t, ty in zip(tokens, types, strict=True)
    if ty == USER_DEFINED
  ]
  if user:
    backend.add_tokens(user)
  meta = _special_meta(md, tokens, types)
  meta.update(add_bos=bool(md.get('tokenizer.ggml.add_bos_token', False)), pre=pre)
  return BPETokenizer(backend, meta)


def _spm_from_gguf(md: Mapping[str, Any]) -> SentencePieceTokenizer:
  from sentencepiece import sentencepiece_model_pb2 as pb  # noqa: PLC0415

  tokens = list(md['tokenizer.ggml.tokens'])
  scores = list(md.get('tokenizer.ggml.scores') or [0.0] * len(tokens))
  types = list(md.get('tokenizer.ggml.token_type') or [NORMAL] * len(tokens))
  proto = pb.ModelProto()
  piece_type = pb.ModelProto.SentencePiece
  for t, s, ty in zip(tokens, scores, types, strict=True):
    if ty == USER_DEFINED and t and not t.strip(' '):
      t = t.replace(' ', SPM_WHITESPACE)  # fix 1: whitespace pieces stored with raw spaces
    kind = {
      UNKNOWN: piece_type.UNKNOWN,
      CONTROL: piece_type.CONTROL,
      USER_DEFINED: piece_type.USER_DEFINED,
      UNUSED: piece_type.UNUSED,
      BYTE: piece_type.BYTE,
    }.get(ty, piece_type.NORMAL)
    proto.pieces.add(piece=t, score=float(s), type=kind)

  def opt(key, default):
    v = md.get(f'tokenizer.ggml.{key}')
    return default if v is None else int(v)

  ts = proto.trainer_spec
  ts.model_type = pb.TrainerSpec.BPE
  ts.vocab_size = len(tokens)
  ts.byte_fallback = any(ty == BYTE for ty in types)
  ts.split_digits = True
  ts.unk_id = opt('unknown_token_id', 0)
  ts.bos_id = opt('bos_token_id', -1)
  ts.eos_id = opt('eos_token_id', -1)
  ts.pad_id = opt('padding_token_id', -1)
  ns = proto.normalizer_spec
  ns.name = 'identity'
  ns.add_dummy_prefix = bool(md.get('tokenizer.ggml.add_space_prefix', False))
  ns.remove_extra_whitespaces = False
  ns.escape_whitespaces = True
  meta = _special_meta(md, tokens, types)
  # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
  meta.update(add_bos=bool(md.get('tokenizer.ggml.add_bos_token', True)))
  return SentencePieceTokenizer(proto.SerializeToString(), meta)


def load(directory: str | os.PathLike) -> Tokenizer:
  """Reads a tokenizer written by `Tokenizer.save`."""
  directory = pathlib.Path(directory)
  meta = json.loads((directory / 'tokenizer_meta.json').read_text())
  if meta['kind'] == 'bpe':
    from tokenizers import Tokenizer as HFTokenizer  # noqa: PLC0415

    return BPETokenizer(HFTokenizer.from_file(str(directory / 'tokenizer.json')), meta)
  if meta['kind'] == 'spm':
    return SentencePieceTokenizer((directory / 'tokenizer.model').read_bytes(), meta)
  raise TokenizerError(f'{directory}: unknown tokenizer kind {meta["kind"]!r}')
