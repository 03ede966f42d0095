"""common.rl.policies: the warm policies (tiny, and a pretrained model's SFT warm-up) are trained
once and then read back bitwise from the cache; the policy factory refuses an unknown model.kind."""

import json

from flax import nnx
import jax
import numpy as np
import pytest

from common import config as config_lib
from common import data
from common import sharding
from common import testing
from common.datasets import reasoning_gym as rgd
from common.models import decoder
from common.models import loader
from common.rl import policies
from common.rl import tasks
from experiments.ebpo.configs import base
from tests.common.models import synthetic_gguf as syn

TINY = policies.WarmupConfig(
  d_model=16, num_layers=1, num_heads=2, mlp_dim=32, sft_examples=64, steps=3, batch_size=4
)


def _params(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_warm_policy_is_cached_and_read_back_bitwise(tmp_path, monkeypatch):
  monkeypatch.setenv('MONOREPO_DATA_DIR', str(data.data_dir()))  # keep the built data sets
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path))
  trained, curve = policies.warm_policy(TINY)
  assert len(curve) == TINY.steps and all(np.isfinite(curve))
  (cached_file,) = (tmp_path / 'rl_warmup').glob('*.npz')
  assert cached_file.stem == policies._fingerprint(TINY)  # noqa: SLF001
  again, curve2 = policies.warm_policy(TINY)
  assert curve2 == curve
  for a, b in zip(_params(trained), _params(again), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with sharding.unsharded():
    fresh = decoder.Decoder(policies.decoder_config(TINY), rngs=nnx.Rngs(TINY.seed))
  assert any(
    not np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(_params(fresh), _params(trained), strict=True)
  )  # the SFT steps moved the weights
  # Another config is another cache entry.
  assert policies._fingerprint(TINY) != policies._fingerprint(policies.WarmupConfig())  # noqa: SLF001


def test_unknown_model_kind_is_a_config_error():
  config = base.get_config('smoke,model.kind=other')
  with pytest.raises(config_lib.ConfigError, match="model.kind='other'"):
    policies.create_policy(config, None, sharding.DEFAULT_RULES)


def test_description_exports_the_tiny_policy_with_its_tokenizer():
  config = base.get_config('smoke')
  d = policies.description(config)
  assert d['config'] == policies.decoder_config(policies.WarmupConfig(**config.warmup.to_dict()))
  chars = tasks.CharTokenizer()
  for text in ('36-38=', '(7*8)/2=', '-2'):
    assert d['tokenizer'].encode(text) == chars.encode(text)
    assert d['tokenizer'].decode(chars.encode(text, add_eos=True)) == text
  assert d['tokenizer'].stop_ids == tuple(chars.stop_ids)
  assert d['tokenizer'].pad_id == chars.pad_id


def test_worked_answer_is_what_the_scorer_gives_full_marks():
  rows = tasks.load_examples('smollm2', 'train')
  by_task = {r['task']: r for r in rows}
  assert sorted(by_task) == ['basic_arithmetic', 'chain_sum', 'leg_counting']
  for task, row in by_task.items():
    reply = tasks.worked_answer(row)
    assert rgd.score(task, reply, row, binary=True) == 1.0, reply
    expression = json.loads(row['metadata']).get('expression')
    if expression:  # the arithmetic tasks write the sum; leg counting only the final sentence
      assert reply == f'{expression} = {row["answer"]}. The answer is {row["answer"]}.'
    else:
      assert reply == f'The answer is {row["answer"]}.'
  chat = tasks.chat_sft_messages(rows[0])
  assert [m['role'] for m in chat] == ['user', 'assistant']
  assert chat[0]['content'].endswith(tasks.CHAT_INSTRUCTION)


def test_pretrained_warmup_is_cached_placed_on_the_mesh_and_off_at_zero_steps(
  tmp_path, monkeypatch
):
  monkeypatch.setenv('MONOREPO_DATA_DIR', str(data.data_dir()))  # keep the built data sets
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path / 'cache'))
  gguf = tmp_path / 'tiny.gguf'
  syn.write(gguf, syn.LLAMA)  # a chat template and a BPE tokenizer, random weights
  mesh = sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])
  released = loader.load_pretrained(gguf, mesh=mesh)[0]

  model, curve = policies.warm_pretrained(gguf, policies.PretrainedWarmup(), 'smollm2', mesh=mesh)
  assert curve == []  # steps = 0: the released model, nothing trained or cached
  testing.assert_trees_equal(_params(model), _params(released))
  assert not (tmp_path / 'cache' / 'rl_warmup').exists()

  cfg = policies.PretrainedWarmup(steps=2, sft_examples=12, batch_size=2, seq_len=128, lr=1e-3)
  warm, curve = policies.warm_pretrained(gguf, cfg, 'smollm2', mesh=mesh)
  assert len(curve) == 2 and all(np.isfinite(curve))
  (cached,) = (tmp_path / 'cache' / 'rl_warmup').glob('pretrained-*.npz')
  again, curve2 = policies.warm_pretrained(gguf, cfg, 'smollm2', mesh=mesh)
  assert curve2 == curve
  testing.assert_trees_equal(_params(again), _params(warm))  # read back bitwise
  assert len(list(cached.parent.iterdir())) == 1
  assert any(
    not np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(_params(released), _params(warm), strict=True)
  )  # the SFT steps moved the weights
  for a, b in zip(_params(released), _params(warm), strict=True):
    assert a.sharding == b.sharding  # placed as the loader places the released model
  other = policies._pretrained_fingerprint(str(gguf), 'smollm2_easy', cfg)  # noqa: SLF001
  assert cached.stem != f'pretrained-{other}'  # another task set is another cache entry
