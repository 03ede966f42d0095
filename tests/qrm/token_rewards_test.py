"""experiments/qrm/token_rewards.py: the reference replies are the pairs' traces, and the rewards
it prints are the RL loop's token rewards of those replies (on a seconds-long smoke reward model)."""

import pathlib
import re
import sys
import types

import jax
import pytest

from common import sharding
from experiments.qrm import token_rewards
from experiments.qrm.configs import base
from projects.qrm import input_pipeline
from projects.qrm import train
from tests.qrm.train_test import FAST

CONFIG = pathlib.Path(__file__).resolve().parents[2] / 'experiments/qrm/configs/base.py'


def test_prints_the_loops_token_rewards_of_the_reference_replies(tmp_path, capsys, monkeypatch):
  cfg = base.get_config(FAST)
  train.train_reward_model(cfg, tmp_path / 'rm')
  argv = [f'--config={CONFIG}:{FAST}', f'--rm_workdir={tmp_path / "rm"}', '--n=2']
  monkeypatch.setattr(sys, 'argv', ['token_rewards', *argv])
  token_rewards.main()
  printed = re.findall(r'sum of rewards (-?[\d.]+) over (\d+) tokens', capsys.readouterr().out)
  assert len(printed) == 2

  text = input_pipeline.make_text(cfg)
  examples = input_pipeline.load_examples(cfg.data.task_set, 'test', cfg.data.seed)[:2]
  _, batch, _ = token_rewards.reference_batch(cfg, 2)
  mesh = sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])
  rm = train.load_reward_model(cfg, tmp_path / 'rm')
  start = train.starting_network(cfg)
  with jax.set_mesh(mesh):
    reward, _ = train.pair_scores(
      'qrm', rm, start, types.SimpleNamespace(rows=batch), cfg.rm, mesh, sharding.rules_of(cfg)
    )
  for (total, count), ex, row in zip(printed, examples, reward, strict=True):
    trace = list(text.answer(ex))
    assert int(count) == len(trace)
    assert float(total) == pytest.approx(float(row[: len(trace)].sum()), abs=2e-3)
  for i, ex in enumerate(examples):
    trace = list(text.answer(ex))
    assert list(batch['targets'][i][: len(trace)]) == trace  # the pairs' reference traces
