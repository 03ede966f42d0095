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
# # EAD: the annealed temperature and what it does to real rollouts
#
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM (a GPU is used when present; no
# model download). The first run trains and caches the smoke's SFT warm-up (1000 steps of a 2-layer
# d=64 character LM: 1-5 minutes on 2 cores); later runs take under a minute.
#
# **Run it in Colab** (or any fresh Jupyter runtime): File -> Upload notebook and pick
# `notebooks/ead.ipynb`, or, once the repository is published on GitHub, File -> Open notebook ->
# GitHub. The first cell installs the repository when `common` is not importable: from the clone the
# notebook sits in (`pip install -e`), else from the git URL in the environment variable
# `MONOREPO_GIT_URL` (`pip install git+$MONOREPO_GIT_URL`). In Colab, set it first, in a cell of its
# own: `import os; os.environ['MONOREPO_GIT_URL'] = '<the repository's git URL>'`. If a later cell
# fails on an import after pip replaced a preinstalled package, restart the session and run all again.
#
# **Locally**, in a clone (Python 3.11): `pip install -e .` (the first cell does it otherwise), then
# `jupyter lab notebooks/ead.ipynb` or `python notebooks/ead.py`. The `.ipynb` is generated
# from this `.py` and committed with the outputs of one run (`PYTHONPATH=$PWD jupytext --to ipynb
# --execute notebooks/ead.py`).
#
# It calls the tested code the launcher uses
# (`python -m experiments.ead.main --config=experiments/ead/configs/base.py:smoke`): the configs'
# schedules (`projects.ead.losses`), the sampler's temperature schedule and per-token log-probs
# (`common.sampling`), the rollout and the TIS weights of the shared loop (`common.rl`).

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
# ## The schedule
#
# tau_t = max(1 + tau_max - e^(t/d_s), tau_min) after c tokens at temperature 1, with
# d_s = min(d_0 + k s, 40000). Left: the paper's values (`losses.ead_config()`: c = 10,
# tau_max = 1.2, tau_min = 0.1, k = 5, here d_0 = 200) at three training steps: later steps cool
# more slowly. Middle: the SmolLM2 config, scaled to its ~19-token worked answers (c = 0,
# d_0 = 24, k = 0.03). Right: the smoke config, scaled to answers of 2-4 tokens.

# %%
import matplotlib.pyplot as plt
import numpy as np

from experiments.ead.configs import base
from projects.ead import losses

paper, big, smoke = losses.ead_config(), base.get_config('smollm2'), base.get_config('smoke')
fig, axes = plt.subplots(1, 3, figsize=(14, 3))
for s in (0, 100, 1000):
  axes[0].plot(
    losses.temperatures(paper, s, 512), label=f'step {s}: d = {losses.decay_at(paper, s):g}'
  )
axes[0].set(xlabel='generated position t', ylabel='temperature', title="the paper's values")
axes[0].legend()
axes[1].plot(losses.temperatures(big.ead, 0, big.rl.max_new_tokens), 'o-')
axes[1].set(xlabel='generated position t', title='smollm2 config, step 0')
tau_smoke = losses.temperatures(smoke.ead, 0, smoke.rl.max_new_tokens)
axes[2].plot(tau_smoke, 'o-')
axes[2].set(xlabel='generated position t', title='smoke config, step 0')
plt.show()
print('smoke tau at t = 0..5:', ' '.join(f'{x:.3f}' for x in tau_smoke))

# %% [markdown]
# ## Real rollouts under the schedule
#
# The warmed-up smoke policy answers 64 training prompts, 4 samples each, with EAD's schedule. Per
# generated position: the temperature used, the policy's entropy at temperature 1 (the loop's
# `entropy`), and the truncated importance weights w_t = min(pi(y_t) / mu_tau(y_t), C) the loss
# applies (exactly 1 where the temperature is 1; the smoke has c = 0, so none here).

# %%
import jax

from common import sharding
from common.rl import loss as loss_lib
from common.rl import rollout
from projects.ead import train

setup = train.build_setup(
  smoke, sharding.make_mesh([('data', 1)], devices=jax.devices()[:1]), sharding.DEFAULT_RULES
)
policy = setup.create_model()
sampling = rollout.Sampling(
  prompt_len=smoke.rl.prompt_len,
  max_new_tokens=smoke.rl.max_new_tokens,
  temperature=1.0,
  stop_tokens=setup.stop_tokens,
  pad_id=setup.pad_id,
)
ro = rollout.rollout(
  policy,
  list(setup.train_prompts[:64]),
  jax.random.key(0),
  sampling=sampling,
  rewards=setup.rewards,
  num_samples=4,
  mesh=sharding.make_mesh([('data', 1)], devices=jax.devices()[:1]),
  rules=sharding.DEFAULT_RULES,
  temperature=setup.temperature_schedule(0),
  sample_logprobs=True,
)
valid = ro.batch['completion_mask'] > 0
cap = smoke.ead.tis_cap
w = np.asarray(
  loss_lib.tis_weights(ro.batch['behaviour_logp'], ro.batch['sample_logp'], cap, valid)
)
n = valid.shape[1]


def per_t(x):
  return [float(x[:, t][valid[:, t]].mean()) if valid[:, t].any() else np.nan for t in range(n)]  # noqa: E731


fig, axes = plt.subplots(1, 3, figsize=(12, 3))
axes[0].plot(tau_smoke, 'o-')
axes[0].set(title='temperature used', xlabel='t')
axes[1].plot(per_t(ro.entropies), 'o-')
axes[1].set(title='policy entropy at T=1 (nats)', xlabel='t')
axes[2].plot(per_t(w), 'o-')
axes[2].axhline(cap, ls='--', c='gray')
axes[2].set(title=f'mean TIS weight (C = {cap:g})', xlabel='t')
plt.show()
print(f'reward mean {ro.rewards.mean():.3f}; tokens per position {valid.sum(0).tolist()}')
print(f'TIS weights <= C: {bool((w <= cap).all())}')
print('mean TIS weight per position:', ' '.join(f'{x:.3f}' for x in per_t(w)))
for i in range(4):
  p = ro.prompts[i // 4]
  print(setup.decode(np.asarray(p.tokens)), '->', setup.decode(ro.completion[i][: ro.lengths[i]]),
        'w =', [round(float(x), 3) for x in w[i][: ro.lengths[i]]])  # fmt: skip
