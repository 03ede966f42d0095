"""Export round trips: a decoder out to safetensors (transformers' layout) and GGUF, and back in.

Per family (llama, qwen2, gemma3; random parameters, norms and biases away from their init): our
safetensors reader gives the same logits bitwise, the loader reads our GGUF back bitwise (llama,
qwen2; gemma3's norms are stored as 1 + w and round once), tokenizers survive both, and, when
transformers is installed (requirements-reference.txt), transformers' model computes the same logits
to float tolerance and its tokenizer the same ids. Then `python -m common.export` on trained runs:
plain, LoRA (merged by default, or separate), mixture (separate only) and its one-line errors.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

from flax import nnx
import numpy as np
import pytest

from common import assets
from common import export
from common import sharding
from common.models import decoder
from common.models import families
from common.models import gguf_writer
from common.models import hf
from common.models import loader
from common.models import spec
from tests.common.models import model_runs

LLAMA = model_runs.CFG
QWEN2 = dataclasses.replace(LLAMA, qkv_bias=True, tie_embeddings=False, rope_theta=1e6)
GEMMA3 = decoder.DecoderConfig(
  vocab_size=310,
  d_model=32,
  num_layers=4,
  num_heads=4,
  num_kv_heads=1,
  head_dim=16,
  mlp_dim=64,
  rope_theta=1e6,
  activation='gelu_tanh',
  qk_norm=True,
  post_norms=True,
  embed_scale=True,
  norm_plus_one=True,
  sliding_window=3,
  sliding_window_pattern=2,
  rope_local_theta=100.0,
)
FAMILIES = {'llama': LLAMA, 'qwen2': QWEN2, 'gemma3': GEMMA3}
TEXT = 'the world, 12 <|im_start|>'
# transformers (PyTorch) against the decoder (JAX), both float32: summation orders differ.
TORCH_ATOL = 2e-5  # measured: at most 3.3e-6 on logits of about 3.8


def tokenizer_for(arch: str):
  if arch == 'gemma3':
    return model_runs.spm_tokenizer()
  return model_runs.bpe_tokenizer('qwen2' if arch == 'qwen2' else 'smollm')


def random_params(cfg: decoder.DecoderConfig, seed: int = 0) -> spec.Params:
  """Every parameter drawn at random (gemma's norm w around 0, others around 1; biases nonzero)."""
  with sharding.unsharded():
    params = spec.decoder_params(decoder.Decoder(cfg, rngs=nnx.Rngs(seed)))
  rng = np.random.default_rng(seed)
  out = {}
  for path, w in params.items():
    x = rng.standard_normal(w.shape).astype(np.float32)
    if path[-1] == 'scale':
      x = 0.2 * x + (0.0 if cfg.norm_plus_one else 1.0)
    elif path[-1] == 'bias':
      x = 0.3 * x
    else:
      x = x / np.sqrt(w.shape[0] if path[-1] == 'kernel' else w.shape[-1])
    out[path] = x.astype(np.float32)
  return out


def logits(model, x) -> np.ndarray:
  return np.asarray(model(x))[..., : model.cfg.vocab_size]


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def family(request):
  arch = request.param
  cfg = FAMILIES[arch]
  params = random_params(cfg)
  return arch, cfg, params, spec.build(cfg, params), tokenizer_for(arch)


def test_arch_of_and_what_no_family_computes():
  assert {a: families.arch_of(c) for a, c in FAMILIES.items()} == {a: a for a in FAMILIES}
  with pytest.raises(families.UnsupportedModelError, match='qk_norm'):
    families.arch_of(dataclasses.replace(LLAMA, activation='gelu_tanh'))
  with pytest.raises(families.UnsupportedModelError, match='attn_logit_softcap'):
    families.arch_of(dataclasses.replace(LLAMA, attn_logit_softcap=30.0))
  local = dataclasses.replace(LLAMA, sliding_window=4, sliding_window_pattern=2)
  with pytest.raises(families.UnsupportedModelError, match='sliding_window'):
    families.arch_of(local)


def test_safetensors_round_trip_is_bitwise(family, tmp_path):
  arch, cfg, params, model, tok = family
  files = hf.save(tmp_path, cfg, params, tokenizer=tok, context_length=32)
  assert {'model.safetensors', 'config.json', 'tokenizer_config.json'} <= set(files)
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['architectures'] == [hf.ARCHITECTURES[arch][0]]
  names = set(hf.read_tensors(tmp_path))
  assert ('lm_head.weight' in names) == (not cfg.tie_embeddings)
  assert hf.read_tensors(tmp_path)['model.embed_tokens.weight'].shape == (cfg.vocab_size, 32)
  back, back_cfg, back_tok = hf.load(tmp_path)
  assert families.arch_of(back_cfg) == arch
  x = model_runs.tokens(cfg.vocab_size)
  np.testing.assert_array_equal(logits(back, x), logits(model, x))
  assert back_tok.encode(TEXT) == tok.encode(TEXT)
  assert back_tok.chat_template == tok.chat_template


def test_gguf_round_trip_through_the_loader(family, tmp_path, monkeypatch):
  arch, cfg, params, model, tok = family
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path / 'cache'))
  gguf_writer.write(tmp_path / 'm.gguf', cfg, params, tok, context_length=32, name='tiny')
  back, back_cfg, back_tok = loader.load_pretrained(tmp_path / 'm.gguf')
  assert loader.context_length(tmp_path / 'm.gguf') == 32
  x = model_runs.tokens(cfg.vocab_size)
  if arch == 'gemma3':  # (1 + w) - 1 rounds the norm scales once in float32
    want = logits(model, x)
    np.testing.assert_allclose(logits(back, x), want, rtol=0, atol=1e-5 * np.abs(want).max())
  else:
    np.testing.assert_array_equal(logits(back, x), logits(model, x))
  assert back_tok.encode(TEXT) == tok.encode(TEXT)
  assert back_tok.stop_ids == tok.stop_ids and back_tok.chat_template == tok.chat_template


def test_transformers_computes_the_same_logits(family, tmp_path):
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  arch, cfg, params, model, tok = family
  hf.save(tmp_path, cfg, params, tokenizer=tok, context_length=32)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  assert type(theirs).__name__ == hf.ARCHITECTURES[arch][0]
  x = model_runs.tokens(cfg.vocab_size)
  with torch.no_grad():
    got = theirs(torch.tensor(x, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, logits(model, x), rtol=0, atol=TORCH_ATOL)
  their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert their_tok.encode(TEXT) == tok.encode(TEXT)  # BOS too where the model adds it (gemma)


def test_transformers_reads_a_character_tokenizer(tmp_path):
  transformers = pytest.importorskip('transformers')
  tok = spec.tokenizer_from_vocab(
    ['<pad>', '<s>', '</s>', *'0123456789+-=()'],
    specials=['<pad>', '<s>', '</s>'],
    bos='<s>',
    eos='</s>',
    pad='<pad>',
    add_bos=True,
  )
  hf.save_tokenizer(tmp_path, tok, context_length=None)
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert theirs.encode('36-38=') == tok.encode('36-38=') == [1, 6, 9, 14, 6, 11, 15]
  assert theirs.decode(tok.encode('1+2'), skip_special_tokens=True) == '1+2'


# ---------------------------------------------------------------------------------------------------
# python -m common.export on trained runs.


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  return {k: (root / k, model_runs.fit_run(root / k, k)) for k in ('plain', 'lora', 'mixture')}


def test_export_plain_run_both_formats(runs, tmp_path, monkeypatch, capsys):
  workdir, trained = runs['plain']
  x = model_runs.tokens()
  assert export.main([str(workdir), f'--out={tmp_path / "st"}']) == 0
  assert 'exported step 3' in capsys.readouterr().out
  record = json.loads((tmp_path / 'st' / 'export.json').read_text())
  assert record['step'] == 3 and record['adapters'] == 'none' and record['architecture'] == 'llama'
  back, _, _ = hf.load(tmp_path / 'st')
  np.testing.assert_array_equal(logits(back, x), logits(trained, x))

  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path / 'cache'))
  assert export.main([str(workdir), '--format=gguf']) == 0  # default: RUN/export/gguf
  back, _, tok = loader.load_pretrained(workdir / 'export' / 'gguf' / 'model.gguf')
  np.testing.assert_array_equal(logits(back, x), logits(trained, x))
  assert tok.encode(TEXT) == model_runs.bpe_tokenizer().encode(TEXT)


def test_export_lora_merged_and_separate(runs, tmp_path):
  workdir, trained = runs['lora']
  x = model_runs.tokens()
  want = logits(trained, x)
  done = export.export(workdir, out=tmp_path / 'merged')
  assert done.adapters == 'merged' and 'adapters.safetensors' not in done.files
  merged, _, _ = hf.load(tmp_path / 'merged')
  np.testing.assert_allclose(
    logits(merged, x), want, rtol=0, atol=model_runs.MERGE_RTOL * np.abs(want).max()
  )
  np.testing.assert_array_equal(logits(merged, x), logits(spec.restore(workdir)[0], x))

  done = export.export(workdir, out=tmp_path / 'separate', adapters='separate')
  assert done.adapters == 'separate' and 'adapters.safetensors' in done.files
  from safetensors import numpy as st_numpy  # noqa: PLC0415

  arrays = st_numpy.load_file(str(tmp_path / 'separate' / 'adapters.safetensors'))
  assert sorted(arrays) == sorted(f'{p}/{leaf}' for p in model_runs.LORA_LAYERS for leaf in 'ab')
  config = json.loads((tmp_path / 'separate' / 'adapter_config.json').read_text())
  assert config['kind'] == 'mergeable' and config['layers']['layers/0/mlp/up_proj']['rank'] == 4
  base, _, _ = hf.load(tmp_path / 'separate')
  np.testing.assert_array_equal(
    logits(base, x), logits(spec.restore(workdir, adapters='none')[0], x)
  )


def test_export_mixture_keeps_adapters_separate(runs, tmp_path, capsys):
  workdir, trained = runs['mixture']
  assert export.main([str(workdir), '--adapters=merge']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'route by input' in err
  done = export.export(workdir, out=tmp_path / 'mix')
  assert done.adapters == 'separate'
  from safetensors import numpy as st_numpy  # noqa: PLC0415

  arrays = st_numpy.load_file(str(tmp_path / 'mix' / 'adapters.safetensors'))
  assert sorted(arrays) == sorted(f'{p}/{leaf}' for p in model_runs.LORA_LAYERS for leaf in 'abg')
  assert json.loads((tmp_path / 'mix' / 'adapter_config.json').read_text())['method'] == 'gated'
  base, _, _ = hf.load(tmp_path / 'mix')
  want = spec.decoder_params(trained)
  x = model_runs.tokens()
  np.testing.assert_array_equal(logits(base, x), logits(spec.build(LLAMA, want), x))


@pytest.mark.parametrize(
  'args, message',
  [
    (['{missing}'], 'is not a run directory'),
    (['{plain}', '--format=onnx'], 'use one of safetensors, gguf'),
    (['{notok}', '--format=gguf'], 'carry their tokenizer'),
    (['{nomodel}'], 'model.json does not exist'),
    (['{plain}', '--bogus'], 'unrecognized arguments'),
  ],
)
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys, args, message):
  notok = tmp_path / 'notok'
  shutil.copytree(runs['plain'][0], notok)
  spec.write(notok, LLAMA)
  (tmp_path / 'nomodel').mkdir()
  paths = {
    'missing': tmp_path / 'nowhere',
    'plain': runs['plain'][0],
    'notok': notok,
    'nomodel': tmp_path / 'nomodel',
  }
  argv = [a.format(**paths) for a in args]
  try:
    rc = export.main(argv)
  except SystemExit as e:  # argparse's own errors, one line too
    rc = e.code
  err = capsys.readouterr().err
  assert rc == 2 and err.count('\n') == 1 and message in err, err


def test_command_line(tmp_path):
  proc = subprocess.run(
    [sys.executable, '-m', 'common.export', str(tmp_path / 'nowhere')],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
    f'error: {tmp_path / "nowhere"} is not a run directory'
  ]


def test_gemma3_gguf_refuses_a_query_scale_it_cannot_store(tmp_path):
  cfg = dataclasses.replace(GEMMA3, query_pre_attn_scalar=64.0)
  with pytest.raises(gguf_writer.GGUFWriteError, match='query_pre_attn_scalar'):
    gguf_writer.write(tmp_path / 'g.gguf', cfg, random_params(cfg), model_runs.spm_tokenizer())


# ---------------------------------------------------------------------------------------------------
# Real weights (python -m pytest -m real_model; needs the asset and requirements-reference.txt).

REAL_RTOL = 2e-3  # of the largest |logit|, as tests/common/models/real_model_test.py


@pytest.mark.real_model
@pytest.mark.parametrize('name', ['smollm2', 'gemma3_270m', 'qwen2_5_coder_0_5b'])
def test_real_model_exports_to_transformers_and_back(name, tmp_path, monkeypatch):
  if not assets.is_fetched(name):
    pytest.skip(f'{name} is not fetched: python -m common.assets fetch {name}')
  torch = pytest.importorskip('torch', reason='pip install -r requirements-reference.txt')
  transformers = pytest.importorskip(
    'transformers', reason='pip install -r requirements-reference.txt'
  )
  model, cfg, tok = loader.load_pretrained(name)
  params = spec.decoder_params(model)
  text = 'The three primary colors are'
  ids = (
    tok.encode_chat([{'role': 'user', 'content': text}]) if tok.chat_template else tok.encode(text)
  )
  x = np.asarray([ids], np.int32)
  want = logits(model, x)
  hf.save(tmp_path / 'st', cfg, params, tokenizer=tok, context_length=loader.context_length(name))
  theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'st', dtype=torch.float32)
  with torch.no_grad():
    got = theirs(torch.tensor(x, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, want, rtol=0, atol=REAL_RTOL * np.abs(want).max())
  their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / 'st')
  for t in (text, "Hello world! How's it going?", 'Numbers: 1234567890 3.14159 -42'):
    assert their_tok.encode(t) == tok.encode(t), t
  if tok.chat_template:
    chat = [{'role': 'user', 'content': text}]
    assert their_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
      tok.apply_chat_template(chat)
    )
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path / 'cache'))
  gguf_writer.write(tmp_path / 'm.gguf', cfg, params, tok, context_length=32)
  back, _, back_tok = loader.load_pretrained(tmp_path / 'm.gguf')
  if cfg.norm_plus_one:
    np.testing.assert_allclose(logits(back, x), want, rtol=0, atol=1e-5 * np.abs(want).max())
  else:
    np.testing.assert_array_equal(logits(back, x), want)
  assert back_tok.encode(text) == tok.encode(text)
