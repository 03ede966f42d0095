"""The video evaluation's pieces: real frames with scripted events, the video-language model's
cached (streaming) path == its one-pass path, and kill + resume of the video training run is
bitwise (common.train_loop.Run). Needs the opencv_videos asset (`python -m common.assets fetch
opencv_videos`) and opencv-python-headless; skipped without them."""

from __future__ import annotations

import json
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import assets
from common import config as config_lib
from common import metrics
from common import sharding
from common import train_loop
from common.sampling import kv_cache
from experiments.streammem.configs import base
from projects.streammem import input_pipeline
from projects.streammem import models
from projects.streammem import train

pytest.importorskip('cv2')
if not assets.is_fetched('opencv_videos'):
  pytest.skip('opencv_videos is not fetched', allow_module_level=True)

CONFIG = base.get_config('video_smoke')
LANG = models.video_language(CONFIG)


def test_frames_are_real_and_events_are_where_the_episode_says():
  frames = input_pipeline.load_frames('Megamind.avi', 16)
  assert frames.shape == (270, 16, 16, 3) and frames.min() >= 0.0 and frames.max() <= 1.0
  assert np.abs(np.diff(frames, axis=0)).mean() > 1e-3  # it moves
  e = LANG.episodes(0, range(2), videos=('Megamind.avi',), stream_len=4 * 40)
  assert e.stream.shape == (2, 160) and e.patches.shape == (2, 160, LANG.patch_dim)
  assert (e.stream == LANG.VIS).all()
  for b in range(2):
    pos = e.fact_position[b]
    assert list(pos) == sorted(pos)  # early < middle < late
    for j, p in enumerate(pos):
      colour = input_pipeline.PALETTE[e.qa_target[b, j][e.qa_mask[b, j]][0] - LANG.first_colour]
      patch = (e.patches[b, p, :192] + 0.5).reshape(8, 8, 3)
      assert e.patches[b, p, 192 + p % 4] == 1.0  # its grid place
      assert (np.abs(patch - colour).sum(-1) < 1e-6).sum() >= LANG.square**2
      assert e.qa[b, j, 2] == LANG.quadrant(p % 4)  # the question names the event's patch


def test_training_examples_are_deterministic_and_padded():
  kw = dict(videos=('vtest.avi', 'tree.avi'), num_frames=8, max_events=3, max_position=1100)
  a = LANG.train_example(0, 5, **kw)
  b = LANG.train_example(0, 5, **kw)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert {LANG.train_example(0, i, **kw)['tokens'].shape for i in range(6)} == {(1 + 32 + 9,)}
  assert (np.diff(a['positions']) > 0).all() and a['positions'].max() < 1100


def _model_and_episodes(length):
  with sharding.unsharded():
    m = models.create_video_lm(CONFIG)
  return m, LANG.episodes(1, range(2), videos=('tree.avi',), stream_len=length)


def test_cached_streaming_equals_one_pass():
  m, e = _model_and_episodes(24)
  seq = np.concatenate([e.prefix, e.stream, e.qa[:, 0]], 1)
  patches = np.concatenate(
    [np.zeros((2, 1, LANG.patch_dim)), e.patches, np.zeros((2, 4, LANG.patch_dim))], 1
  ).astype(np.float32)
  whole = m(jnp.asarray(seq), patches=jnp.asarray(patches))
  cache = kv_cache.KVCache.init(m.cfg, 2, 40)
  parts = []
  for lo, hi in ((0, 17), (17, 34)):  # stream + question in two chunks through the KV cache
    logits, cache = m(
      jnp.asarray(seq[:, lo:hi]), patches=jnp.asarray(patches[:, lo:hi]), cache=cache
    )
    parts.append(logits)
  np.testing.assert_allclose(np.concatenate(parts, 1)[:, :29], whole, rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_video_streaming_with_a_large_budget_equals_full_kv_bitwise():
  m, e = _model_and_episodes(24)
  st = models.Streamer(m)
  kw = dict(clip_len=8, frame_tokens=4, key=jax.random.key(0))
  full = models.run_stream(st, e, models.method('full'), 0, slots=76, **kw)
  mem = models.run_stream(st, e, models.method('streammem', frames_per_clip=2), 64, **kw)
  assert mem.kept.max() == 25  # BOS + 24 visual tokens: nothing evicted
  np.testing.assert_array_equal(mem.loglik, full.loglik)


def _config(**overrides):
  c = base.get_config('video_smoke')
  c.train.update(num_steps=4, log_every=1, eval_every=0)
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = False
  c.data.batch_size = 8
  for k, v in overrides.items():
    c[k.split('.')[0]][k.split('.')[1]] = v
  return c


def _metrics(workdir):
  return metrics.read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl')


@pytest.mark.slow  # ~20-45 s; also a claim (experiments/streammem/claims.py: resume_bitwise)
def test_kill_and_resume_of_the_video_training_is_bitwise(tmp_path):
  ref = train.train_and_evaluate(_config(), str(tmp_path / 'ref'))
  stopped = tmp_path / 'stopped'
  with pytest.raises(train_loop.Preempted):
    train.train_and_evaluate(_config(**{'debug.sigterm_after_step': 2}), str(stopped))
  assert not (stopped / 'results.json').exists()
  resumed = train.train_and_evaluate(_config(**{'debug.sigterm_after_step': 2}), str(stopped))
  assert resumed.step == ref.step == 4
  assert json.loads((stopped / 'results.json').read_text()) == json.loads(
    (tmp_path / 'ref' / 'results.json').read_text()
  )
  assert _metrics(stopped) == _metrics(tmp_path / 'ref')
  a = jax.device_get(nnx.state(train_loop.model_of(ref.graphdef, ref.state), nnx.Param))
  b = jax.device_get(nnx.state(train_loop.model_of(resumed.graphdef, resumed.state), nnx.Param))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow  # a 4-step video run, ~20-45 s
def test_a_video_run_loads_back_as_its_trained_model(tmp_path):
  ref = train.train_and_evaluate(_config(), str(tmp_path / 'run'))
  config, model = models.load_video_run(tmp_path / 'run')
  assert config.data.source == 'video' and config.train.num_steps == 4
  want = jax.device_get(nnx.state(train_loop.model_of(ref.graphdef, ref.state), nnx.Param))
  got = jax.device_get(nnx.state(model, nnx.Param))
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(config_lib.ConfigError, match='not a run workdir'):
    models.load_video_run(tmp_path)
