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
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM, no downloads beyond `pip`.
# Training the smoke run below takes one to a few minutes (the shared tiny LM is trained once and
# cached on first use).
#
# **Install** (Python 3.11, from the repository root): `pip install -r requirements.txt`, then
# `jupyter lab notebooks/smore.ipynb` or `python notebooks/smore.py`. The `.ipynb` is generated
# from this `.py` (`jupytext --sync notebooks/smore.py`).
#
# It runs the launcher's code path
# (`python -m experiments.smore.main --config=experiments/smore/configs/base.py:smoke,adapter.preset=smore44`):
# S'MoRE (4-4) adapters (2 layers of 4 residual experts, fan-out 2, tanh) on the FFN projections of
# the frozen tiny LM, trained on 8 token-map tasks in 2 families (shift by k, multiply by a, mod 47).
# Then `projects.smore.analysis` records the routing of one adapter for held-out tokens and shows,
# per task, how often each expert is used at each layer, and the most frequent trees.

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
# ## Config and training

# %%
from experiments.smore.configs import base
from projects.smore import train

cfg = base.get_config('smoke,adapter.preset=smore44')
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
