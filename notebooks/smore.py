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
# # S'MoRE: which routing trees do tokens of different tasks take?
#
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM (a GPU is used when present), no
# downloads beyond `pip`. Training the smoke run below takes one to a few minutes on a CPU (the
# shared tiny LM is trained once and cached on first use).
#
# **Run it in Colab** (or any fresh Jupyter runtime): File -> Upload notebook and pick
# `notebooks/smore.ipynb`, or, once the repository is published on GitHub, File -> Open notebook ->
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
# `jupyter lab notebooks/smore.ipynb` (after `pip install jupyterlab`) or `python
# notebooks/smore.py`. The `.ipynb` is generated from this `.py` (`jupytext --sync
# notebooks/smore.py`) and committed with the outputs of one top-to-bottom run (from the repository
# root: `PYTHONPATH=$PWD jupytext --to ipynb --execute notebooks/smore.py`).
#
# It runs the launcher's code path
# (`python -m experiments.smore.main --config=experiments/smore/configs/base.py:smoke,adapter.preset=smore44`):
# S'MoRE (4-4) adapters (2 layers of 4 residual experts, fan-out 2, tanh) on the FFN projections of
# the frozen tiny LM, trained on 8 token-map tasks in 2 families (shift by k, multiply by a, mod 47).
# Then `projects.smore.analysis` records the routing of one adapter for held-out tokens and shows,
# per task, how often each expert is used at each layer, and the most frequent trees.

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
# shardings shortened to their first line), modest figure sizes, and the assets: none (the token-map
# tasks are generated procedurally).

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
# ## Config and training
#
# One to a few minutes on a CPU; the progress lines below show the steps, the loss and the ETA.

# %%
import tempfile

from experiments.smore.configs import base
from projects.smore import train

cfg = base.get_config('smoke,adapter.preset=smore44')
print(f'training S\'MoRE (4-4) adapters for {cfg.train.num_steps} steps on the frozen tiny LM')
workdir = pathlib.Path(tempfile.mkdtemp(prefix='smore_notebook_'))
result = train.train_and_evaluate(cfg, str(workdir))
print({k: round(float(v), 3) for k, v in result.eval.items()})

# %% [markdown]
# ## Routing of held-out tokens
#
# The adapter on the first layer's up-projection; the trees of the tokens whose next token (y) is
# predicted.

# %%
import collections

import numpy as np

from common import train_loop
from projects.smore import analysis
from projects.smore import input_pipeline

model = train_loop.model_of(result.graphdef, result.state)
data = input_pipeline.make_data(cfg)
batch = input_pipeline.eval_batches(cfg, data)[0]
path = 'layers/0/mlp/up_proj'
routing = analysis.record_routing(model, batch)[path]
usage = analysis.usage_by_task(routing, batch, len(data.task_names), (4, 4))
for layer in (1, 0):
  print(f'layer {layer}: fraction of tokens using each expert (rows: tasks)')
  for name, row in zip(data.task_names, usage[layer], strict=True):
    print(f'  {name:8s} ' + ' '.join(f'{v:.2f}' for v in row))

# %%
mask = np.asarray(batch['loss_mask']) > 0
trees = collections.defaultdict(collections.Counter)
for b, t in zip(*np.nonzero(mask), strict=True):
  trees[data.task_names[int(batch['task'][b])]][analysis.tree_label(routing, b, t)] += 1
for name in data.task_names:
  total = sum(trees[name].values())
  common = ', '.join(f'{k} ({v / total:.0%})' for k, v in trees[name].most_common(3))
  print(f'{name:8s} {len(trees[name])} distinct trees; most common: {common}')

# %% [markdown]
# ## Expert usage per task, as a picture

# %%
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
for ax, layer in zip(axes, (1, 0), strict=True):
  ax.imshow(usage[layer], vmin=0, vmax=1, cmap='viridis')
  ax.set_title(f'S\'MoRE layer {layer} ({"top" if layer else "bottom"})')
  ax.set_xlabel('expert')
  ax.set_yticks(range(len(data.task_names)), data.task_names)
fig.tight_layout()
plt.show()
