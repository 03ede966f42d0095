"""common.models.spec: model.json, tokenizers it names, restoring a run's decoder (plain, wrapped,
LoRA applied / merged, mixture read raw), and load_model for chatting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common import checkpoint
from common.adapters import core
from common.models import bpe
from common.models import decoder
from common.models import spec
from common.models import tokenizer as tokenizer_lib
from tests.common.models import model_runs

CFG = model_runs.CFG
LORA_LAYERS = model_runs.LORA_LAYERS
MERGE_RTOL = model_runs.MERGE_RTOL


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """{kind: (workdir, trained model)} for every kind, trained once for this module."""
  root = tmp_path_factory.mktemp('runs')
  return {
    k: (root / k, model_runs.fit_run(root / k, k)) for k in ('plain', 'wrapped', 'lora', 'mixture')
  }


# ---------------------------------------------------------------------------------------------------
# model.json


def test_write_read_round_trip_and_tokenizer_forms(tmp_path):
  tok = model_runs.bpe_tokenizer()
  s = spec.write(tmp_path, CFG, tokenizer=tok, adapters=spec.lora_adapters({'a': 2}))
  back = spec.read(tmp_path)
  assert back == s
  assert back.tokenizer == {'dir': 'tokenizer'}
  assert spec.load_tokenizer(back).encode('the world') == tok.encode('the world')
  assert json.loads((tmp_path / 'model.json').read_text())['adapters']['layers'] == {
    'a': {'rank': 2, 'alpha': None}
  }
  spec.write(tmp_path, CFG, tokenizer='smollm2')
  assert spec.read(tmp_path).tokenizer == {'pretrained': 'smollm2'}


def test_read_errors_are_one_line(tmp_path):
  with pytest.raises(spec.SpecError, match='model.json does not exist'):
    spec.read(tmp_path)
  (tmp_path / 'model.json').write_text('{"version": 1, "config": {"d_model": 3}}')
  with pytest.raises(spec.SpecError, match='malformed.*missing DecoderConfig keys'):
    spec.read(tmp_path)
  with pytest.raises(spec.SpecError, match='adapters kind'):
    spec.write(tmp_path, CFG, adapters={'kind': 'weird'})
  with pytest.raises(spec.SpecError, match='names none'):
    spec.write(tmp_path, CFG, tokenizer={'path': 'x'})


def test_file_tokenizer_wraps_a_trained_bpe(tmp_path):
  texts = ['the cat sat on the mat', 'the dog sat on the log'] * 5
  tok = bpe.train_byte_level(texts, 300, special_tokens=['<|endoftext|>'])
  tok.save(str(tmp_path / 'tokenizer.json'))
  spec.write(tmp_path, CFG, tokenizer={'file': 'tokenizer.json', 'eos': '<|endoftext|>'})
  wrapped = spec.load_tokenizer(spec.read(tmp_path))
  assert wrapped.encode('the cat') == tok.encode('the cat').ids
  assert wrapped.eos_id == 0 and wrapped.stop_ids == (0,)
  assert wrapped.decode(wrapped.encode('the mat sat')) == 'the mat sat'
  assert wrapped.meta['pre'] == 'gpt2'


def test_tokenizer_from_vocab_keeps_ids():
  chars = '0123456789+-*/=().'
  tok = spec.tokenizer_from_vocab(
    ['<pad>', '<s>', '</s>', *chars],
    specials=['<pad>', '<s>', '</s>'],
    bos='<s>',
    eos='</s>',
    pad='<pad>',
    add_bos=True,
  )
  assert tok.encode('36-38=') == [1] + [3 + chars.index(c) for c in '36-38=']
  assert tok.decode([1, 6, 9, 2]) == '36'
  assert tok.stop_ids == (2,) and tok.pad_id == 0
  with pytest.raises(spec.SpecError, match='printable ASCII'):
    spec.tokenizer_from_vocab(['ab'], specials=[])


# ---------------------------------------------------------------------------------------------------
# Restoring runs.


@pytest.mark.parametrize('kind', ['plain', 'wrapped'])
def test_restore_gives_the_trained_decoder_bitwise(runs, kind):
  workdir, trained = runs[kind]
  model, s = spec.restore(workdir)
  assert s.path == (('lm',) if kind == 'wrapped' else ())
  x = model_runs.tokens()
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(trained(x)))


def test_lora_apply_equals_training_and_merge_is_close(runs):
  workdir, trained = runs['lora']
  applied, _ = spec.restore(workdir, adapters='apply')
  merged, _ = spec.restore(workdir, adapters='merge')
  base, _ = spec.restore(workdir, adapters='none')
  assert isinstance(merged, decoder.Decoder) and not core.adapted(merged)
  x = model_runs.tokens()
  want = np.asarray(trained(x))[..., : CFG.vocab_size]
  np.testing.assert_array_equal(np.asarray(applied(x))[..., : CFG.vocab_size], want)
  got = np.asarray(merged(x))[..., : CFG.vocab_size]
  np.testing.assert_allclose(got, want, rtol=0, atol=MERGE_RTOL * np.abs(want).max())
  # The adapters learnt something: without them the logits move by far more than the tolerance.
  off = np.abs(np.asarray(base(x))[..., : CFG.vocab_size] - want).max()
  assert off > 100 * MERGE_RTOL * np.abs(want).max()


def test_mixture_is_read_raw_and_never_merged(runs):
  workdir, trained = runs['mixture']
  with pytest.raises(spec.SpecError, match='route by input'):
    spec.restore(workdir, adapters='merge')
  base, arrays, step = spec.restore_mixture(workdir)
  assert step == 3
  assert sorted(arrays) == sorted(LORA_LAYERS)
  for path, layer in core.adapted(trained).items():
    for leaf in ('g', 'a', 'b'):
      np.testing.assert_array_equal(arrays[path][leaf], np.asarray(getattr(layer.adapter, leaf)))
  # The base is frozen: what the trained model holds under each adapter, and all the rest.
  want = spec.decoder_params(trained)
  assert sorted(base) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(base[k], want[k])


def test_restore_tree_detects_a_changed_leaf(runs, tmp_path):
  import shutil  # noqa: PLC0415

  workdir = tmp_path / 'copy'
  shutil.copytree(runs['mixture'][0], workdir)
  meta = workdir / 'checkpoints' / '3' / 'meta' / 'metadata'
  record = json.loads(meta.read_text())
  key = next(k for k in record['fingerprints'] if "['adapter']['a']" in k)
  record['fingerprints'][key] ^= 1
  meta.write_text(json.dumps(record))
  with pytest.raises(checkpoint.CheckpointError, match='corrupt'):
    checkpoint.restore_tree(workdir, ('model',))


def test_load_model_and_errors(runs, tmp_path):
  model, tok = spec.load_model(runs['plain'][0])
  assert isinstance(tok, tokenizer_lib.BPETokenizer) and tok.chat_template
  x = model_runs.tokens()
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(runs['plain'][1](x)))
  spec.write(tmp_path, CFG)
  with pytest.raises(spec.SpecError, match='no checkpoint'):
    spec.restore(tmp_path)
  with pytest.raises(spec.SpecError, match='token ids'):
    spec.load_model(tmp_path)
