"""A GGUF file -> the same model as an f32 / f16 / bf16 GGUF, through the `gguf` package.

The shipped assets are quantized (SmolLM2: Q4_1, Gemma-3 / Qwen2.5: Q4_K_M). Our loader dequantizes
them to float32, so a speed comparison with llama.cpp on the shipped file compares two precisions.
This converter writes the numbers our loader sees as a float GGUF that llama.cpp reads, so both
sides run the same weights at the same precision:

  python -m common.models.gguf_convert --src=smollm2 --dtype=f16 --out=/tmp/smollm2-f16.gguf

Every metadata key is copied unchanged (tokenizer, chat template, hyper-parameters) except
`general.file_type`. Tensors are dequantized with `gguf.quants.dequantize` (what our loader does);
2-D weight matrices are stored in --dtype and everything else (norm scales, biases) in float32, as
llama.cpp's own converter does, since those are tiny and its kernels read them as f32. Writes
atomically (a temporary name, then rename).
"""

from __future__ import annotations

import argparse
import os
import pathlib

import numpy as np

from common.models import loader

# Target dtype -> the GGUF file type it declares (gguf.LlamaFileType).
DTYPES = {'f32': 'ALL_F32', 'f16': 'MOSTLY_F16', 'bf16': 'MOSTLY_BF16'}
_SKIP_KEYS = ('GGUF.', 'general.architecture', 'general.file_type')


class ConvertError(ValueError):
  """An input this converter cannot express; says what."""


def _bf16_bits(x: np.ndarray) -> np.ndarray:
  """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even (as llama.cpp does)."""
  bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
  rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
  nan = np.isnan(x)
  out = rounded.astype(np.uint16)
  out[nan] = 0x7FC0
  return out


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: str) -> dict[str, int]:
  """Writes `src` (a GGUF path or model asset name) as a `dtype` GGUF at `dst`.

  Returns {'tensors', 'matrices', 'bytes'}.
  """
  import gguf  # noqa: PLC0415

  if dtype not in DTYPES:
    raise ConvertError(f'unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}')
  source = loader.resolve(src)
  reader = loader.open_gguf(source.path, source.fix)
  arch_field = reader.fields.get('general.architecture')
  if arch_field is None:
    raise ConvertError(f'{src}: no general.architecture key, not a model GGUF')
  arch = arch_field.contents()
  dst = pathlib.Path(dst)
  tmp = dst.with_name(f'.{dst.name}.tmp')
  writer = gguf.GGUFWriter(str(tmp), arch)
  matrices = 0
  try:
    for field in reader.fields.values():
      if field.name.startswith(_SKIP_KEYS):
        continue
      vtype = field.types[0]
      sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
      writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_uint32('general.file_type', int(getattr(gguf.LlamaFileType, DTYPES[dtype])))
    for t in reader.tensors:
      values = loader.dequantize(t)  # float32, numpy (slowest-first) shape
      shape = values.shape
      if values.ndim == 2 and dtype != 'f32':
        matrices += 1
        if dtype == 'f16':
          writer.add_tensor(t.name, values.astype(np.float16))
        else:
          writer.add_tensor(
            t.name,
            _bf16_bits(values),
            raw_shape=shape,
            raw_dtype=gguf.GGMLQuantizationType.BF16,
          )
      else:
        matrices += values.ndim == 2
        writer.add_tensor(t.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
  except BaseException:
    writer.close()
    tmp.unlink(missing_ok=True)
    raise
  writer.close()
  os.replace(tmp, dst)
  return {'tensors': len(reader.tensors), 'matrices': matrices, 'bytes': dst.stat().st_size}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--src', required=True, help='a GGUF path, or an asset name (smollm2, ...)')
  p.add_argument('--dtype', required=True, choices=sorted(DTYPES))
  p.add_argument('--out', required=True, help='where to write the converted GGUF')
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  info = convert(args.src, args.out, args.dtype)
  print(
    f'wrote {args.out}: {info["tensors"]} tensors ({info["matrices"]} matrices in {args.dtype}),'
  )
  print(f'  {info["bytes"] / 1e6:.1f} MB')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
