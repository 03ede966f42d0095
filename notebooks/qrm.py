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
# # Q-RM: token rewards over a corrupted trace
#
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM (a GPU is used when present; no
# model download). The first run trains and caches the smoke's SFT warm-up (1000 steps of a 2-layer
# d=64 character LM: 1-5 minutes on 2 cores); later runs take about a minute.
#
# **Run it in Colab** (or any fresh Jupyter runtime): File -> Upload notebook and pick
# `notebooks/qrm.ipynb`, or, once the repository is published on GitHub, File -> Open notebook ->
# GitHub. The first cell installs the repository when `common` is not importable: from the clone the
# notebook sits in (`pip install -e`), else from the git URL in the environment variable
# `MONOREPO_GIT_URL` (`pip install git+$MONOREPO_GIT_URL`). In Colab, set it first, in a cell of its
# own: `import os; os.environ['MONOREPO_GIT_URL'] = '<the repository's git URL>'`. If a later cell
# fails on an import after pip replaced a preinstalled package, restart the session and run all again.
#
# **Locally**, in a clone (Python 3.11): `pip install -e .` (the first cell does it otherwise), then
# `jupyter lab notebooks/qrm.ipynb` or `python notebooks/qrm.py`. The `.ipynb` is generated
# from this `.py` and committed with the outputs of one run (`PYTHONPATH=$PWD jupytext --to ipynb
# --execute notebooks/qrm.py`).
#
# It calls the tested code the launcher uses
# (`python -m experiments.qrm.main --config=experiments/qrm/configs/base.py:smoke`): the pairs
# (`projects.qrm.input_pipeline`), the Q-RM loss and token rewards (`projects.qrm.losses`), the
# reward-model run (`projects.qrm.train.train_reward_model`) and its metrics (`projects.qrm.evaluate`).


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
# ## Train a Q-RM
#
# The smoke config's reward model: the warmed-up policy network, trained for 150 steps with
# L = -log sigmoid(beta (m_w - m_l) - gamma) (beta = 0.2, gamma = 2) on 1000 pairs "correct answer
# vs the same answer with one digit replaced" plus the starting policy's real wrong answers. Its
# held-out metrics: pair accuracy, and how often the lowest token reward sits on the first error,
# beside the same numbers for the starting network's own log-probabilities (beta log pi, before
# any preference training): the control, since a corrupted digit is already improbable under the
# policy.

# %%
import tempfile

from experiments.qrm.configs import base
from projects.qrm import train

cfg = base.get_config('smoke')
workdir = pathlib.Path(tempfile.mkdtemp()) / 'rm_qrm'
res = train.train_reward_model(cfg, workdir)
ev = res['eval']
for k in ('pair_accuracy', 'localisation/corrupted', 'localisation_chance/corrupted',
          'localisation/policy', 'localisation_chance/policy', 'concentration'):  # fmt: skip
  print(f'{k}: {ev[k]:.3f}  (starting network read the same way: {ev["start/" + k]:.3f})')

# %% [markdown]
# ## Token rewards over one corrupted trace
#
# A held-out question, its correct answer, and the same answer with its last digit replaced. The
# token reward is r_t = beta log phi(a_t | s_t), read from the Q-RM network's logits Z: the same
# numbers the RL loop would receive for these responses. Before training (the warm policy's own
# log-probs, scaled alike) and after.

# %%
import matplotlib.pyplot as plt
import numpy as np

from common import config as config_lib
from common import sharding
from common.preference import scoring
from projects.qrm import input_pipeline
from projects.qrm import models

text = input_pipeline.make_text(cfg)
mesh, rules = sharding.make_mesh(config_lib.mesh_spec(cfg)), sharding.rules_of(cfg)
examples = input_pipeline.load_examples('smoke', 'test', 0)
ex = next(e for e in examples if len(e['answer'].lstrip('-')) >= 2)
good = text.answer(ex)
digits = [i for i, t in enumerate(good) if t in text.digit_ids]
bad = list(good)
pos = digits[-1]
bad[pos] = next(d for d in text.digit_ids if d != good[pos])
pair = input_pipeline.Pairs(
  scoring.pad_pairs(
    [text.render(ex)],
    [good],
    [bad],
    prompt_len=cfg.rl.prompt_len,
    response_len=cfg.rl.max_new_tokens,
    pad_id=text.pad,
  )  # fmt: skip
)
start = models.warm_policy(models.WarmupConfig(**cfg.warmup.to_dict()))[0]
qrm = train.load_reward_model(cfg, workdir)
before, _ = train.pair_scores('qrm', start, None, pair, cfg.rm, mesh, rules)
after, _ = train.pair_scores('qrm', qrm, None, pair, cfg.rm, mesh, rules)
labels = [text.tok.decode([t]) or '<EOS>' for t in good]
labels_bad = [text.tok.decode([t]) or '<EOS>' for t in bad]
n = len(good)
fig, axes = plt.subplots(1, 2, figsize=(10, 3), sharey=True)
for ax, r, title in ((axes[0], before, 'before training'), (axes[1], after, 'Q-RM')):
  x = np.arange(n)
  ax.bar(x - 0.2, r[0, :n], 0.4, label='correct ' + ''.join(labels[:-1]))
  ax.bar(x + 0.2, r[1, :n], 0.4, label='corrupted ' + ''.join(labels_bad[:-1]))
  ax.axvline(pos, ls=':', c='gray')
  ax.set_xticks(x, [f'{a}/{b}' for a, b in zip(labels, labels_bad, strict=True)])
  ax.set(title=title, xlabel='response token (correct/corrupted)')
  ax.legend(fontsize=8)
axes[0].set_ylabel('token reward beta log phi')
plt.show()
print(f'question {input_pipeline.expression_prompt(ex)} answer {ex["answer"]}; corrupted at {pos}')
print('Q-RM rewards, correct:  ', ' '.join(f'{v:+.3f}' for v in after[0, :n]))
print('Q-RM rewards, corrupted:', ' '.join(f'{v:+.3f}' for v in after[1, :n]))
print(f'lowest corrupted-trace reward at the corrupted step: {int(np.argmin(after[1, :n])) == pos}')

# %% [markdown]
# ## Where the credit goes, over all held-out pairs
#
# The mean token reward at each offset from the first error (the corrupted digit, or where a real
# wrong sample leaves the correct trace), rejected vs chosen responses, and the starting network's
# on the rejected ones; offset 0 is the error.

# %%
offsets = [o for o in range(-3, 4)]
rej = [ev.get(f'profile/rejected/{o:+d}', np.nan) for o in offsets]
cho = [ev.get(f'profile/chosen/{o:+d}', np.nan) for o in offsets]
rej0 = [ev.get(f'start/profile/rejected/{o:+d}', np.nan) for o in offsets]
plt.figure(figsize=(5, 3))
plt.plot(offsets, rej, 'o-', label='Q-RM rejected')
plt.plot(offsets, cho, 'o-', label='Q-RM chosen')
plt.plot(offsets, rej0, 'x--', label='starting network, rejected')
plt.axvline(0, ls=':', c='gray')
plt.xlabel('position - first error')
plt.ylabel('mean token reward')
plt.legend()
plt.show()
print('offset 0: rejected', f'{rej[3]:.3f}', 'chosen', f'{cho[3]:.3f}')
