"""Test helpers only: fake CPU devices, XLA flags for subprocesses, notebook runs, tree comparisons,
and the compiled-program checks (capture a jitted function's optimised HLO; no KV-cache copies).

Library code never imports this module (tests/repo_test.py checks it). The cache directory and its
keys live in common.cache; the cached small trained model in common.models.tiny_lm.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Any

import jax
import numpy as np


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


def capture_compiled_texts(monkeypatch: Any, module: Any, name: str) -> list[str]:
  """Replaces the jitted `module.name` (for the test, through pytest's `monkeypatch`) with a wrapper
  whose `.lower(...).compile()` also appends the optimised HLO text (`compiled.as_text()`) to the
  returned list: what a test reads to check what XLA made of a program the library calls that way."""
  texts: list[str] = []
  real = getattr(module, name)

  class _Lowered:
    def __init__(self, lowered):
      self.lowered = lowered

    def compile(self):
      compiled = self.lowered.compile()
      texts.append(compiled.as_text())
      return compiled

  class _Capture:
    def lower(self, *args, **kwargs):
      return _Lowered(real.lower(*args, **kwargs))

  monkeypatch.setattr(module, name, _Capture())
  return texts


def assert_no_cache_copies(hlo_text: str, layer: Any) -> None:
  """The compiled program (`compiled.as_text()`) holds no `copy` of a KV-cache layer's keys [B, K,
  D, S] or values [B, K, S, D]: a donated cache is updated in place, not moved on every step."""
  for buf in (layer.kt, layer.v):
    assert buf.dtype == np.float32
    shape = f'f32[{",".join(map(str, buf.shape))}]'  # how HLO text writes the buffer's type
    assert shape in hlo_text
    copies = [line for line in hlo_text.splitlines() if ' copy(' in line and shape in line]
    assert copies == [], copies[:3]
