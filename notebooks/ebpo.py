# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # EBPO vs GRPO: a few RL steps and the advantage distributions
#
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM (no GPU, no model download).
# The first run trains and caches the smoke's SFT warm-up (1000 steps of a 2-layer d=64 character
# LM: about 1.5 minutes on an idle 2-core machine, 10 minutes on a busy one); later runs take a
# minute or two.
#
# **Install** (Python 3.11, from the repository root):
#
#     pip install -r requirements.txt
#     pip install jupyterlab            # only to open the .ipynb
#     jupyter lab notebooks/ebpo.ipynb
#
# or run it as a script: `python notebooks/ebpo.py`. The `.ipynb` is generated from this `.py`
# (`jupytext --sync notebooks/ebpo.py`).
#
# It calls the tested code the launcher uses
# (`python -m experiments.ebpo.main --config=experiments/ebpo/configs/base.py:smoke`): the smoke
# config, `projects.ebpo.train`, EBPO's estimator (`projects.ebpo.losses`) and the shared RL loop in
# `common/rl`.

# %%
# ruff: noqa: E402 (cells import what they use, after this cell puts the repository on sys.path)
import os
import pathlib
import sys
import tempfile

ROOT = next(
  p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents) if (p / 'WORKSPACE.md').is_file()
)
sys.path.insert(0, str(ROOT))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# %% [markdown]
# ## One rollout batch, two estimators
#
# The warmed-up policy samples G=2 answers for 64 training prompts. GRPO gives every group whose
# two answers are both wrong (or both right) exactly zero advantage; EBPO's shrunk baseline gives
# them a signal. Below: the advantages before EBPO's batch standardisation.

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np

from common import sharding
from common.rl import advantages
from common.rl import loop
from common.rl import rollout
from experiments.ebpo.configs import base
from projects.ebpo import losses
from projects.ebpo import train

NUM_STEPS = int(os.environ.get('EBPO_NOTEBOOK_STEPS', '20'))
config = base.get_config(
  f'smoke,rl.group_size=2,rl.prompts_per_step=64,train.num_steps={NUM_STEPS}'
)
mesh = sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])
rules = sharding.DEFAULT_RULES  # the config's sharding.rules
setup = train.build_setup(config, mesh, rules)
policy = setup.create_model()
ro = rollout.rollout(
  policy,
  setup.train_prompts[:64],
  jax.random.key(0),
  sampling=loop.sampling_of(config.rl, setup),
  rewards=setup.rewards,
  num_samples=config.rl.group_size,
  mesh=mesh,
  rules=rules,
)
grpo = np.asarray(advantages.grpo(ro.rewards))
est = losses.EBPOEstimator(standardize=False)
est.update(ro.rewards)  # a first batch gives the prior some history
_, ebpo_raw, stats = est.advantages(ro.rewards)
print(f'reward mean {ro.rewards.mean():.3f}; shrinkage S = {stats.shrinkage[0]:.3f}')
print(f'groups with zero GRPO signal: {np.mean(np.all(grpo == 0, axis=1)):.2f}')
print(f'groups with zero EBPO signal: {np.mean(np.all(np.abs(ebpo_raw) < 1e-8, axis=1)):.2f}')

fig, ax = plt.subplots(figsize=(6, 3))
ax.hist([grpo.reshape(-1), ebpo_raw.reshape(-1)], bins=21, label=['GRPO', 'EBPO (raw)'], alpha=0.8)
ax.set_xlabel('advantage')
ax.set_ylabel('responses')
ax.legend()
plt.show()

# %% [markdown]
# ## A few RL steps each
#
# Same seed, same prompts, same rollout budget; only the estimator differs.

# %%
from common import metrics

curves = {}
for estimator in ('grpo', 'ebpo'):
  workdir = pathlib.Path(tempfile.mkdtemp()) / estimator
  cfg = base.get_config(
    f'smoke,rl.estimator={estimator},rl.group_size=2,train.num_steps={NUM_STEPS},'
    f'train.log_every=1,train.eval_every={NUM_STEPS}'
  )
  result = train.train_and_evaluate(cfg, workdir)
  rows = [r for r in metrics.read_jsonl(workdir / 'metrics.jsonl') if r['split'] == 'train']
  curves[estimator] = rows
  print(estimator, 'held-out greedy pass@1 after', NUM_STEPS, 'steps:', result['eval']['pass_at_1'])

fig, axes = plt.subplots(1, 3, figsize=(12, 3))
for estimator, rows in curves.items():
  steps = [r['step'] for r in rows]
  for ax, key in zip(axes, ('reward_mean', 'zero_signal_frac', 'entropy'), strict=True):
    ax.plot(steps, [r[key] for r in rows], label=estimator)
    ax.set_title(key)
axes[0].legend()
plt.show()
