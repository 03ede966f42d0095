"""common.models.gguf_convert: a quantized GGUF -> f32 / f16 / bf16 GGUF of the same model.

On tiny synthetic files of each family (several quantized tensor types, no fetched asset): every
metadata key but the file type survives, the loader reads the converted file back, f32 gives the
dequantized numbers exactly, f16 / bf16 give them rounded once (matrices only; norms stay f32), and
the converted model's logits agree with the original's.
"""

from flax import nnx
import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from common.models import gguf_convert
from common.models import loader
from tests.common.models import synthetic_gguf as syn

SPECS = {'llama': syn.LLAMA, 'gemma3': syn.GEMMA3, 'qwen2': syn.QWEN2}
ROUND = {'f32': np.float32, 'f16': np.float16, 'bf16': ml_dtypes.bfloat16}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path / 'cache'))


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  out = {}
  for arch, spec in SPECS.items():
    path = tmp_path_factory.mktemp('gguf') / f'tiny-{arch}.gguf'
    syn.write(path, spec, seed=len(arch))
    out[arch] = path
  return out


def _tensors(path):
  reader = loader.open_gguf(path)
  return reader, {t.name: (t.tensor_type, loader.dequantize(t)) for t in reader.tensors}


@pytest.mark.parametrize('dtype', ['f32', 'f16', 'bf16'])
@pytest.mark.parametrize('arch', SPECS)
def test_round_trip_values_and_metadata(files, tmp_path, arch, dtype):
  src = files[arch]
  out = tmp_path / f'{arch}-{dtype}.gguf'
  info = gguf_convert.convert(src, out, dtype)
  r0, before = _tensors(src)
  r1, after = _tensors(out)
  assert info['tensors'] == len(before) == len(after)
  meta0, meta1 = loader.read_metadata(r0), loader.read_metadata(r1)
  meta0.pop('general.file_type', None)
  file_type = meta1.pop('general.file_type')
  assert meta0 == meta1
  assert file_type == int(getattr(gguf.LlamaFileType, gguf_convert.DTYPES[dtype]))
  for name, (_, x) in before.items():
    qtype, y = after[name]
    assert y.shape == x.shape, name
    if x.ndim == 2:
      assert qtype.name == dtype.upper()
      expected = x.astype(ROUND[dtype]).astype(np.float32)
    else:
      assert qtype == gguf.GGMLQuantizationType.F32
      expected = x
    np.testing.assert_array_equal(y, expected, err_msg=name)


@pytest.mark.parametrize('arch', SPECS)
def test_converted_model_gives_the_same_logits(files, tmp_path, arch):
  tokens = jnp.asarray([[5, 17, 200, 3, 99, 42]], jnp.int32)
  logits = {}
  for dtype in ('f32', 'f16'):
    out = tmp_path / f'{arch}-{dtype}.gguf'
    gguf_convert.convert(files[arch], out, dtype)
    model, _, _ = loader.load_pretrained(out)
    logits[dtype] = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
  model, _, _ = loader.load_pretrained(files[arch])
  reference = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
  np.testing.assert_array_equal(logits['f32'], reference)
  np.testing.assert_allclose(logits['f16'], reference, atol=2e-2, rtol=2e-2)


def test_unknown_dtype_and_bad_source_are_one_line(files, tmp_path):
  with pytest.raises(gguf_convert.ConvertError, match='unknown dtype'):
    gguf_convert.convert(files['llama'], tmp_path / 'x.gguf', 'int8')
  with pytest.raises(loader.GGUFError, match='neither a model asset'):
    gguf_convert.convert(tmp_path / 'missing.gguf', tmp_path / 'x.gguf', 'f16')
  assert not list(tmp_path.glob('*.gguf')) and not list(tmp_path.glob('.*.tmp'))
