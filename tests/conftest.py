"""Test-session setup: CPU, 8 fake devices, cheap compiles, persistent compilation cache, before JAX starts.

pytest imports this before any test module, so the environment below is in place before the first
`import jax` initialises a backend. The compilation cache lives outside the clone so it survives
CI's fresh clones on the same machine.
"""

import os
import pathlib

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
_flags = os.environ.get('XLA_FLAGS', '')
if 'xla_force_host_platform_device_count' not in _flags:
  _flags += ' --xla_force_host_platform_device_count=8'
# The suite is compile-bound (hundreds of small jitted steps, each compiled once per shape): without
# LLVM's expensive optimisations a cold run (empty compilation cache, as on a fresh CI machine) is
# about a quarter faster. HLO passes (fusion, layout) are unchanged, so what a test asserts of the
# maths is unchanged; set XLA_FLAGS with your own optimisation level to test at another.
if 'xla_backend_optimization_level' not in _flags:
  _flags += ' --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
os.environ['XLA_FLAGS'] = _flags.strip()
_cache_root = pathlib.Path(
  os.environ.get('MONOREPO_CACHE_DIR')
  or pathlib.Path(os.environ.get('XDG_CACHE_HOME', pathlib.Path.home() / '.cache'))
  / 'meta-jax-monorepo'
)
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(_cache_root / 'jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')


@pytest.fixture
def saved_figures(monkeypatch):
  """The matplotlib Figures a test saves, in order, to inspect (Figure.savefig still writes them):
  the library figures are plain Figure objects, outside pyplot's registry."""
  from matplotlib import figure  # noqa: PLC0415

  saved = []
  savefig = figure.Figure.savefig

  def keep(fig, *args, **kwargs):
    saved.append(fig)
    return savefig(fig, *args, **kwargs)

  monkeypatch.setattr(figure.Figure, 'savefig', keep)
  return saved
