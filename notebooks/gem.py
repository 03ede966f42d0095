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
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM, no GPU, no download beyond
# `pip install -r requirements.txt`. The smoke config trains in a minute or two.
#
# Open with `jupyter lab notebooks/gem.ipynb` or run `python notebooks/gem.py`. The `.ipynb` is
# generated from this `.py` (`jupytext --sync notebooks/gem.py`).
#
# What it does, with the tested code of `projects/gem`: trains the smoke config (a tiny decoder
# pretrained on R documentation paragraphs, then GEM's mixed-NTP and contrastive phases), embeds
# data-set titles and descriptions through the special token, shows nearest neighbours, and then
# generates text with the same parameters as a plain causal LM. At smoke scale the model is tiny
# and barely trained: the neighbours and the text show the mechanics, not quality.

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
