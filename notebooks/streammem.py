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
# # StreamMem: which frames of a real video survive in a fixed-size KV memory
#
# **Minimum hardware:** a CPU machine with 2 cores and 4 GB of RAM (a GPU is used when present).
# Needs the `opencv_videos` asset (`python -m common.assets fetch opencv_videos`, 3 short public
# OpenCV sample videos) and `opencv-python-headless`. About 3-5 minutes on 2 cores: most of it trains
# the small video-language model, the rest compiles one streaming step per method.
#
# **Run it in Colab** (or any fresh Jupyter runtime): File -> Upload notebook and pick
# `notebooks/streammem.ipynb`, or, once the repository is published on GitHub, File -> Open notebook ->
# GitHub. The first cell installs the repository when `common` is not importable: from the clone the
# notebook sits in (`pip install -e`), else from the git URL in the environment variable
# `MONOREPO_GIT_URL` (`pip install git+$MONOREPO_GIT_URL`). In Colab, set it first, in a cell of its
# own: `import os; os.environ['MONOREPO_GIT_URL'] = '<the repository's git URL>'`. If a later cell
# fails on an import after pip replaced a preinstalled package, restart the session and run all again.
#
# **Locally**, in a clone (Python 3.11): `pip install -e .` (the first cell does it otherwise), then
# `jupyter lab notebooks/streammem.ipynb` or `python notebooks/streammem.py`. The `.ipynb` is generated
# from this `.py` and committed with the outputs of one run (`PYTHONPATH=$PWD jupytext --to ipynb
# --execute notebooks/streammem.py`).
#
# StreamMem (arXiv 2508.15717) prefills a stream clip by clip and, after every clip, scores all the
# cached visual tokens with the queries of a generic proxy (the chat template), keeps the top M/L
# per layer and merges each new frame into one prototype. Here one stream of a held-out real video
# runs through the tested loop the launcher uses
# (`python -m experiments.streammem.main --config=experiments/streammem/configs/base.py:video_smoke`):
# `projects.streammem.models.run_stream` with the presses of `common.kv_press`, and we look at which
# frames' tokens the memory holds after every clip, under StreamMem and under the uniform and
# recency (FIFO, StreamingLLM) presses at the same budget, and at the log-likelihood each memory
# gives the right answers.

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
# ## A small video-language model, trained here
#
# No pretrained vision encoder ships offline, so the video evaluation trains its own: the shared
# decoder (4 layers, d_model 64) whose visual tokens are 2x2 patches of 16x16 RGB frames (a 2-layer
# MLP patch encoder), on 8-frame streams of two real videos with 1-3 scripted colour squares
# ("events"), to describe the stream after the chat template. The `video_smoke` config trains 2000
# steps; 1000 here to keep the notebook short (the run's checkpoints and metrics go to a temporary
# workdir).

# %%
import tempfile

from common import train_loop
from experiments.streammem.configs import base
from projects.streammem import models
from projects.streammem import train

config = base.get_config('video_smoke')
config.train.update(num_steps=1000, log_every=250, eval_every=0)
config.checkpoint.every_steps = 1000
workdir = tempfile.mkdtemp(prefix='streammem_notebook_')
print('workdir:', workdir)
fit = train.train_and_evaluate(config, workdir)
model = train_loop.model_of(fit.graphdef, fit.state)
print(f'trained {fit.step} steps: loss {fit.train["loss"]:.3f}')

# %% [markdown]
# ## One held-out stream
#
# 64 frames of `tree.avi` (never seen in training; 8x the training streams), 4 visual tokens per
# frame, with one event early, one in the middle and one late. The three questions ask which colour
# appeared in the event's patch.

# %%
import matplotlib.pyplot as plt
import numpy as np

from projects.streammem import input_pipeline

lang = models.video_language(config)
NUM_FRAMES, TPF = 64, lang.tokens_per_frame
episode = lang.episodes(7, range(1), videos=(config.video.test_video,), stream_len=NUM_FRAMES * TPF)
event_frames = episode.fact_position[0] // TPF
pixels = episode.patches[0, :, : (lang.size // lang.grid) ** 2 * 3] + 0.5  # drop the place one-hot
p, g = lang.size // lang.grid, lang.grid
frames_rgb = pixels.reshape(NUM_FRAMES, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
frames_rgb = frames_rgb.reshape(NUM_FRAMES, lang.size, lang.size, 3)
montage = np.ones((4 * (lang.size + 1), 16 * (lang.size + 1), 3))  # 4 rows of 16 frames
for f in range(NUM_FRAMES):
  r, c = divmod(f, 16)
  montage[r * 17 : r * 17 + 16, c * 17 : c * 17 + 16] = np.clip(frames_rgb[f], 0, 1)
fig, ax = plt.subplots(figsize=(9, 2.4))
ax.imshow(montage, interpolation='nearest')
for f in event_frames:
  r, c = divmod(int(f), 16)
  ax.add_patch(plt.Rectangle((c * 17 - 1, r * 17 - 1), 17, 17, fill=False, ec='red', lw=1.5))
ax.set_axis_off()
ax.set_title('the 64 frames, row by row (red: the event frames)', fontsize=9)
answers = [
  input_pipeline.COLOUR_NAMES[int(t[m][0]) - lang.first_colour]
  for t, m in zip(episode.qa_target[0], episode.qa_mask[0], strict=True)
]
print('events at frames', event_frames.tolist(), '-> colours', answers)

# %% [markdown]
# ## Streaming under each press at one budget
#
# Clips of 4 frames (16 tokens); every press keeps 32 entries per layer (8 frames' worth, M = 128
# over the 4 layers; the pinned BOS is one of them, so 31 stream entries) out of 256 streamed.
# After every clip we record what each layer holds (`models.memory_contents`): the frame each held
# entry came from (a StreamMem prototype counts for its frame). StreamMem also runs with its
# input-frame filtering (`frame_filter=0.95`, the paper's
# delta): frames that repeat the last kept frame are never encoded.

# %%
BUDGET, CLIP = 32, 16
RUNS = {
  'full KV': ('full', 0.0),
  'StreamMem': ('streammem', 0.0),
  'StreamMem + filter': ('streammem', 0.95),
  'uniform': ('uniform', 0.0),
  'FIFO (recency)': ('fifo', 0.0),
  'StreamingLLM': ('streaming_llm', 0.0),
}
streamer = models.Streamer(model)
held, results = {}, {}
for label, (name, threshold) in RUNS.items():
  method = models.method(name, frames_per_clip=CLIP // TPF, window=4, sinks=4)
  trace = []  # per clip: [layers, frames] how many of each frame's entries are held

  def record(clip, mem, trace=trace):
    c = models.memory_contents(mem)
    counts = np.zeros((c['held'].shape[0], NUM_FRAMES))
    for layer in range(c['held'].shape[0]):
      f = c['frame'][layer, 0][c['held'][layer, 0]]
      np.add.at(counts[layer], f[(f >= 0) & (f < NUM_FRAMES)], 1)
    trace.append(counts)

  results[label] = models.run_stream(
    streamer,
    episode,
    method,
    BUDGET,
    clip_len=CLIP,
    frame_tokens=TPF,
    key=train_loop.step_key(0, 0, 'press'),
    frame_filter=threshold,
    on_clip=record,
  )
  held[label] = np.stack(trace)  # [clips, layers, frames]
  r = results[label]
  extra = '' if r.dropped is None else f', {int(r.dropped.sum())} of {NUM_FRAMES} frames filtered'
  print(f'{label:>20}: at most {held[label].sum(-1).max():.0f} stream entries per layer{extra}')

# %% [markdown]
# ## Which frames survive, clip by clip
#
# One panel per press (rows) and layer (columns): x is the clip just streamed, y the frame, the
# shade how many of that frame's entries the layer holds (4 = the whole frame). Red lines: the event
# frames. Full KV fills the triangle; FIFO and StreamingLLM keep a moving window of the latest
# frames (StreamingLLM also its sinks, here the prefix and first tokens); uniform keeps an evenly
# thinned set; StreamMem keeps what the proxy query attends to, plus one prototype per evicted frame
# (the light grey traces). With filtering, a nearly static video like this one is mostly dropped
# before encoding, and the frames that change (an event's frame among them) are what is kept.

# %%
labels = list(RUNS)
layers = model.cfg.num_layers
fig, axes = plt.subplots(len(labels), layers, figsize=(1.8 * layers, 1.15 * len(labels)))
for i, label in enumerate(labels):
  for layer in range(layers):
    ax = axes[i, layer]
    ax.imshow(
      held[label][:, layer].T,
      aspect='auto',
      origin='lower',
      cmap='Greys',
      vmin=0,
      vmax=TPF,
      interpolation='nearest',
    )
    for f in event_frames:
      ax.axhline(f, color='red', lw=0.6)
    ax.set_xticks([])
    ax.set_yticks([])
    if layer == 0:
      ax.set_ylabel(label, fontsize=8)
    if i == 0:
      ax.set_title(f'layer {layer}', fontsize=8)
    if i == len(labels) - 1:
      ax.set_xlabel('clip', fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## What each memory makes of the questions
#
# The answer's log-likelihood (nats, teacher-forced) and exact match per question, from the final
# memory of each press; `dloglik` is against full KV (the same questions, the same model). One
# stream, so these are an illustration, not a measurement: the README's table averages 16 streams
# (`projects/streammem/README.md`, and `experiments/streammem/plots.py` for stream length and
# budget sweeps).

# %%
full = results['full KV'].loglik[0]
print(f'{"":>20}  ' + '  '.join(f'{d:>14}' for d in input_pipeline.DEPTH_NAMES) + '   dloglik')
for label, r in results.items():
  cells = [
    f'{ll:+7.2f} ({"ok" if ok else "--"})' for ll, ok in zip(r.loglik[0], r.exact[0], strict=True)
  ]
  print(
    f'{label:>20}  '
    + '  '.join(f'{c:>14}' for c in cells)
    + f'   {np.mean(r.loglik[0] - full):+.2f}'
  )
fig, ax = plt.subplots(figsize=(7, 2.6))
x = np.arange(len(input_pipeline.DEPTH_NAMES))
for k, (label, r) in enumerate(results.items()):
  ax.bar(x + (k - len(results) / 2) * 0.13, r.loglik[0], width=0.13, label=label)
ax.set_xticks(x, input_pipeline.DEPTH_NAMES)
ax.set_ylabel('answer log-likelihood')
ax.legend(fontsize=7, ncol=3)
fig.tight_layout()
print('memory bytes:', {k: r.memory_bytes[-1] for k, r in results.items()})
