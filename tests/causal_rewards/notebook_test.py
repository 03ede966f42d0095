"""notebooks/causal_rewards.py runs end to end on the smoke config (slow: it trains two smoke reward
models, vanilla and conditional CRM, and the first run on a machine also builds the question set
and trains the cached LM warm-up)."""

import pathlib
import re
import shutil

import pytest

from common import testing

METRICS = (
  'decorrelated accuracy',
  'clean accuracy (no cue)',
  'P(cue preferred)',
  'bias (reward sds)',
  'Spearman(reward, cue)',
  'Best-of-4 picks wrong + cue',
)
NUM = r'-?\d+\.\d{3}'


@pytest.mark.slow
def test_causal_rewards_notebook_runs(monkeypatch):
  # The repository importable, so the notebook's setup cell installs nothing.
  monkeypatch.setenv('PYTHONPATH', str(testing.REPO_ROOT))
  stdout = testing.run_notebook_script('causal_rewards', timeout=900)
  workdir = pathlib.Path(re.search(r'^workdir: (.+)$', stdout, re.M).group(1))
  try:
    assert re.search(r'^JAX devices: \[', stdout, re.M), stdout
    assert re.search(r'^step 100/100 .*bt_loss=.*mmd=', stdout, re.M), stdout  # progress lines
    for name in ('vanilla', 'CRM'):
      assert (workdir / name / 'results.json').is_file()
      assert re.search(rf'^{name}: last logged step 100: bt_loss {NUM}, mmd -?\d', stdout, re.M)
      assert re.search(rf'^{name}: mean standardised reward: gold ', stdout, re.M), stdout
    assert re.search(r'^metric +vanilla +CRM +recomputed', stdout, re.M), stdout
    for label in METRICS:
      m = re.search(rf'^{re.escape(label)} +({NUM}) +({NUM})   ({NUM}), ({NUM})$', stdout, re.M)
      assert m, (label, stdout)
      # The metrics recomputed from the plotted rewards are the run's own evaluation.
      assert (m.group(1), m.group(2)) == (m.group(3), m.group(4)), m.group(0)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
