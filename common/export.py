"""Take a model trained in this repo out of it: Hugging Face safetensors or GGUF from a workdir.

  python -m common.export RUN                                  # RUN/export/safetensors/
  python -m common.export RUN --format=gguf --out=/tmp/m       # /tmp/m/model.gguf
  python -m common.export RUN --adapters=separate              # base + adapters side by side

RUN is a workdir whose run recorded its model (`RUN/model.json`, common.models.spec: lm_pretrain,
EBPO, S'MoRE write it) and holds a checkpoint. The newest checkpoint's model parameters are restored
onto an abstract decoder (fingerprints verified), then written as:
  * safetensors (common.models.hf): model.safetensors + config.json for LlamaForCausalLM,
    Qwen2ForCausalLM or Gemma3ForCausalLM (by the decoder's switches), generation_config.json and
    the tokenizer files, so `transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads it;
  * gguf (common.models.gguf_writer): model.gguf, float32, with the tokenizer in its metadata, so
    `common.models.loader.load_pretrained(OUT/model.gguf)` (and `generate --model=...`) reads it.
Adapters (`--adapters`): a LoRA run is merged into the base weights by default (core.merge) or, with
`separate`, exported as the frozen base plus adapters.safetensors (the adapter arrays by layer path)
and adapter_config.json (model.json's adapter entry). A mixture run (input-dependent routing: no
merged model computes it) is always exported separately; asking to merge it is an error. Every
export also writes export.json (run, step, format, adapters, files).

Bad input (no model.json, no checkpoint, an architecture the format cannot hold) is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # noqa: E402

from common import errors  # noqa: E402
from common.models import families  # noqa: E402
from common.models import gguf_writer  # noqa: E402
from common.models import hf  # noqa: E402
from common.models import spec as spec_lib  # noqa: E402

FORMATS = ('safetensors', 'gguf')
ADAPTER_MODES = ('auto', 'merge', 'separate')
ADAPTERS_FILE = 'adapters.safetensors'


@dataclasses.dataclass
class Exported:
  directory: pathlib.Path
  files: list[str]
  step: int
  adapters: str  # 'none' | 'merged' | 'separate'


def _adapter_mode(spec: spec_lib.ModelSpec, requested: str) -> str:
  kind = spec.adapter_kind
  if requested not in ADAPTER_MODES:
    raise errors.UserError(f'--adapters={requested}: use one of {", ".join(ADAPTER_MODES)}')
  if kind == 'none':
    return 'none'
  if kind == 'mixture':
    if requested == 'merge':
      raise errors.UserError(
        f'{spec.workdir}: {spec.adapters.get("method")} adapters route by input, so no merged '
        'model computes them; use --adapters=separate (the default for this run)'
      )
    return 'separate'
  return 'separate' if requested == 'separate' else 'merged'


def _save_adapters(out: pathlib.Path, spec, arrays: dict[str, dict]) -> list[str]:
  from safetensors import numpy as st_numpy  # noqa: PLC0415

  flat = {
    f'{layer}/{leaf}': np.ascontiguousarray(np.asarray(v))
    for layer, leaves in arrays.items()
    for leaf, v in leaves.items()
  }
  tmp = out / f'.{ADAPTERS_FILE}.tmp'
  st_numpy.save_file(flat, str(tmp), metadata={'format': 'np'})
  os.replace(tmp, out / ADAPTERS_FILE)
  config = {
    **spec.adapters,
    'tensors': 'adapters.safetensors names are <layer path>/<adapter leaf path>; the layer path '
    'is the decoder module the adapter corrects (y = W0 x + delta(x))',
  }
  (out / 'adapter_config.json').write_text(json.dumps(config, indent=2) + '\n')
  return [ADAPTERS_FILE, 'adapter_config.json']


def _lora_arrays(model) -> dict[str, dict]:
  from common.adapters import core  # noqa: PLC0415

  out = {}
  for path, layer in core.adapted(model).items():
    out[path] = {'a': np.asarray(layer.adapter.a[...]), 'b': np.asarray(layer.adapter.b[...])}
  return out


def export(
  run: str | os.PathLike,
  *,
  fmt: str = 'safetensors',
  out: str | os.PathLike | None = None,
  adapters: str = 'auto',
) -> Exported:
  """Exports the run's newest checkpoint (see the module docstring); returns what was written."""
  if fmt not in FORMATS:
    raise errors.UserError(f'--format={fmt}: use one of {", ".join(FORMATS)}')
  run = pathlib.Path(run)
  spec = spec_lib.read(run)
  mode = _adapter_mode(spec, adapters)
  families.arch_of(spec.config)  # an unexportable architecture stops before anything is read
  step = spec_lib.latest_step(run)
  tok = spec_lib.load_tokenizer(spec)
  if fmt == 'gguf' and tok is None:
    raise errors.UserError(
      f'{run}: GGUF files carry their tokenizer and this run has none (it trained on token ids); '
      'use --format=safetensors'
    )
  adapter_arrays = None
  if spec.adapter_kind == 'mixture':
    params, adapter_arrays, step = spec_lib.restore_mixture(run)
  elif mode == 'separate':
    model, _ = spec_lib.restore(run, adapters='apply')
    adapter_arrays = _lora_arrays(model)
    params = spec_lib.decoder_params(model)
  else:
    model, _ = spec_lib.restore(run, adapters='merge')
    params = spec_lib.decoder_params(model)
  cfg = dataclasses.replace(spec.config, dtype='float32')
  out = pathlib.Path(out) if out is not None else run / 'export' / fmt
  out.mkdir(parents=True, exist_ok=True)
  if fmt == 'safetensors':
    files = hf.save(out, cfg, params, tokenizer=tok, context_length=spec.context_length)
  else:
    gguf_writer.write(
      out / 'model.gguf',
      cfg,
      params,
      tok,
      context_length=spec.context_length,
      name=run.absolute().name,
    )
    files = ['model.gguf']
  if adapter_arrays is not None:
    files += _save_adapters(out, spec, adapter_arrays)
  record = {
    'run': str(run.absolute()),
    'step': step,
    'format': fmt,
    'architecture': families.arch_of(cfg),
    'adapters': mode,
    'files': files,
  }
  (out / 'export.json').write_text(json.dumps(record, indent=2) + '\n')
  return Exported(out, [*files, 'export.json'], step, mode)


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # one line and exit 2, like every other bad input
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
  p = _Parser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('run', help='the run directory (its model.json and checkpoints/)')
  p.add_argument('--format', default='safetensors', help=' | '.join(FORMATS))
  p.add_argument('--out', default=None, help='output directory (default RUN/export/FORMAT)')
  p.add_argument(
    '--adapters',
    default='auto',
    help='merge (LoRA into the base) | separate (base + adapters) | auto: merge what merges',
  )
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    done = export(args.run, fmt=args.format, out=args.out, adapters=args.adapters)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except OSError as e:  # an unwritable --out, a full disk
    print(f'error: {e.strerror or e}: {e.filename or args.out}', file=sys.stderr)
    return 2
  print(
    f'exported step {done.step} of {args.run} ({args.format}, adapters: {done.adapters}) to '
    f'{done.directory}: {", ".join(done.files)}'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
