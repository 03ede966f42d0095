"""Tests for common.config: variant parsing, typed overrides, locking, resume checks."""

import json

import ml_collections
import pytest

from common import config as config_lib
from common import errors


def _config():
  c = config_lib.base_config()
  c.lr = 0.1
  c.name = 'run'
  c.flag = False
  c.model = ml_collections.ConfigDict({'d_model': 8, 'tie': True})
  return c


# ---------------------------------------------------------------------------------------------------
# parse_arg.


@pytest.mark.parametrize(
  'arg, expected',
  [
    (None, ('', {})),
    ('', ('', {})),
    ('smoke', ('smoke', {})),
    ('smoke,seed=3', ('smoke', {'seed': '3'})),
    ('seed=3,train.num_steps=5', ('', {'seed': '3', 'train.num_steps': '5'})),
    (' smoke , seed = 3 ,', ('smoke', {'seed': '3'})),
    ('name=a=b', ('', {'name': 'a=b'})),
  ],
)
def test_parse_arg(arg, expected):
  assert config_lib.parse_arg(arg) == expected


def test_parse_arg_custom_variants():
  assert config_lib.parse_arg('full,seed=1', variants=('smoke', 'full')) == ('full', {'seed': '1'})


def test_parse_arg_unknown_variant():
  with pytest.raises(config_lib.ConfigError, match=r"unknown config variant 'big'.*smoke"):
    config_lib.parse_arg('big')


def test_parse_arg_two_variants():
  with pytest.raises(config_lib.ConfigError, match="two config variants given: 'smoke' and 'full'"):
    config_lib.parse_arg('smoke,full', variants=('smoke', 'full'))
  with pytest.raises(config_lib.ConfigError, match='two config variants'):
    config_lib.parse_arg('smoke,seed=1,smoke')


def test_config_error_is_a_user_error():
  assert issubclass(config_lib.ConfigError, errors.UserError)
  assert issubclass(config_lib.ConfigError, ValueError)


# ---------------------------------------------------------------------------------------------------
# finalize.


def test_finalize_coerces_with_the_existing_type():
  c = config_lib.finalize(
    _config(),
    {
      'seed': '3',
      'lr': '1e-3',
      'name': '42',
      'flag': 'true',
      'model.tie': '0',
      'train.num_steps': '5',
      'checkpoint.async_save': 'False',
    },
  )
  assert c.seed == 3 and type(c.seed) is int
  assert c.lr == 1e-3 and type(c.lr) is float
  assert c.name == '42' and type(c.name) is str
  assert c.flag is True
  assert c.model.tie is False
  assert c.train.num_steps == 5
  assert c.checkpoint.async_save is False


def test_finalize_int_to_float_field():
  c = config_lib.finalize(_config(), {'lr': '2'})
  assert c.lr == 2.0 and type(c.lr) is float


def test_finalize_accepts_typed_values():
  c = config_lib.finalize(_config(), {'seed': 7, 'model.d_model': 16})
  assert c.seed == 7 and c.model.d_model == 16


def test_finalize_parses_tuples_as_json():
  c = config_lib.finalize(_config(), {'sharding.rules': '[["batch", "data"], ["embed", null]]'})
  assert [tuple(r) for r in c.sharding.rules] == [('batch', 'data'), ('embed', None)]


@pytest.mark.parametrize(
  'key, match',
  [
    ('sed', "unknown config key 'sed'"),
    ('train.num_stepz', "unknown config key 'train.num_stepz'"),
    ('trian.num_steps', "unknown config key 'trian'"),
    ('model.d_model.x', "unknown config key 'model.d_model.x'"),
  ],
)
def test_finalize_rejects_unknown_keys(key, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.finalize(_config(), {key: '1'})


@pytest.mark.parametrize(
  'key, value, match',
  [
    ('seed', 'abc', "'seed' expects int, got 'abc'"),
    ('train.num_steps', '2.5', "'train.num_steps' expects int"),
    ('lr', 'fast', "'lr' expects float"),
    ('flag', 'yes', "'flag' expects bool"),
    ('sharding.rules', '[[', "'sharding.rules' expects tuple"),
  ],
)
def test_finalize_rejects_wrong_value_type(key, value, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.finalize(_config(), {key: value})


def test_finalize_rejects_typed_value_of_wrong_type():
  with pytest.raises(config_lib.ConfigError, match="'seed'"):
    config_lib.finalize(_config(), {'seed': [1, 2]})


def test_finalize_locks_against_new_keys():
  c = config_lib.finalize(_config(), {})
  with pytest.raises(AttributeError, match='locked'):
    c.new_key = 1
  with pytest.raises(AttributeError, match='locked'):
    c.train.new_key = 1
  c.train.num_steps = 9  # existing keys stay writable
  assert c.train.num_steps == 9


# ---------------------------------------------------------------------------------------------------
# to_dict, resume_differences, mesh_spec.


def test_to_dict_is_json_serialisable():
  c = config_lib.finalize(_config(), {})
  d = config_lib.to_dict(c)
  assert json.loads(json.dumps(d)) == d
  assert d['sharding']['rules'][0] == ['batch', ['data', 'fsdp']]
  assert d['model'] == {'d_model': 8, 'tie': True}
  assert config_lib.to_dict(d) == d


def test_resume_differences_ignores_mutable_keys():
  saved = config_lib.to_dict(_config())
  c = _config()
  c.train.num_steps = 1000
  c.train.log_every = 1
  c.train.eval_every = 7
  c.checkpoint.keep = 10
  c.checkpoint.resume_from = '/elsewhere'
  c.mesh.data = 2
  c.mesh.tensor = 4
  c.debug.kill_after_step = 3
  assert config_lib.resume_differences(saved, c) == []
  # Round-tripping through JSON (config.json) is not a difference either.
  assert config_lib.resume_differences(json.loads(json.dumps(saved)), c) == []


def test_resume_differences_reports_other_keys():
  saved = config_lib.to_dict(_config())
  c = _config()
  c.seed = 1
  c.model.d_model = 16
  c.train.num_steps = 5  # allowed, not reported
  c.extra = 'new'
  del saved['lr']
  assert config_lib.resume_differences(saved, c) == ['extra', 'lr', 'model.d_model', 'seed']


def test_resume_differences_allow_list_matches_exactly():
  saved = {'train': {'num_steps_x': 1}, 'checkpointer': {'a': 1}, 'data': {'num_workers': 1}}
  current = {'train': {'num_steps_x': 2}, 'checkpointer': {'a': 2}, 'data': {'num_workers': 4}}
  assert config_lib.resume_differences(saved, current) == ['checkpointer.a', 'train.num_steps_x']
  assert config_lib.resume_differences(saved, current, allow=('train.*',)) == [
    'checkpointer.a',
    'data.num_workers',
  ]


def test_a_moved_reward_model_run_resumes_but_a_changed_one_does_not():
  saved = {'rm': {'workdir': '/old/rm_qrm_seed0', 'num_steps': 100}}
  moved = {'rm': {'workdir': '/new/rm_qrm_seed0', 'num_steps': 100}}
  changed = {'rm': {'workdir': '/new/rm_qrm_seed0', 'num_steps': 50}}
  assert config_lib.resume_differences(saved, moved) == []
  assert config_lib.resume_differences(saved, changed) == ['rm.num_steps']
  # Any section's workdir is a location ('*.workdir'), but a key merely ending in 'workdir' is not.
  assert (
    config_lib.resume_differences({'teacher': {'workdir': 'a'}}, {'teacher': {'workdir': 'b'}})
    == []
  )
  assert config_lib.resume_differences(
    {'rm': {'subworkdir': 'a'}}, {'rm': {'subworkdir': 'b'}}
  ) == ['rm.subworkdir']


def test_mesh_spec_is_in_canonical_order():
  c = config_lib.base_config()
  c.mesh = ml_collections.ConfigDict({'tensor': 2, 'data': -1, 'fsdp': 4})
  assert config_lib.mesh_spec(c) == [('data', -1), ('fsdp', 4), ('tensor', 2)]
  assert config_lib.mesh_spec(config_lib.base_config()) == [
    ('data', -1),
    ('fsdp', 1),
    ('tensor', 1),
  ]


def test_mesh_spec_after_override():
  c = config_lib.finalize(config_lib.base_config(), {'mesh.fsdp': '2', 'mesh.tensor': '2'})
  assert config_lib.mesh_spec(c) == [('data', -1), ('fsdp', 2), ('tensor', 2)]


def test_a_key_added_since_a_run_was_saved_compares_as_its_legacy_value():
  """An RL run saved before rl.trim_multiple existed trained the whole padded batch: it resumes
  with the key at 0 (its maths), and the default (32) is named as the difference."""
  saved = {'rl': {'group_size': 4}, 'seed': 0}
  assert config_lib.with_added_keys(saved) == {
    'rl': {'group_size': 4, 'trim_multiple': 0},
    'seed': 0,
  }
  assert saved == {'rl': {'group_size': 4}, 'seed': 0}  # not modified
  now = {'rl': {'group_size': 4, 'trim_multiple': 32}, 'seed': 0}
  assert config_lib.resume_differences(saved, now) == ['rl.trim_multiple']
  assert (
    config_lib.resume_differences(saved, {**now, 'rl': {'group_size': 4, 'trim_multiple': 0}}) == []
  )
  assert config_lib.with_added_keys({'seed': 0}) == {'seed': 0}  # no rl section: nothing added
