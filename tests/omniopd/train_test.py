"""OmniOPD end to end on the smoke config (a seconds-long warm-up): it trains with teacher calls
counted, a killed-and-resumed run is bitwise the uninterrupted one, a teacher that times out or
says nothing is counted and skipped without stopping the run, 8 devices == 1 device, and the
baselines (white-box OPD, SFT on traces, GRPO) run on the same footing."""

import time

import jax
import numpy as np
import pytest

from common import config as config_lib
from common import metrics as metrics_lib
from common import sharding
from common import train_loop
from experiments.omniopd.configs import base
from projects.omniopd import evaluate
from projects.omniopd import models
from projects.omniopd import train
from tests.common.rl import toy

# A warm-up of seconds (its own cache entry, shared with tests/ead), 3 steps, 8 eval prompts.
FAST = (
  'smoke,warmup.steps=30,warmup.sft_examples=256,data.max_eval=8,data.max_train=64,'
  'rl.prompts_per_step=8,rl.eval_batch=8,train.num_steps=3,train.eval_every=3,'
  'train.log_every=1,checkpoint.every_steps=1,checkpoint.async_save=False'
)
SKIP = set(train.TIMING_KEYS) | {'time'}


def _rows(workdir):
  return [
    {k: v for k, v in r.items() if k not in SKIP}
    for r in metrics_lib.read_jsonl(workdir / 'metrics.jsonl')
  ]


def _one_device():
  return sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])


def test_smoke_trains_counts_teacher_calls_and_resumes_bitwise(tmp_path):
  cfg = base.get_config(FAST)
  full = train.train_and_evaluate(cfg, tmp_path / 'full', mesh=_one_device())
  rows = [r for r in _rows(tmp_path / 'full') if r['split'] == 'train']
  assert [r['teacher_calls'] for r in rows] == [8, 16, 24]  # one audit per rollout
  assert all(r['audits'] + r['audits_skipped'] == 8 for r in rows)
  assert rows[-1]['student_tokens'] > 0 and np.isfinite(full['train']['loss'])
  summary = evaluate.run_summary(tmp_path / 'full')
  assert summary['eval_steps'] == [0, 3] and summary['teacher_calls'] == [0.0, 24.0]
  cut = base.get_config(FAST + ',debug.sigterm_after_step=2')
  with pytest.raises(train_loop.Preempted):
    train.train_and_evaluate(cut, tmp_path / 'cut', mesh=_one_device())
  again = train.train_and_evaluate(cfg, tmp_path / 'cut', mesh=_one_device())
  assert again == full
  assert _rows(tmp_path / 'full') == _rows(tmp_path / 'cut')


class _Unreliable:
  """The scripted teacher, but silent on some prompts and too slow on others."""

  def __init__(self, inner):
    self.inner = inner

  def continue_text(self, prompt, prefix):
    h = sum(map(ord, prompt)) % 4
    if h == 0:
      return ''
    if h == 1:
      time.sleep(1.0)
    return self.inner.continue_text(prompt, prefix)


def test_unreliable_teacher_is_counted_and_skipped(tmp_path):
  cfg = base.get_config(FAST + ',omniopd.teacher_timeout_s=0.3,train.num_steps=2')
  from projects.omniopd import input_pipeline  # noqa: PLC0415

  task = input_pipeline.make_task(cfg)
  teacher = _Unreliable(models.ScriptedTeacher(task.answers()))
  out = train.train_and_evaluate(cfg, tmp_path, mesh=_one_device(), teacher=teacher)
  t = out['train']
  assert t['teacher_calls'] == 16 and t['teacher_failures'] > 0
  assert t['teacher_timeouts'] > 0 and t['teacher_empty'] > 0
  rows = [r for r in _rows(tmp_path) if r['split'] == 'train']
  assert sum(r['audits_skipped'] for r in rows) == t['teacher_failures']
  assert all(np.isfinite(r['loss']) for r in rows)


@pytest.mark.slow  # two more compiled runs (about 30 s of CPU); the default suite's budget is tight
def test_sharded_equals_one_device(tmp_path):
  cfg = base.get_config(FAST + ',train.num_steps=2')
  one = train.train_and_evaluate(cfg, tmp_path / 'one', mesh=_one_device())
  eight = train.train_and_evaluate(cfg, tmp_path / 'eight')  # the test session's 8 CPU devices
  assert len(jax.devices()) == 8
  a = [r for r in _rows(tmp_path / 'one') if r['split'] == 'train']
  b = [r for r in _rows(tmp_path / 'eight') if r['split'] == 'train']
  for ra, rb in zip(a, b, strict=True):
    assert ra['teacher_calls'] == rb['teacher_calls'] and ra['audits'] == rb['audits']
    np.testing.assert_allclose(ra['loss'], rb['loss'], rtol=1e-4, atol=1e-6)
  assert one['eval'] == eight['eval']


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['opd', 'sft', 'grpo'])
def test_baselines_run_on_the_same_footing(tmp_path, mode):
  cfg = base.get_config(FAST + f',mode={mode},train.num_steps=2')
  out = train.train_and_evaluate(cfg, tmp_path, mesh=_one_device())
  assert np.isfinite(out['train']['loss'])
  assert {'accuracy', 'repetition_loops'} <= set(out['eval'])
  calls = out['train']['teacher_calls']
  assert calls == {'opd': 16, 'sft': 16, 'grpo': 0}[mode]


@pytest.mark.parametrize('mode', ['opd', 'sft'])
def test_dense_arms_train_the_same_without_the_padding_columns(tmp_path, mode):
  """rl.trim_multiple drops the prompt columns that are padding in every row (smoke prompts of
  6-7 tokens in 12 columns) from the white-box teacher's forward and the update: the same losses
  to float rounding as the whole rectangle."""
  rows = {}
  for m in (0, 2):
    cfg = base.get_config(FAST + f',mode={mode},train.num_steps=2,rl.trim_multiple={m}')
    train.train_and_evaluate(cfg, tmp_path / str(m), mesh=_one_device())
    rows[m] = [r for r in _rows(tmp_path / str(m)) if r['split'] == 'train']
  assert len(rows[0]) == len(rows[2]) == 2
  for a, b in zip(rows[0], rows[2], strict=True):
    for key in ('loss', 'grad_norm'):
      assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_bad_keys_stop_before_the_workdir(tmp_path):
  with pytest.raises(config_lib.ConfigError, match='mode'):
    train.train_and_evaluate(base.get_config('smoke,mode=dpo'), tmp_path / 'bad')
  with pytest.raises(config_lib.ConfigError, match='similarity'):
    train.train_and_evaluate(base.get_config('smoke,omniopd.similarity=bleu'), tmp_path / 'bad')
  with pytest.raises(config_lib.ConfigError, match='white-box'):
    train.train_and_evaluate(base.get_config('smoke,mode=opd,teacher.kind=lm'), tmp_path / 'bad')
  with pytest.raises(config_lib.ConfigError, match='teacher.kind=sft fine-tunes the student'):
    train.train_and_evaluate(base.get_config('smoke,teacher.kind=sft'), tmp_path / 'bad')
  with pytest.raises(config_lib.ConfigError, match='sft_steps >= 1'):
    train.train_and_evaluate(
      base.get_config('smollm2,mode=opd,teacher.kind=sft,teacher.sft_steps=0'), tmp_path / 'bad'
    )
  with pytest.raises(config_lib.ConfigError, match='update_groups=3 must be >= 1 and divide'):
    train.train_and_evaluate(base.get_config('smoke,rl.update_groups=3'), tmp_path / 'bad')
  with pytest.raises(config_lib.ConfigError, match='update_groups=0 must be >= 1'):
    train.train_and_evaluate(base.get_config('smoke,rl.update_groups=0'), tmp_path / 'bad')
  with pytest.raises(config_lib.ConfigError, match="teacher.kind='oracle'"):
    train.train_and_evaluate(base.get_config('smoke,teacher.kind=oracle'), tmp_path / 'bad')
  assert not (tmp_path / 'bad').exists()


class _Tokenizer:
  stop_ids = (2,)

  def apply_chat_template(self, messages, add_generation_prompt):
    return messages[0]['content']

  def encode(self, text, add_bos=False):
    return [3 + ord(c) % 12 for c in text]

  def decode(self, ids):
    return ','.join(map(str, ids))


@pytest.mark.parametrize('mode', ['omniopd', 'sft'])
def test_the_sft_arm_asks_the_lm_teacher_for_whole_traces(monkeypatch, mode):
  """The sft arm's traces are whole answers (teacher.trace_tokens); the other arms' teacher
  continues a prefix for teacher.max_new_tokens."""
  monkeypatch.setattr(train.loader, 'load_pretrained', lambda name, dtype: (toy.model(0), None))
  monkeypatch.setattr(train.loader, 'load_tokenizer', lambda name: _Tokenizer())
  config = base.get_config(f'smollm2,mode={mode}')
  teacher = train.make_teacher(config, task=None)
  assert isinstance(teacher, models.LMTeacher)
  want = {'omniopd': config.teacher.max_new_tokens, 'sft': config.teacher.trace_tokens}[mode]
  assert teacher.config.max_new_tokens == want
  assert config.teacher.trace_tokens > config.rl.max_new_tokens > config.teacher.max_new_tokens
