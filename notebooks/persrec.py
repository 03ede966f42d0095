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
# Data: MovieLens-100K from the pinned `recbole` wheel (`python -m common.assets fetch ml100k`).
# The GroupLens terms forbid redistributing it: this notebook prints no history rows, only
# aggregate metrics and ten recommended titles; keep the outputs stripped when committing.

# %%
# ruff: noqa: E402 (imports follow the cell that puts the repository on sys.path)
import os
import pathlib
import sys
import tempfile

# The repository root on sys.path: Jupyter starts in notebooks/, the script anywhere inside the repo.
ROOT = next(
  p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents) if (p / 'WORKSPACE.md').is_file()
)
sys.path.insert(0, str(ROOT))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from flax import nnx
import numpy as np

from common import train_loop
from experiments.persrec.configs import ml100k
from projects.persrec import input_pipeline
from projects.persrec import serving
from projects.persrec import train

config = ml100k.get_config('smoke')
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
