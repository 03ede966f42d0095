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
# # OmniOPD: where a text-only teacher audits the student
#
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM (a GPU is used when present; no
# model download). The first run trains and caches the smoke's SFT warm-up (1000 steps of a 2-layer
# d=64 character LM: 1-5 minutes on 2 cores); later runs take a minute or two.
#
# **Run it in Colab** (or any fresh Jupyter runtime): File -> Upload notebook and pick
# `notebooks/omniopd.ipynb`, or, once the repository is published on GitHub, File -> Open notebook ->
# GitHub. The first cell installs the repository when `common` is not importable: from the clone the
# notebook sits in (`pip install -e`), else from the git URL in the environment variable
# `MONOREPO_GIT_URL` (`pip install git+$MONOREPO_GIT_URL`). In Colab, set it first, in a cell of its
# own: `import os; os.environ['MONOREPO_GIT_URL'] = '<the repository's git URL>'`. If a later cell
# fails on an import after pip replaced a preinstalled package, restart the session and run all again.
#
# **Locally**, in a clone (Python 3.11): `pip install -e .` (the first cell does it otherwise), then
# `jupyter lab notebooks/omniopd.ipynb` or `python notebooks/omniopd.py`. The `.ipynb` is generated
# from this `.py` and committed with the outputs of one run (`PYTHONPATH=$PWD jupytext --to ipynb
# --execute notebooks/omniopd.py`).
#
# It calls the tested code the launcher uses
# (`python -m experiments.omniopd.main --config=experiments/omniopd/configs/base.py:smoke`): one
# student rollout, its entropy peaks, the K candidate chunks forked from the shared KV cache at each
# audited position, the teacher's text, the chunk scores and their Dirichlet-smoothed advantages
# (`projects.omniopd.train.audit`), then a short OmniOPD run.

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
# use; the smoke's teacher is scripted and its similarity is edit distance, so no MiniLM weights).

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
# ## One rollout and its audited forks
#
# The warmed-up smoke student answers 8 training prompts at temperature 1. For each rollout: the
# per-token entropies the sampler returns, the audited position (the highest entropy peak), the K = 4
# candidate chunks of L = 2 tokens forked there, the scripted teacher's continuation of the same
# prefix (text only), each candidate's edit similarity to it, and the advantage s_k - p with p the
# Dirichlet(1, 1)-smoothed acceptance rate. `|` marks a candidate that ended (EOS).

# %%
from common import sharding
from common import train_loop
from experiments.omniopd.configs import base
from projects.omniopd import input_pipeline
from projects.omniopd import models
from projects.omniopd import train

config = base.get_config('smoke')
mesh = sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])
rules = sharding.DEFAULT_RULES
task = input_pipeline.make_task(config)
student = models.create_policy(config, mesh, rules)()
client = models.TeacherClient(models.ScriptedTeacher(task.answers()), timeout_s=30.0)
with jax.set_mesh(mesh):
  au = train.audit(
    student,
    task.train[:8],
    task,
    config.omniopd,
    rollout_key=train_loop.step_key(0, 1, 'rollout'),
    fork_key=train_loop.step_key(0, 1, 'fork'),
    sampling=train.sampling_of(config, task),
    rewards=task.verifier(),
    client=client,
    similarity=train.make_similarity(config),
    mesh=mesh,
    rules=rules,
  )
ro = au.rollout
for rec in au.records:
  b = rec['row']
  n = int(ro.lengths[b])
  answer = task.decode(ro.completion[b, :n])
  ent = ' '.join(f'{h:.2f}' for h in ro.entropies[b, :n])
  print(f"{rec['prompt']:>8} student {answer!r:6} entropies [{ent}] audit t={rec['t']}")
  if rec['teacher'] is None:
    print('         teacher said nothing: audit skipped')
    continue
  cands = ', '.join(
    f"{c!r}{'|' if e else ''} s={s:.2f} A={a:+.2f}"
    for c, e, s, a in zip(
      rec['candidates'], rec['ended'], rec['scores'], rec['advantages'], strict=True
    )
  )
  print(
    f"         prefix {rec['prefix']!r} teacher {rec['teacher']!r}; p = {rec['acceptance']:.2f}"
  )
  print(f'         {cands}')
print('teacher calls:', client.metrics())

# %% [markdown]
# ## A short OmniOPD run
#
# 20 steps of the smoke config (16 prompts per step): held-out greedy accuracy before and after,
# the teacher calls it made and the student tokens it sampled (rollouts and forks).

# %%
import tempfile

from projects.omniopd import evaluate

workdir = pathlib.Path(tempfile.mkdtemp()) / 'omniopd'
out = train.train_and_evaluate(
  base.get_config('smoke,train.num_steps=20,train.eval_every=20'), workdir, mesh=mesh
)
s = evaluate.run_summary(workdir)
print(
  f"held-out accuracy {s['accuracy'][0]:.3f} -> {s['accuracy'][-1]:.3f}; "
  f"teacher calls {s['teacher_calls'][-1]:.0f}; student tokens {s['student_tokens'][-1]:.0f}; "
  f"repetition loops {s['repetition_loops'][-1]:.0f}"
)
