"""Shared test fixtures: fake devices, tree comparisons, and `tiny_lm`, a small model that has learnt.

`tiny_lm()` trains a small decoder on the procedural MarkovLanguage deterministically (well under a
minute on 2 CPU cores) and caches the parameters outside the repo under a key hashed from its config
and the source of the code that produced it, so tests and smoke runs that need a model with real
structure (samplers, RL, adapters, distillation) get one in milliseconds after the first call.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import hashlib
import inspect
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

from flax import nnx
import jax
import numpy as np
import optax


def cache_dir(*parts: str) -> pathlib.Path:
  """$MONOREPO_CACHE_DIR, else ${XDG_CACHE_HOME:-~/.cache}/meta-jax-monorepo (outside the repo)."""
  root = os.environ.get('MONOREPO_CACHE_DIR') or (
    pathlib.Path(os.environ.get('XDG_CACHE_HOME', pathlib.Path.home() / '.cache'))
    / 'meta-jax-monorepo'
  )
  path = pathlib.Path(root, *parts)
  path.mkdir(parents=True, exist_ok=True)
  return path


def set_fake_cpu_devices(n: int = 8) -> None:
  """Asks for `n` CPU devices; must run before JAX initialises its backend (e.g. in a notebook)."""
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={n}'.strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def xla_flags_with_devices(n: int) -> str:
  """This process's XLA_FLAGS with the fake CPU device count set to `n`, for a subprocess.

  The other flags (e.g. the test session's cheap-compile flags, tests/conftest.py) carry over, so a
  subprocess compiles as its parent does and shares its persistent-cache entries.
  """
  kept = [
    f
    for f in os.environ.get('XLA_FLAGS', '').split()
    if 'xla_force_host_platform_device_count' not in f
  ]
  return ' '.join([*kept, f'--xla_force_host_platform_device_count={n}'])


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_notebook_script(name: str, *, timeout: float = 900) -> str:
  """Runs `notebooks/<name>.py` the way a user would (fresh process, one CPU device, headless
  matplotlib) and returns its stdout; a non-zero exit fails with the end of its stderr.

  Tests run under 8 fake devices (tests/conftest.py); a notebook is written for one, so the
  subprocess gets its own XLA_FLAGS.
  """
  env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'MPLBACKEND': 'Agg',
    'XLA_FLAGS': xla_flags_with_devices(1),
  }
  p = subprocess.run(
    [sys.executable, f'notebooks/{name}.py'],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  return p.stdout


def assert_trees_close(a: Any, b: Any, *, rtol: float = 1e-6, atol: float = 0.0) -> None:
  """Same structure and allclose leaves, naming the first path that differs."""
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten_with_path(b)
  if ta != tb:
    raise AssertionError(f'tree structures differ:\n{ta}\n{tb}')
  for (path, x), (_, y) in zip(la, lb, strict=True):
    np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
    )


def assert_trees_equal(a: Any, b: Any) -> None:
  """Bitwise equality of every leaf."""
  assert_trees_close(a, b, rtol=0.0, atol=0.0)


# ---------------------------------------------------------------------------------------------------
# tiny_lm


@dataclasses.dataclass(frozen=True)
class TinyLMConfig:
  vocab_size: int = 64
  seq_len: int = 64
  language_seed: int = 0
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  mlp_dim: int = 128
  steps: int = 300
  batch_size: int = 32
  lr: float = 3e-3
  seed: int = 0


def _code_fingerprint() -> str:
  from common import data  # noqa: PLC0415
  from common import losses  # noqa: PLC0415
  from common.models import decoder  # noqa: PLC0415

  # The language, the loss and the model: edits elsewhere in these modules do not retrain.
  src = ''.join(inspect.getsource(m) for m in (data.MarkovLanguage, losses, decoder))
  src += inspect.getsource(_train_tiny_lm)
  return hashlib.sha256(src.encode()).hexdigest()[:16]


def _numerics_fingerprint() -> str:
  """What changes the trained bits besides the code: XLA compiles differently for 1 and 8 (fake)
  devices and per flag set and version (measured: the tiny LM's weights differ by 4.8e-7 between a
  1-device and an 8-device process). Keying on these keeps a cached model bitwise what this process
  would train, so a run's results do not depend on which process filled the cache."""
  return json.dumps(
    [jax.__version__, jax.default_backend(), jax.device_count(), os.environ.get('XLA_FLAGS', '')]
  )


def decoder_config(cfg: TinyLMConfig):
  """The DecoderConfig of the tiny LM `cfg` describes: what an abstract (eval_shape) or fresh copy
  of the shared tiny LM needs without loading or training it (e.g. adapter shape planning)."""
  from common.models import decoder  # noqa: PLC0415

  return decoder.DecoderConfig(
    vocab_size=cfg.vocab_size,
    d_model=cfg.d_model,
    num_layers=cfg.num_layers,
    num_heads=cfg.num_heads,
    num_kv_heads=cfg.num_kv_heads,
    head_dim=cfg.d_model // cfg.num_heads,
    mlp_dim=cfg.mlp_dim,
  )


def _train_tiny_lm(cfg: TinyLMConfig) -> tuple[dict, list[float]]:
  """Trains on one device (no mesh) and returns (pure parameter dict, loss curve)."""
  from common import data  # noqa: PLC0415
  from common import losses  # noqa: PLC0415
  from common.models import decoder  # noqa: PLC0415

  lang = data.MarkovLanguage(cfg.vocab_size, cfg.seq_len, seed=cfg.language_seed)
  dcfg = decoder_config(cfg)
  with nnx.use_eager_sharding(False):
    model = decoder.Decoder(dcfg, rngs=nnx.Rngs(cfg.seed))
    warmup = min(30, cfg.steps // 10)
    tx = optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1)), b2=0.98
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, tokens):
    def loss_fn(m):
      return losses.next_token_loss(m, tokens)[0]

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  curve = []
  for i in range(cfg.steps):
    first = i * cfg.batch_size
    tokens = np.stack([lang[j]['tokens'] for j in range(first, first + cfg.batch_size)])
    curve.append(float(step(model, opt, tokens)))
  return nnx.state(model, nnx.Param).to_pure_dict(), curve


def _flatten(d: Mapping, prefix: str = '') -> dict[str, np.ndarray]:
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + '/'))
    else:
      out[key] = np.asarray(v)
  return out


@dataclasses.dataclass
class TinyLM:
  model: nnx.Module
  language: Any  # common.data.MarkovLanguage
  config: TinyLMConfig
  loss_curve: list[float]


def tiny_lm(cfg: TinyLMConfig | None = None, **overrides) -> TinyLM:
  """A small decoder trained on the procedural language; cached outside the repo after first use."""
  from common import data  # noqa: PLC0415
  from common.models import decoder  # noqa: PLC0415

  cfg = dataclasses.replace(cfg or TinyLMConfig(), **overrides)
  key = hashlib.sha256(
    (
      json.dumps(dataclasses.asdict(cfg), sort_keys=True)
      + _code_fingerprint()
      + _numerics_fingerprint()
    ).encode()
  ).hexdigest()[:20]
  path = cache_dir('tiny_lm') / f'{key}.npz'
  with nnx.use_eager_sharding(False):
    model = decoder.Decoder(decoder_config(cfg), rngs=nnx.Rngs(cfg.seed))
  template = nnx.state(model, nnx.Param).to_pure_dict()
  if path.exists():
    with np.load(path) as f:
      flat = {k: f[k] for k in f.files}
    curve = [float(x) for x in flat.pop('__loss_curve__')]
  else:
    params, curve = _train_tiny_lm(cfg)
    flat = _flatten(params)
    tmp = path.with_suffix('.tmp.npz')
    np.savez(tmp, __loss_curve__=np.asarray(curve), **flat)
    os.replace(tmp, path)
  restored = jax.tree_util.tree_map_with_path(
    lambda p, _: flat['/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in p)], template
  )
  nnx.update(model, _as_state(model, restored))
  lang = data.MarkovLanguage(cfg.vocab_size, cfg.seq_len, seed=cfg.language_seed)
  return TinyLM(model, lang, cfg, curve)


def _as_state(model: nnx.Module, pure: dict) -> Any:
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  return state
