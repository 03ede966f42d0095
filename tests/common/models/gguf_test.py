"""GGUF -> decoder conversion on tiny synthetic files of each family (no fetched asset).

Each family's layout traps are checked two ways: the loaded model's logits against an independent
float64 numpy forward that runs llama.cpp's semantics on the stored tensors (tests/common/models/
synthetic_gguf.py), and the conventions directly (un-permuted llama Q/K, Gemma norms minus one, the
untied Qwen head, zero vocabulary padding). Real weights are compared with transformers in
real_model_test.py.
"""

import dataclasses

from flax import nnx
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import assets
from common import sharding
from common.models import decoder
from common.models import families
from common.models import loader
from tests.common.models import synthetic_gguf as syn

SPECS = {'llama': syn.LLAMA, 'gemma3': syn.GEMMA3, 'qwen2': syn.QWEN2}
TOKENS = np.array([5, 17, 200, 3, 99, 260, 42, 7, 11, 150], np.int32)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path / 'cache'))


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """{arch: (path, reference tensors)} written once for the module."""
  out = {}
  for arch, spec in SPECS.items():
    path = tmp_path_factory.mktemp('gguf') / f'tiny-{arch}.gguf'
    out[arch] = (path, syn.write(path, spec, seed=len(arch)))
  return out


@jax.jit
def _logits(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def _run(model, tokens):
  graphdef, state = nnx.split(model)
  return np.asarray(_logits(graphdef, state, jnp.asarray(tokens)[None]))[0]


def _param(model, *path):
  return np.asarray(dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))[path].get_value())


@pytest.mark.parametrize('arch', SPECS)
def test_logits_match_llama_cpp_semantics(files, arch):
  path, ref = files[arch]
  model, cfg, _ = loader.load_pretrained(path)
  want = syn.reference_logits(ref, SPECS[arch], TOKENS)
  got = _run(model, TOKENS)
  assert got.shape == (len(TOKENS), cfg.padded_vocab)
  scale = np.abs(want).max()
  np.testing.assert_allclose(got[:, : cfg.vocab_size], want, atol=2e-5 * scale, rtol=0)
  assert np.all(got[:, cfg.vocab_size :] == decoder.MASKED_LOGIT)


def test_configs_from_metadata(files):
  llama = loader.load_config(files['llama'][0])
  gemma = loader.load_config(files['gemma3'][0])
  qwen = loader.load_config(files['qwen2'][0])
  vocab = len(syn.bpe_vocab()[0])
  assert (llama.vocab_size, llama.padded_vocab, llama.tie_embeddings) == (vocab, 384, True)
  assert (llama.head_dim, llama.num_kv_heads, llama.norm_eps) == (16, 2, pytest.approx(1e-5))
  assert not llama.qkv_bias and not llama.norm_plus_one
  assert qwen.qkv_bias and not qwen.tie_embeddings and qwen.rope_theta == 1e6
  assert gemma.head_dim == 32 and gemma.num_kv_heads == 1 and gemma.tie_embeddings
  assert gemma.norm_plus_one and gemma.qk_norm and gemma.post_norms and gemma.embed_scale
  assert (gemma.sliding_window, gemma.sliding_window_pattern) == (3, 2)
  assert (gemma.rope_theta, gemma.rope_local_theta, gemma.query_pre_attn_scalar) == (1e6, 100.0, 32)
  assert gemma.activation == 'gelu_tanh'
  assert [gemma.is_local_layer(i) for i in range(2)] == [True, False]


def test_gemma3_defaults_when_metadata_is_silent():
  """Gemma-3-270M's GGUF stores no pattern or local base: llama.cpp's / HF's defaults apply."""
  meta = {
    'general.architecture': 'gemma3',
    'gemma3.embedding_length': 640,
    'gemma3.block_count': 18,
    'gemma3.feed_forward_length': 2048,
    'gemma3.attention.head_count': 4,
    'gemma3.attention.head_count_kv': 1,
    'gemma3.attention.key_length': 256,
    'gemma3.attention.layer_norm_rms_epsilon': 1e-6,
    'gemma3.rope.freq_base': 1e6,
    'gemma3.attention.sliding_window': 512,
  }
  cfg = families.config_from_metadata(meta, {'token_embd.weight': (262144, 640)})
  assert (cfg.sliding_window_pattern, cfg.rope_local_theta) == (6, 10000.0)
  assert cfg.query_pre_attn_scalar == 256.0
  assert [i for i in range(18) if not cfg.is_local_layer(i)] == [5, 11, 17]
  per_layer = {**meta, 'gemma3.attention.sliding_window_pattern': [True, True, False] * 6}
  cfg = families.config_from_metadata(per_layer, {'token_embd.weight': (8, 640)})
  assert cfg.sliding_window_pattern == 3
  unsupported = (
    ({'gemma3.final_logit_softcapping': 30.0}, 'final logit softcap'),
    ({'gemma3.rope.scaling.type': 'linear', 'gemma3.rope.scaling.factor': 8.0}, 'RoPE scaling'),
  )
  for extra, message in unsupported:
    with pytest.raises(families.UnsupportedModelError, match=message):
      families.config_from_metadata({**meta, **extra}, {'token_embd.weight': (8, 640)})


def test_layout_conventions(files):
  """The three traps, checked on the parameters themselves."""
  (lpath, lref), (gpath, gref), (qpath, qref) = files['llama'], files['gemma3'], files['qwen2']
  llama, lcfg, _ = loader.load_pretrained(lpath)
  stored_q = lref['blk.1.attn_q.weight']
  np.testing.assert_allclose(
    _param(llama, 'layers', 1, 'attn', 'q_proj', 'kernel'),
    families.unpermute_rows(stored_q, lcfg.num_heads).T,
    rtol=1e-6,
  )
  np.testing.assert_allclose(  # the inverse really inverts llama.cpp's permute
    families.unpermute_rows(families.permute_rows(stored_q, 2), 2), stored_q
  )
  emb = _param(llama, 'embed', 'embedding')
  assert emb.shape == (lcfg.padded_vocab, lcfg.d_model) and not emb[lcfg.vocab_size :].any()

  gemma, _, _ = loader.load_pretrained(gpath)
  np.testing.assert_allclose(
    _param(gemma, 'layers', 0, 'attn', 'k_norm', 'scale'),
    gref['blk.0.attn_k_norm.weight'] - 1.0,
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    _param(gemma, 'final_norm', 'scale'), gref['output_norm.weight'] - 1.0, rtol=1e-6
  )

  qwen, qcfg, _ = loader.load_pretrained(qpath)
  head = _param(qwen, 'lm_head', 'kernel')
  np.testing.assert_allclose(head[:, : qcfg.vocab_size], qref['output.weight'].T, rtol=1e-6)
  assert not head[:, qcfg.vocab_size :].any()
  np.testing.assert_allclose(
    _param(qwen, 'layers', 0, 'attn', 'v_proj', 'bias'), qref['blk.0.attn_v.bias'], rtol=1e-6
  )


def test_sharded_load_matches_unsharded(files):
  path, _ = files['qwen2']
  mesh = sharding.make_mesh((('data', 2), ('fsdp', 2), ('tensor', 2)))
  model, cfg, _ = loader.load_pretrained(path, mesh=mesh)
  expected = sharding.state_shardings(nnx.state(loader.abstract_model(cfg)), mesh)
  flat_expected = dict(nnx.to_flat_state(expected))
  for p, var in nnx.to_flat_state(nnx.state(model)):
    assert var.get_value().sharding == flat_expected[p].get_value(), p
  kernel = dict(nnx.to_flat_state(nnx.state(model)))[('layers', 0, 'attn', 'q_proj', 'kernel')]
  assert kernel.get_value().sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  single, _, _ = loader.load_pretrained(path)
  with jax.set_mesh(mesh):
    got = _run(model, TOKENS)
  np.testing.assert_allclose(got, _run(single, TOKENS), rtol=1e-5, atol=1e-5)


def test_loads_inside_an_active_mesh_context(files):
  """Training scripts load their model inside `jax.set_mesh`; the abstract shapes must not read
  logical names as mesh axes there (this failed with 'Resource axis: vocab ... not found')."""
  path, _ = files['llama']
  mesh = sharding.make_mesh((('data', 2), ('fsdp', 2), ('tensor', 2)))
  with jax.set_mesh(mesh):
    model, _, _ = loader.load_pretrained(path, mesh=mesh)
    got = _run(model, TOKENS)
  single, _, _ = loader.load_pretrained(path)
  np.testing.assert_allclose(got, _run(single, TOKENS), rtol=1e-5, atol=1e-5)


def test_converts_once_then_loads_from_cache(files, monkeypatch):
  path, _ = files['llama']
  first, cfg, tok = loader.load_pretrained(path, dtype='bfloat16')
  assert cfg.dtype == 'bfloat16'
  assert _param(first, 'embed', 'embedding').dtype == np.float32  # parameters stay f32

  def fail(*args, **kwargs):
    raise AssertionError('converted twice')

  monkeypatch.setattr(loader, 'convert', fail)
  second, cfg2, tok2 = loader.load_pretrained(path)
  assert cfg2 == dataclasses.replace(cfg, dtype='float32')
  np.testing.assert_array_equal(
    _param(first, 'layers', 0, 'mlp', 'down_proj', 'kernel'),
    _param(second, 'layers', 0, 'mlp', 'down_proj', 'kernel'),
  )
  assert tok2.encode('the world') == tok.encode('the world')


def test_fast_reader_reads_what_gguf_reader_reads(files):
  for path, _ in files.values():
    fast, slow = loader.open_gguf(path), gguf.GGUFReader(path)
    assert list(fast.fields) == list(slow.fields)
    for key, field in slow.fields.items():
      assert fast.fields[key].types == field.types, key
      assert fast.fields[key].contents() == field.contents(), key
    assert [t.name for t in fast.tensors] == [t.name for t in slow.tensors]
    for a, b in zip(fast.tensors, slow.tensors, strict=True):
      assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data)


def test_unknown_architecture_is_one_line(tmp_path):
  path = tmp_path / 'mamba.gguf'
  w = gguf.GGUFWriter(str(path), 'mamba')
  w.add_tensor('token_embd.weight', np.zeros((4, 32), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(families.UnsupportedModelError, match=r"'mamba'.*llama, gemma3, qwen2") as e:
    loader.load_pretrained(path)
  assert '\n' not in str(e.value)


def test_truncated_gguf_is_one_line(files, tmp_path):
  path, _ = files['llama']
  size = path.stat().st_size
  for cut in (size - 1000, 600):  # inside the tensor data; inside the metadata
    bad = tmp_path / f'cut{cut}.gguf'
    bad.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(loader.GGUFError, match='truncated') as e:
      loader.load_pretrained(bad)
    assert '\n' not in str(e.value)


def test_checksum_mismatch_names_the_fix(files, tmp_path):
  path, _ = files['llama']
  src = loader.Source(path, '0' * 64, 'smollm2')
  with pytest.raises(loader.GGUFError, match='fetch --force smollm2'):
    loader.convert(src, tmp_path / 'out')


def test_missing_asset_and_unknown_name(tmp_path, monkeypatch):
  monkeypatch.setenv('MONOREPO_ASSETS_DIR', str(tmp_path / 'no_assets'))
  with pytest.raises(assets.AssetError, match='python -m common.assets fetch smollm2'):
    loader.load_pretrained('smollm2')
  with pytest.raises(assets.AssetError, match='fetch gemma3_270m'):
    loader.load_pretrained('gemma3')  # alias
  with pytest.raises(loader.GGUFError, match='neither a model asset'):
    loader.load_pretrained(tmp_path / 'nope.gguf')
