"""Test-session setup: CPU, 8 fake devices, persistent compilation cache, before JAX starts.

pytest imports this before any test module, so the environment below is in place before the first
`import jax` initialises a backend. The compilation cache lives outside the clone so it survives
CI's fresh clones on the same machine.
"""

import os
import pathlib

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
_flags = os.environ.get('XLA_FLAGS', '')
if 'xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' --xla_force_host_platform_device_count=8').strip()
_cache_root = pathlib.Path(
  os.environ.get('MONOREPO_CACHE_DIR')
  or pathlib.Path(os.environ.get('XDG_CACHE_HOME', pathlib.Path.home() / '.cache'))
  / 'meta-jax-monorepo'
)
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(_cache_root / 'jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
