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
# # BlockPruner: which residual blocks a small LM can lose
#
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM (a GPU is used when present; no
# model download). The first run pretrains and caches the smoke LM (600 steps of an 8-layer d=64
# decoder on the R documentation pages: 1-3 minutes on 2 cores); later runs take about a minute.
#
# **Run it in Colab** (or any fresh Jupyter runtime): File -> Upload notebook and pick
# `notebooks/blockpruner.ipynb`, or, once the repository is published on GitHub, File -> Open notebook ->
# GitHub. The first cell installs the repository when `common` is not importable: from the clone the
# notebook sits in (`pip install -e`), else from the git URL in the environment variable
# `MONOREPO_GIT_URL` (`pip install git+$MONOREPO_GIT_URL`). In Colab, set it first, in a cell of its
# own: `import os; os.environ['MONOREPO_GIT_URL'] = '<the repository's git URL>'`. If a later cell
# fails on an import after pip replaced a preinstalled package, restart the session and run all again.
#
# **Locally**, in a clone (Python 3.11): `pip install -e .` (the first cell does it otherwise), then
# `jupyter lab notebooks/blockpruner.ipynb` or `python notebooks/blockpruner.py`. The `.ipynb` is generated
# from this `.py` and committed with the outputs of one run (`PYTHONPATH=$PWD jupytext --to ipynb
# --execute notebooks/blockpruner.py`).
#
# It calls the tested code the launcher uses
# (`python -m experiments.blockpruner.main --config=experiments/blockpruner/configs/base.py:smoke`):
# the calibration scorer (`projects.blockpruner.losses`), the search and its baselines
# (`projects.blockpruner.search`), the shared perplexity function (`common.models.perplexity`) and
# structural removal (`common.models.decoder.without_blocks`).

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

# %% [markdown]
# ## The runtime
#
# The devices JAX uses, the repository's progress lines, and small figures.

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
# ## The model and the data
#
# The smoke config's model (pretrained here on real text, cached) and its calibration windows
# (seed 0), held-out windows and multiple-choice tasks.

# %%
from experiments.blockpruner.configs import base
from projects.blockpruner import input_pipeline
from projects.blockpruner import losses
from projects.blockpruner import models
from projects.blockpruner import search

config = base.get_config('smoke')
model, tok = models.load(config)
data = input_pipeline.make_data(config, tok)
sizes = models.block_params(model)
print(f'{model.cfg.num_layers} layers, {models.num_params(model):,} parameters')
print(f'MHA block {sizes[(0, "mha")]:,} parameters, MLP block {sizes[(0, "mlp")]:,}')
print(
  f'calibration {data.calibration.tokens.shape}, held-out',
  {k: len(w) for k, w in data.held_out.items()},
)

# %% [markdown]
# ## One greedy step, by hand
#
# Every block's removal scored on the calibration set (mean NLL in nats per token): BlockPruner
# removes the argmin.

# %%
import matplotlib.pyplot as plt
import numpy as np

scorer = losses.CalibrationScorer(model, data.calibration, batch_size=config.calib.batch_size)
dense = scorer.loss(models.mask_of([], model.cfg.num_layers))
space = models.all_blocks(model.cfg.num_layers)
scores = scorer.candidate_losses(models.mask_of([], model.cfg.num_layers), [[b] for b in space])
best = space[int(np.argmin(scores))]
print(
  f'dense calibration loss {dense:.4f}; removing {models.block_name(best)} gives {scores.min():.4f}'
)
fig, ax = plt.subplots(figsize=(8, 3))
ax.bar([models.block_name(b) for b in space], np.asarray(scores) - dense)
ax.set_ylabel('calibration loss increase (nats)')
ax.tick_params(axis='x', rotation=90)
fig.tight_layout()

# %% [markdown]
# ## BlockPruner vs layer pruning at equal removed parameters
#
# Six blocks for BlockPruner, three layers for ShortGPT's block influence; held-out perplexity of
# the R documentation after each removal, through the shared function with the block mask.

# %%
from common.models import perplexity
from projects.blockpruner import evaluate


def curve(method, steps):
  removed, points = [], []
  for _ in range(steps):
    removed += method.step(removed, scorer).blocks
    mask = models.mask_of(removed, model.cfg.num_layers)
    ppl = perplexity.evaluate(
      model, data.held_out['rdocs'], batch_size=16, model_kwargs={'block_mask': mask}
    )['perplexity']
    points.append((sum(sizes[b] for b in removed), ppl))
  return removed, points


blocks, block_points = curve(search.BlockPruner(model.cfg.num_layers), 6)
layers, layer_points = curve(search.BlockInfluence(model.cfg.num_layers), 3)
print('BlockPruner removed:', models.describe(blocks))
print('ShortGPT removed:   ', models.describe(layers))
# Each ShortGPT point against the first BlockPruner point removing at least as many parameters.
for budget, b, a, p in evaluate.at_equal_params(block_points, layer_points):
  print(f'ShortGPT {budget:>7,} / BlockPruner {p:>7,} parameters: ppl {a:.2f} vs {b:.2f}')

# %% [markdown]
# ## Deployment: the structurally smaller model
#
# `without_blocks` drops the removed blocks' parameters; its logits equal the masked model's.

# %%
small = models.remove(model, blocks)
tokens = data.held_out['rdocs'].tokens[:2, :32]
gap = evaluate.removal_gap(model, small, blocks, tokens)
print(f'pruned model: {models.num_params(small):,} parameters; max |logit difference| {gap:.2e}')
