"""Pretrained decoder LMs from GGUF files: convert once, cache, load straight into a sharded model.

  from common.models import loader
  model, cfg, tok = loader.load_pretrained('smollm2')                 # one device
  model, cfg, tok = loader.load_pretrained('gemma3_270m', mesh=mesh)  # each tensor placed sharded

`name_or_path` is an asset name from `common.assets` (smollm2, gemma3_270m, qwen2_5_coder_0_5b; also
the aliases in ALIASES) or a path to a GGUF file.

Why convert: reading a GGUF means parsing hundreds of thousands of metadata entries (Gemma's 262k
token vocabulary) and dequantizing every tensor in numpy, 10-60 s per model. The first load does it
once and writes, under `common.cache.cache_dir('converted', <sha256 of the GGUF>-v<VERSION>)`, one
float32 `.npy` per decoder parameter in the decoder's own layout (kernels (in, out), llama Q/K
un-permuted, Gemma norms without their +1, vocabulary unpadded), the DecoderConfig as JSON and the
built tokenizer. Later loads memory-map those files and each device reads only its shard (via
`jax.make_array_from_callback` with the NamedSharding from `common.sharding.state_shardings`), so no
replicated host copy of the model is ever built. The conversion is atomic (written to a temporary
directory, then renamed) and serialised by a file lock, so concurrent first loads are safe.

GGUF reading uses the `gguf` library (its GGUFReader and `gguf.quants.dequantize`) with one speed
fix: `_FastReader` reads metadata arrays as whole numpy slices instead of one memmap view per
element (Gemma's header: 2.5 s instead of 30-90 s), with identical results (tested against
GGUFReader).

Errors are one line and name the fix: a missing asset raises the AssetError of `common.assets`; a
truncated or corrupt GGUF or a checksum mismatch names `python -m common.assets fetch --force NAME`
(or `python -m common.assets verify NAME`); an unknown architecture names it and the supported ones.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any

from absl import logging
from flax import nnx
import jax
import numpy as np

from common import assets
from common import cache
from common import errors
from common import sharding
from common.models import decoder
from common.models import families
from common.models import tokenizer as tokenizer_lib

# Bump when the converted layout or a conversion convention changes: old caches are then ignored.
CONVERTER_VERSION = 1

ALIASES = {
  'gemma3': 'gemma3_270m',
  'gemma': 'gemma3_270m',
  'qwen': 'qwen2_5_coder_0_5b',
  'qwen2_5_coder': 'qwen2_5_coder_0_5b',
}
# Metadata arrays kept out of config.json (they go into the tokenizer).
_TOKENIZER_ARRAYS = (
  'tokenizer.ggml.tokens',
  'tokenizer.ggml.scores',
  'tokenizer.ggml.token_type',
  'tokenizer.ggml.merges',
)


class GGUFError(errors.UserError):
  """A GGUF file that cannot be read or does not match its pinned checksum; names the fix."""


@dataclasses.dataclass(frozen=True)
class Source:
  """A GGUF to load: its path, sha256 (pinned or computed), and the asset it came from."""

  path: pathlib.Path
  sha256: str
  asset: str | None

  @property
  def fix(self) -> str:
    if self.asset:
      return f'run: python -m common.assets fetch --force {self.asset}'
    return f'replace {self.path} with a complete copy'


# ---------------------------------------------------------------------------------------------------
# Reading GGUF.


def _reader_class():
  import gguf  # noqa: PLC0415

  class _FastReader(gguf.GGUFReader):
    """GGUFReader whose metadata arrays cost one numpy slice each, not one memmap view per element.

    GGUFReader builds a list of small memmap views for every element of every array field (Gemma's
    262k tokens, scores and types: ~800k views), and np.memmap's per-view overhead makes that take
    tens of seconds. Here `data` is a plain ndarray view of the same mapping, and numeric arrays are
    read as one part; `ReaderField.contents()` gives the same values
    (tests/common/models/gguf_test).
    """

    @property
    def data(self):
      return self._data

    @data.setter
    def data(self, value):
      self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    def _get_field_parts(self, orig_offs, raw_type):
      vt = gguf.GGUFValueType
      if vt(raw_type) != vt.ARRAY:
        return super()._get_field_parts(orig_offs, raw_type)
      offs = orig_offs
      raw_itype = self._get(offs, np.uint32)
      alen = self._get(offs + 4, np.uint64)
      offs += 12
      itype, n = vt(raw_itype[0]), int(alen[0])
      nptype = self.gguf_scalar_to_np.get(itype)
      if nptype is not None:
        values = self._get(offs, nptype, n)
        return offs + values.nbytes - orig_offs, [raw_itype, alen, values], [2], [vt.ARRAY, itype]
      if itype != vt.STRING:
        return super()._get_field_parts(orig_offs, raw_type)
      buf, length_type = self._data, np.dtype(np.uint64).newbyteorder(self.byte_order)
      parts, idxs = [raw_itype, alen], []
      for _ in range(n):
        slen = buf[offs : offs + 8].view(length_type)
        end = offs + 8 + int(slen[0])
        if end > len(buf):
          raise ValueError('string runs past the end of the file')
        parts += [slen, buf[offs + 8 : end]]
        idxs.append(len(parts) - 1)
        offs = end
      return offs - orig_offs, parts, idxs, [vt.ARRAY, itype]

  return _FastReader


def open_gguf(path: str | os.PathLike, fix: str = 'replace it with a complete copy'):
  """A GGUFReader for `path`; a truncated or malformed file raises GGUFError naming `fix`."""
  path = pathlib.Path(path)
  try:
    reader = _reader_class()(path)
  except (ValueError, IndexError, OverflowError, UnicodeDecodeError, KeyError) as e:
    raise GGUFError(f'{path} is not a readable GGUF (truncated or corrupt: {e}); {fix}') from None
  size = path.stat().st_size
  end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
  if end > size:
    raise GGUFError(f'{path} is truncated ({size} bytes, tensors need {end}); {fix}')
  return reader


def read_metadata(reader) -> dict[str, Any]:
  """Every metadata field as a Python value (arrays as lists)."""
  out = {}
  for key, field in reader.fields.items():
    if key.startswith('GGUF.'):
      continue
    out[key] = field.contents()
  return out


def tensor_shapes(reader) -> dict[str, tuple[int, ...]]:
  """GGUF tensor name -> numpy shape after dequantization ((out, in) for matrices)."""
  return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}


def dequantize(tensor) -> np.ndarray:
  """float32 numpy array of a GGUF tensor, in numpy's (reversed GGML) shape."""
  from gguf import quants  # noqa: PLC0415

  shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
  try:
    w = quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError:
    raise GGUFError(
      f'tensor {tensor.name} is {tensor.tensor_type.name}, which gguf cannot dequantize'
    ) from None
  return np.asarray(w, np.float32).reshape(shape)


# ---------------------------------------------------------------------------------------------------
# Resolving names and checksums.


def resolve(name_or_path: str | os.PathLike) -> Source:
  """The GGUF behind an asset name / alias or a file path (AssetError if an asset isn't fetched)."""
  name = ALIASES.get(str(name_or_path), str(name_or_path))
  if name in assets.ASSETS:
    asset = assets.ASSETS[name]
    if asset.main is None or not asset.main.endswith('.gguf'):
      raise GGUFError(f"asset '{name}' is not a GGUF model")
    path = assets.path(name)  # AssetError naming the fetch command if missing or truncated
    return Source(path, asset.file(asset.main).sha256, name)
  path = pathlib.Path(name_or_path).expanduser()
  if not path.is_file():
    models = [n for n, a in assets.ASSETS.items() if a.main and a.main.endswith('.gguf')]
    raise GGUFError(
      f'{name_or_path!r} is neither a model asset ({", ".join(models)}) nor a GGUF file'
    )
  return Source(path.absolute(), _cached_sha256(path), None)


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(1 << 22):
      digest.update(block)
  return digest.hexdigest()


def _cached_sha256(path: pathlib.Path) -> str:
  """sha256 of a file, remembered per (path, size, mtime) so a cached load does not re-hash."""
  st = path.stat()
  key = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:24]
  memo = cache.cache_dir('converted', 'sha256') / f'{key}.json'
  stamp = {'path': str(path.absolute()), 'size': st.st_size, 'mtime_ns': st.st_mtime_ns}
  with contextlib.suppress(OSError, ValueError):
    record = json.loads(memo.read_text())
    if {k: record.get(k) for k in stamp} == stamp:
      return record['sha256']
  sha = _sha256(path)
  cache.write_text(memo, json.dumps({**stamp, 'sha256': sha}))
  return sha


# ---------------------------------------------------------------------------------------------------
# Conversion.


def _param_file(path: tuple) -> str:
  return '.'.join(str(p) for p in path) + '.npy'


def convert(src: Source, out: pathlib.Path, log=logging.info) -> None:
  """Reads `src` and writes the converted model into the (new) directory `out`."""
  start = time.monotonic()
  if src.asset:  # The cache key is the pinned hash, so check the bytes really have it.
    actual = _sha256(src.path)
    if actual != src.sha256:
      raise GGUFError(
        f'{src.path} sha256 {actual} does not match the pinned {src.sha256} (corrupt or replaced; '
        f'check with: python -m common.assets verify {src.asset}); {src.fix}'
      )
  reader = open_gguf(src.path, src.fix)
  meta = read_metadata(reader)
  shapes = tensor_shapes(reader)
  cfg = families.config_from_metadata(meta, shapes)
  fam = families.family(meta['general.architecture'])
  tok = tokenizer_lib.from_gguf_metadata(meta)
  log(f'{src.path.name}: read {len(meta)} metadata keys in {time.monotonic() - start:.1f} s')

  out.mkdir(parents=True)
  (out / 'params').mkdir()
  tok.save(out / 'tokenizer')
  written = {}
  for t in reader.tensors:
    try:
      mapped = families.to_decoder(fam, cfg, t.name, dequantize(t))
    except (ValueError, IndexError) as e:
      raise GGUFError(f'{src.path}: tensor {t.name} is corrupt ({e}); {src.fix}') from None
    if mapped is None:
      continue
    path, array = mapped
    np.save(out / 'params' / _param_file(path), array, allow_pickle=False)
    written[_param_file(path)] = list(array.shape)
  record = {
    'converter_version': CONVERTER_VERSION,
    'config': dataclasses.asdict(cfg),
    'architecture': meta['general.architecture'],
    'name': meta.get('general.name'),
    'source': {'path': str(src.path), 'sha256': src.sha256, 'asset': src.asset},
    'params': written,
    'metadata': {k: v for k, v in meta.items() if k not in _TOKENIZER_ARRAYS},
  }
  (out / 'model.json').write_text(json.dumps(record, indent=1, default=str) + '\n')
  log(f'{src.path.name}: converted in {time.monotonic() - start:.1f} s')


@contextlib.contextmanager
def _locked(lock_path: pathlib.Path) -> Iterator[None]:
  with open(lock_path, 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def converted_dir(name_or_path: str | os.PathLike, log=logging.info) -> pathlib.Path:
  """The converted-cache directory of a model, converting it first if needed."""
  src = resolve(name_or_path)
  root = cache.cache_dir('converted')
  final = root / f'{src.sha256[:32]}-v{CONVERTER_VERSION}'
  if (final / 'model.json').is_file():
    return final
  with _locked(root / f'.{final.name}.lock'):
    if (final / 'model.json').is_file():
      return final
    work = pathlib.Path(tempfile.mkdtemp(prefix=f'.{final.name}.tmp-', dir=root))
    try:
      convert(src, work / 'model', log)
      if final.exists():  # an incomplete leftover (no model.json): replace it
        shutil.rmtree(final)
      os.rename(work / 'model', final)
    finally:
      shutil.rmtree(work, ignore_errors=True)
  return final


def _read_record(directory: pathlib.Path) -> dict:
  return json.loads((directory / 'model.json').read_text())


def context_length(name_or_path: str | os.PathLike) -> int | None:
  """The model's trained context (GGUF `<arch>.context_length`), or None when the file omits it."""
  record = _read_record(converted_dir(name_or_path))
  value = record['metadata'].get(f'{record["architecture"]}.context_length')
  return int(value) if value is not None else None


def load_config(name_or_path: str | os.PathLike, **overrides) -> decoder.DecoderConfig:
  """The DecoderConfig of a model (converting it on first use); overrides e.g. dtype='bfloat16'."""
  cfg = decoder.DecoderConfig.from_dict(_read_record(converted_dir(name_or_path))['config'])
  return dataclasses.replace(cfg, **overrides)


def load_tokenizer(name_or_path: str | os.PathLike) -> tokenizer_lib.Tokenizer:
  """The model's tokenizer, from the converted cache (converting the model on first use)."""
  return tokenizer_lib.load(converted_dir(name_or_path) / 'tokenizer')


# ---------------------------------------------------------------------------------------------------
# Loading into a (sharded) model.


def _padded_slice(
  array: np.ndarray, index: tuple[slice, ...], shape: tuple[int, ...]
) -> np.ndarray:
  """array[index] where `array` may be smaller than `shape` (the padded vocabulary): zeros there."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  bounds = [s.indices(n)[:2] for s, n in zip(index, shape, strict=True)]
  out = np.zeros([hi - lo for lo, hi in bounds], np.float32)
  src, dst = [], []
  for (lo, hi), have in zip(bounds, array.shape, strict=True):
    top = min(hi, have)
    src.append(slice(lo, max(lo, top)))
    dst.append(slice(0, max(0, top - lo)))
  out[tuple(dst)] = array[tuple(src)]
  return out


def _place(array: np.ndarray, shape: tuple[int, ...], target) -> jax.Array:
  """A jax.Array of `shape` with sharding `target`, each device reading only its slice of `array`.

  Each slice is copied out of the memory map: on CPU, JAX may alias a host buffer it is handed, and
  a parameter aliasing a read-only mapping of a cache file would break in-place updates (donated
  train steps) and could change if the file did.
  """
  if tuple(array.shape) == tuple(shape):
    return jax.make_array_from_callback(
      shape, target, lambda idx: np.array(array[idx], np.float32, copy=True)
    )
  return jax.make_array_from_callback(shape, target, lambda idx: _padded_slice(array, idx, shape))


def abstract_model(cfg: decoder.DecoderConfig) -> nnx.Module:
  """The decoder with ShapeDtypeStruct leaves (no memory), carrying its logical sharding names.

  Built with jax.eval_shape over a split, not nnx.eval_shape: under an active `jax.set_mesh` the
  latter reads the logical names ('vocab', 'embed') as mesh axes and fails, and loading a model
  inside a training script's mesh context is the common case.
  """
  captured = {}

  def split():
    with sharding.unsharded():
      captured['graphdef'], state = nnx.split(decoder.Decoder(cfg, rngs=nnx.Rngs(0)))
    return state

  state = jax.eval_shape(split)
  return nnx.merge(captured['graphdef'], state)


@functools.lru_cache(maxsize=8)
def _abstract_split(cfg: decoder.DecoderConfig):
  """(graphdef, abstract state) per config: tracing the initializers costs seconds per model."""
  return nnx.split(abstract_model(cfg))


def load_params(
  directory: pathlib.Path,
  cfg: decoder.DecoderConfig,
  *,
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> decoder.Decoder:
  """Builds a Decoder whose parameters come from a converted directory, placed on `mesh`.

  Every nnx.Param must have a file; other variables (e.g. a cache a later decoder adds) start as
  zeros. With mesh=None everything lands on the first local device.
  """
  graphdef, state = _abstract_split(cfg)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    targets = jax.tree.map(lambda _: device, state)
  else:
    targets = sharding.state_shardings(state, mesh, rules)
  flat_state = nnx.to_flat_state(state)
  flat_targets = dict(nnx.to_flat_state(targets))
  params_dir = directory / 'params'
  missing, leaves = [], []
  for path, var in flat_state:
    target = flat_targets[path]
    target = target.get_value() if isinstance(target, nnx.Variable) else target
    abstract = var.get_value()
    if isinstance(var, nnx.Param):
      file = params_dir / _param_file(path)
      if not file.is_file():
        missing.append(_param_file(path)[:-4])
        continue
      value = _place(np.load(file, mmap_mode='r'), abstract.shape, target)
    else:
      value = jax.device_put(np.zeros(abstract.shape, abstract.dtype), target)
    leaves.append((path, var.replace(value)))
  if missing:
    raise GGUFError(
      f'{directory}: no converted values for {", ".join(missing[:5])}'
      f'{" ..." if len(missing) > 5 else ""} (a decoder change? delete the directory to reconvert)'
    )
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def load_pretrained(
  name_or_path: str | os.PathLike,
  *,
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  dtype: str = 'float32',
) -> tuple[decoder.Decoder, decoder.DecoderConfig, tokenizer_lib.Tokenizer]:
  """(model, config, tokenizer) of a pretrained GGUF model; see the module docstring.

  Args:
    name_or_path: asset name (smollm2, gemma3_270m, qwen2_5_coder_0_5b), alias, or GGUF path.
    mesh: place each parameter with its NamedSharding on this mesh (None: one device).
    rules: logical-axis rules for the mesh (common.sharding.DEFAULT_RULES).
    dtype: compute dtype (config.dtype); parameters are float32 regardless.
  """
  directory = converted_dir(name_or_path)
  record = _read_record(directory)
  cfg = decoder.DecoderConfig.from_dict({**record['config'], 'dtype': dtype})
  model = load_params(directory, cfg, mesh=mesh, rules=rules)
  return model, cfg, tokenizer_lib.load(directory / 'tokenizer')


def main(argv: list[str]) -> int:
  """`python -m common.models.loader NAME...`: converts (if needed) and reports each model."""
  if not argv:
    print('usage: python -m common.models.loader NAME_OR_PATH...', file=sys.stderr)
    return 2
  for name in argv:
    try:
      start = time.monotonic()
      directory = converted_dir(name, log=print)
      cfg = load_config(name)
      print(f'{name}: {directory} ({time.monotonic() - start:.1f} s)\n  {cfg}')
    except errors.UserError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
