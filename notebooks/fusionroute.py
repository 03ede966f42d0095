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
# # FusionRoute: which expert each generated token comes from, and what the router adds
#
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM (a GPU is used when present; no
# model download). The first run trains and caches the three tiny experts (about 5 minutes on 2
# cores); then training the router (the smoke config's two stages) takes 2-4 minutes.
#
# **Run it in Colab** (or any fresh Jupyter runtime): File -> Upload notebook and pick
# `notebooks/fusionroute.ipynb`, or, once the repository is published on GitHub, File -> Open notebook ->
# GitHub. The first cell installs the repository when `common` is not importable: from the clone the
# notebook sits in (`pip install -e`), else from the git URL in the environment variable
# `MONOREPO_GIT_URL` (`pip install git+$MONOREPO_GIT_URL`). In Colab, set it first, in a cell of its
# own: `import os; os.environ['MONOREPO_GIT_URL'] = '<the repository's git URL>'`. If a later cell
# fails on an import after pip replaced a preinstalled package, restart the session and run all again.
#
# **Locally**, in a clone (Python 3.11): `pip install -e .` (the first cell does it otherwise), then
# `jupyter lab notebooks/fusionroute.ipynb` or `python notebooks/fusionroute.py`. The `.ipynb` is generated
# from this `.py` and committed with the outputs of one run (`PYTHONPATH=$PWD jupytext --to ipynb
# --execute notebooks/fusionroute.py`).
#
# FusionRoute (arXiv 2601.05106) decodes with n frozen experts and a router (an LM plus a linear
# routing head): at every token the head picks one expert, and the token is drawn from the
# renormalised product of the router LM's and that expert's distributions (Eq. 1). This notebook
# trains the smoke router through the tested launcher path
# (`python -m experiments.fusionroute.main --config=experiments/fusionroute/configs/base.py:smoke`),
# then takes one generation per domain and one prompt of the math expert's planted flaw, and shows,
# token by token, which expert was picked and how the router's and the expert's log-probabilities
# add up (`projects.fusionroute.models.generate` and `fuse`).

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
# ## The experts and the router
#
# Three 4-layer d=64 experts over one character vocabulary, each fine-tuned on its procedural
# domain (math: two-digit addition written ones digit first, '07+48=' -> '55'; code: reverse-copy;
# instruct: upper-casing), the math expert with a planted flaw (it drops the carry when a ones digit
# is 9). The router starts from the math expert and trains stage 1 (SFT + the routing loss on the
# disagreement set) and stage 2 (SFT + CDPO), 150 steps each.

# %%
import tempfile

from common import train_loop
from experiments.fusionroute.configs import base
from projects.fusionroute import input_pipeline as ip
from projects.fusionroute import train

config = base.get_config('smoke')
workdir = tempfile.mkdtemp(prefix='fusionroute_notebook_')
print('workdir:', workdir)
fit = train.train_and_evaluate(config, workdir)
model = train_loop.model_of(fit.graphdef, fit.state)
print(
  'held-out exact match after stage 2:',
  {k: round(v, 3) for k, v in fit.eval.items() if k.startswith('fusionroute/')},
)

# %% [markdown]
# ## One generation per domain, and a prompt of the planted flaw
#
# Greedy decoding with FusionRoute (router LM + routed expert) and, for comparison, routing-only
# (the routed expert alone: the paper's ablation without complementary logits).

# %%
import numpy as np

from projects.fusionroute import models

problems = [ip.eval_problems(config)[i * config.data.eval_per_domain] for i in range(3)]
problems.append(ip.flaw_problems(config)[0])
names = ['math', 'code', 'instruct', 'math (flaw case)']
n = model.num_experts
prompts = [ip.prompt_ids(p) for p in problems]
kw = dict(max_new_tokens=ip.ANSWER_LEN, eos_id=ip.EOS, pad_id=ip.PAD)
fused = models.generate(model, prompts, models.fusionroute(len(prompts), n), **kw)
alone = models.generate(model, prompts, models.routing_only(len(prompts), n), **kw)
for name, p, a, b in zip(
  names, problems, np.asarray(fused.tokens), np.asarray(alone.tokens), strict=True
):
  print(
    f'{name:>17}: {p.prompt:<10} verified {p.answer!r:<9} FusionRoute {ip.decode(a)!r:<9} '
    f'routing-only {ip.decode(b)!r}'
  )

# %% [markdown]
# ## Token by token: the routed expert and the logit contributions
#
# For each generated token t (teacher-forced on the FusionRoute generation, without caches), the
# routing head's choice I* = argmax W h and its softmax weight, log p_router(t), log p_I*(t), and the
# fused log-probability log p_router(t) + log p_I*(t) - log Z (Eq. 1, renormalised over the
# vocabulary). Where the expert alone would pick another token (its argmax), it is shown in
# brackets: that is where the router's logits changed the outcome.

# %%
import jax.numpy as jnp

EXPERTS = ip.DOMAINS
rows = []
for name, prompt, gen, length in zip(
  names, prompts, np.asarray(fused.tokens), np.asarray(fused.lengths), strict=True
):
  seq = prompt + [int(t) for t in gen[:length]]
  router_logits, routing = model.router(jnp.asarray([seq]))
  expert_logits = model.expert_logits(jnp.asarray([seq]))  # [n, 1, T, V]
  lr = np.asarray(jax.nn.log_softmax(router_logits[0], -1))
  le = np.asarray(jax.nn.log_softmax(expert_logits[:, 0], -1))
  weights = np.asarray(jax.nn.softmax(routing[0], -1))
  logp, selected = models.fuse(router_logits, routing, expert_logits, models.fusionroute(1, n))
  logp, selected = np.asarray(logp[0]), np.asarray(selected[0])
  print(f'\n{name}: {problems[names.index(name)].prompt}')
  print('  token  expert    w     log p_router  log p_expert  fused   expert alone')
  for j in range(length):
    pos = len(prompt) - 1 + j  # position predicting generated token j
    tok, e = seq[pos + 1], int(selected[pos])
    own = int(np.argmax(le[e, pos]))
    char = ip.decode([tok]) or '<eos>'
    alt = '' if own == tok else f'[{ip.decode([own]) or "<eos>"}]'
    print(
      f'  {char:>5}  {EXPERTS[e]:<8} {weights[pos, e]:.2f}  {lr[pos, tok]:>11.3f}  '
      f'{le[e, pos, tok]:>12.3f}  {logp[pos, tok]:>6.3f}   {alt}'
    )
    rows.append((name, char, e, lr[pos, tok], le[e, pos, tok], logp[pos, tok], own != tok))

# %% [markdown]
# ## The generations, coloured by the routed expert
#
# Each box is a generated token, coloured by the expert the routing head picked for it; the bars
# below give log p_router and log p_expert of that token (their sum, renormalised, is the fused
# log-probability). A red edge marks a token the routed expert alone would not have produced.

# %%
import matplotlib.pyplot as plt

colours = {0: 'tab:orange', 1: 'tab:blue', 2: 'tab:green'}
fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.5 * len(names)))
for ax, name in zip(axes, names, strict=True):
  mine = [r for r in rows if r[0] == name]
  for j, (_, char, e, r_lp, e_lp, _, changed) in enumerate(mine):
    ax.add_patch(
      plt.Rectangle(
        (j, 0.55), 0.9, 0.4, color=colours[e], alpha=0.6, ec='red' if changed else 'none', lw=2
      )
    )
    ax.text(j + 0.45, 0.75, char, ha='center', va='center', fontsize=11, family='monospace')
    ax.bar(j + 0.25, max(r_lp, -8) / 16, bottom=0.45, width=0.35, color='black')
    ax.bar(j + 0.65, max(e_lp, -8) / 16, bottom=0.45, width=0.35, color=colours[e])
  ax.set_xlim(-0.2, ip.ANSWER_LEN + 0.2)
  ax.set_ylim(-0.1, 1.0)
  ax.set_axis_off()
  ax.set_title(f'{name}: {problems[names.index(name)].prompt}', fontsize=9, loc='left')
handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.6) for c in colours.values()]
handles.append(plt.Rectangle((0, 0), 1, 1, color='black'))
fig.legend(handles, [*EXPERTS, 'log p_router (bars down)'], loc='upper right', fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## Routing over the whole held-out set
#
# Which expert the head picks on the tokens of each domain's generations (FusionRoute decoding of
# the smoke evaluation set): the diagonal is what oracle domain routing would choose.

# %%
from projects.fusionroute import evaluate

es = evaluate.eval_set(config)
decoded = evaluate.evaluate_methods(model, es, ('fusionroute',), defer_threshold=0.5)['fusionroute']
picked = np.zeros((3, n))
for row in range(len(es.problems)):
  if es.flaw[row]:
    continue
  experts = np.asarray(decoded.experts[row])
  experts = experts[experts >= 0]
  np.add.at(picked[es.domains[row]], experts, 1)
share = picked / picked.sum(1, keepdims=True)
print('rows: prompt domain; columns: share of generated tokens routed to each expert')
for d, name in enumerate(EXPERTS):
  print(f'{name:>9}: ' + '  '.join(f'{EXPERTS[e]} {share[d, e]:.2f}' for e in range(n)))
