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
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM (a GPU is used when present; no
# model download).
# The first run trains and caches the smoke's SFT warm-up (1000 steps of a 2-layer d=64 character
# LM: about 1.5 minutes on an idle 2-core machine, 10 minutes on a busy one); later runs take a
# minute or two.
#
# **Run it in Colab** (or any fresh Jupyter runtime): File -> Upload notebook and pick
# `notebooks/ebpo.ipynb`, or, once the repository is published on GitHub, File -> Open notebook ->
# GitHub. The first cell installs the repository when `common` is not importable: from the clone the
# notebook sits in (`pip install -e`), else from the git URL in the environment variable
# `MONOREPO_GIT_URL` (`pip install git+$MONOREPO_GIT_URL`). In Colab, set it first, in a cell of its
# own: `import os; os.environ['MONOREPO_GIT_URL'] = '<the repository's git URL>'`. pip may replace
# packages the runtime preinstalls (jax, numpy): if a later cell then fails on an import, restart
# the session (Runtime -> Restart session) and run all again. A GPU runtime (Runtime -> Change
# runtime type) is used when present (the first cell adds JAX's CUDA plugin);
# `os.environ['JAX_PLATFORMS'] = 'cpu'` before the runtime cell keeps JAX on the CPU.
#
# **Locally**, in a clone (Python 3.11): `pip install -e .` (the first cell does it otherwise), then
# `jupyter lab notebooks/ebpo.ipynb` (after `pip install jupyterlab`) or `python notebooks/ebpo.py`.
# The `.ipynb` is generated from this `.py` (`jupytext --sync notebooks/ebpo.py`) and committed with
# the outputs of one top-to-bottom run (from the repository root: `PYTHONPATH=$PWD jupytext --to
# ipynb --execute notebooks/ebpo.py`).
#
# It calls the tested code the launcher uses
# (`python -m experiments.ebpo.main --config=experiments/ebpo/configs/base.py:smoke`): the smoke
# config, `projects.ebpo.train`, EBPO's estimator (`projects.ebpo.losses`) and the shared RL loop in
# `common/rl`.

# %%
# Setup, the same in every notebook: make `common`, `projects` and `experiments` importable.
# ruff: noqa: E402 (cells import what they use, after this one installs the repository)
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib


def _clone_root():  # the enclosing clone: the directory whose pyproject.toml names the project
  for d in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents):
    f = d / 'pyproject.toml'
    if (
      f.is_file()
      and tomllib.loads(f.read_text()).get('project', {}).get('name') == 'meta-ai-papers-jax'
    ):
      return d
  return None


if importlib.util.find_spec('common') is None:
  ROOT, URL = _clone_root(), os.environ.get('MONOREPO_GIT_URL')
  if ROOT is None and not URL:
    raise SystemExit(
      'meta-ai-papers-jax is not installed and this notebook is not in a clone of it: set the '
      "environment variable MONOREPO_GIT_URL to the repository's git URL (in a cell above: "
      "os.environ['MONOREPO_GIT_URL'] = 'https://...'), or run the notebook inside a clone"
    )
  what = ['-e', str(ROOT)] if ROOT else [f'git+{URL.removeprefix("git+")}']
  gpu = ['jax[cuda12]'] if shutil.which('nvidia-smi') else []  # JAX's CUDA plugin on a GPU runtime
  print(f'pip install {" ".join(what + gpu)} (and the pinned requirements: minutes when fresh)')
  subprocess.check_call([sys.executable, '-m', 'pip', 'install', '-q', *what, *gpu])
  if ROOT:
    sys.path.insert(0, str(ROOT))  # the editable install takes effect in new processes only
  importlib.invalidate_caches()

# %% [markdown]
# ## The runtime
#
# The devices JAX uses (the accelerator when there is one), the runs' progress lines (their absl
# logging at INFO, printed under the cells that train; multi-line tables such as the parameter
# shardings shortened to their first line), modest figure sizes, and the assets: none (the
# arithmetic tasks come from the pinned `reasoning-gym` package, built into a TFDS data set on first
# use).

# %%
import logging

import jax
import matplotlib


def _progress(record):  # this repository's INFO lines (a table: its first line), others' warnings
  if record.levelno >= logging.WARNING:
    return True
  record.msg, record.args = record.getMessage().split('\n', 1)[0], ()
  return bool({'common', 'projects', 'experiments'} & set(pathlib.Path(record.pathname).parts))


logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stdout, force=True)
logging.getLogger().handlers[0].addFilter(_progress)
matplotlib.rcParams['figure.dpi'] = 72  # small PNGs in the saved notebook
print('JAX devices:', jax.devices())

# %% [markdown]
# ## One rollout batch, two estimators
#
# The warmed-up policy samples G=2 answers for 64 training prompts. GRPO gives every group whose
# two answers are both wrong (or both right) exactly zero advantage; EBPO's shrunk baseline gives
# them a signal. Below: the advantages before EBPO's batch standardisation. On a fresh machine,
# building the setup first trains and caches the SFT warm-up policy (its progress lines print
# below; 1.5 to 10 minutes on a 2-core CPU), and builds the task data set once.

# %%
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
# Same seed, same prompts, same rollout budget; only the estimator differs. A progress line per
# step (reward, zero-signal fraction, entropy) and a held-out evaluation at the end of each run.

# %%
import tempfile

from common import metrics

curves = {}
for estimator in ('grpo', 'ebpo'):
  print(f'{estimator}: {NUM_STEPS} RL steps')
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
