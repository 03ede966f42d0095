# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # LM pretraining (`lm_pretrain`): train, plot the loss, sample
#
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM (no GPU, no downloads beyond
# `pip`); the smoke config below trains in about a minute.
#
# **Install** (Python 3.11, from the repository root):
#
#     pip install -r requirements.txt
#     pip install jupyterlab            # only to open the .ipynb
#     jupyter lab notebooks/lm_pretrain.ipynb
#
# or run it as a script: `python notebooks/lm_pretrain.py`. The `.ipynb` is generated from this
# `.py` (`jupytext --sync notebooks/lm_pretrain.py`); `tests/notebooks_test.py` runs the script on
# the smoke config and checks that the two are in sync.
#
# The notebook calls the same code as the launcher
# (`python -m experiments.lm_pretrain.main --config=experiments/lm_pretrain/configs/base.py:smoke`):
# the config from `experiments/lm_pretrain/configs/base.py`, `train.train_and_evaluate`, then the
# shared, tested sampler (`common.sampling.sampler.generate`) on the trained model.

# %%
# ruff: noqa: E402 (cells import what they use, after this cell puts the repository on sys.path)
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
# TensorBoard events, `checkpoints/`, `results.json` (and, for text, `tokenizer.json`).

# %%
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
