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
# # FuseChat: fusing LMs with different tokenizers into a pivot, then SCE merging
#
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM (a GPU is used when present; no
# model download). The first run pretrains and caches the three tiny smoke LMs (pivot, coder,
# general: 120 + 400 + 400 steps of d=64 4-layer decoders, each with its own BPE vocabulary; a
# few minutes on 2 cores); later runs take one to two minutes.
#
# **Run it in Colab** (or any fresh Jupyter runtime): File -> Upload notebook and pick
# `notebooks/fusechat.ipynb`, or, once the repository is published on GitHub, File -> Open notebook ->
# GitHub. The first cell installs the repository when `common` is not importable: from the clone the
# notebook sits in (`pip install -e`), else from the git URL in the environment variable
# `MONOREPO_GIT_URL` (`pip install git+$MONOREPO_GIT_URL`). In Colab, set it first, in a cell of its
# own: `import os; os.environ['MONOREPO_GIT_URL'] = '<the repository's git URL>'`. If a later cell
# fails on an import after pip replaced a preinstalled package, restart the session and run all again.
#
# **Locally**, in a clone (Python 3.11): `pip install -e .` (the first cell does it otherwise), then
# `jupyter lab notebooks/fusechat.ipynb` or `python notebooks/fusechat.py`. The `.ipynb` is generated
# from this `.py` and committed with the outputs of one run (`PYTHONPATH=$PWD jupytext --to ipynb
# --execute notebooks/fusechat.py`).
#
# It calls the tested code the launcher uses
# (`python -m experiments.fusechat.main --config=experiments/fusechat/configs/base.py:smoke`): the
# members (`projects.fusechat.models`), the cross-tokenizer alignment (`projects.fusechat.align`),
# the fusion data and loss (`projects.fusechat.input_pipeline`, `projects.fusechat.losses`), the
# merges (`common.merging`) and the evaluation (`projects.fusechat.evaluate`).

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
# The devices JAX uses, the repository's progress lines, and small figures.

# %%
import logging

import jax
import matplotlib

# %matplotlib inline


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
# ## Three members, three tokenizers
#
# The pivot (weak at both skills), the coder source (code-ish string tasks) and the general source
# (R documentation): one text, three tokenisations, and the one-to-one token alignment of each
# source with the pivot (DTW over token strings and character spans).

# %%
from experiments.fusechat.configs import base
from projects.fusechat import align
from projects.fusechat import models

config = base.get_config('smoke')
pivot = models.load_member(config.model.pivot)
sources = [models.load_member(s) for s in config.model.sources]
text = ">>> rev('plum')\n'mulp'\nA numeric vector giving the weight of each chick."
p_ids = pivot.tokenizer.encode(text, add_bos=False)
for m in (pivot, *sources):
  ids = m.tokenizer.encode(text, add_bos=False)
  print(
    f'{m.name:8s} vocab {m.tokenizer.vocab_size:4d}: {len(ids):3d} tokens',
    [m.tokenizer.decode([i]) for i in ids][:14],
  )
for s in sources:
  s_ids = s.tokenizer.encode(text, add_bos=False)
  pairs = align.align_tokens(s.tokenizer, s_ids, pivot.tokenizer, p_ids)
  print(f'{s.name}: {len(pairs)} of {len(p_ids)} pivot tokens aligned one-to-one')

# %% [markdown]
# ## Stage 1 and 2: pairwise fusion, then merging
#
# The smoke run: each source's top-k distributions on the shared corpus (cached on disk), the
# vocabulary mapping from the alignment statistics, two fused copies of the pivot trained on
# 0.9 CLM + 0.1 fusion, then SCE, linear, task arithmetic, TIES and DARE merges of the two, and
# every model scored on the same items.

# %%
import tempfile

from projects.fusechat import evaluate
from projects.fusechat import train

workdir = pathlib.Path(tempfile.mkdtemp()) / 'fusechat'
result = train.train_and_evaluate(config, str(workdir))
names = train.model_names(config)  # pivot, fused targets, merges, sources
print(
  evaluate.table(
    result.eval, names, ['code/acc', 'text/acc', 'acc', 'code/nll_byte', 'text/nll_byte']
  )
)

# %% [markdown]
# ## Per-skill accuracy and loss
#
# The run's per-skill bars (`projects.fusechat.plots`, also `python -m experiments.fusechat.plots`):
# does a fused target move towards its source's strong skill, and does a merge keep both? Chance
# (dashed) is one in `len(corpora.OPS)`.

# %%
from projects.fusechat import plots

plots.figure(result.eval, names)
