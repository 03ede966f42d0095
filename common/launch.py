"""The absl entry point every `experiments/<p>/main.py` uses.

    python -m experiments.<p>.main --config=experiments/<p>/configs/base.py:smoke --workdir=DIR \
        [--config.train.num_steps=100] [--coordinator_address=H:P --num_processes=N --process_id=I]

It parses the locked config (an unknown `--config.x` is an error), starts multi-host JAX when asked
(explicit flags, or `--jax_distributed=auto` for the environment's auto-detection on TPU/SLURM),
logs processes and devices, prepares the workdir (config.json; a changed config over an existing
checkpoint is refused) and calls the experiment's `train_and_evaluate(config, workdir)`. Bad input
(common.errors.UserError) ends the process with one line on stderr and exit code 2; SIGTERM after its
checkpoint exits with 143; nothing else is swallowed.
"""

from __future__ import annotations

from collections.abc import Callable
import difflib
import json
import os
import pathlib
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from common import config as config_lib
from common import errors
from common import train_loop

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file, optionally with :variant,key=value.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0 for multi-host runs.'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (hosts).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index in [0, num_processes).')
_DISTRIBUTED = flags.DEFINE_enum(
  'jax_distributed',
  'off',
  ['off', 'auto'],
  "'auto' calls jax.distributed.initialize() with the environment's auto-detection (TPU, SLURM).",
)
_CPU_COLLECTIVES = flags.DEFINE_string(
  'cpu_collectives', 'gloo', 'CPU collectives implementation for multi-process CPU runs.'
)

SIGTERM_EXIT_CODE = 128 + 15  # a run stopped by SIGTERM after saving a checkpoint
INTERRUPT_EXIT_CODE = 128 + 2  # Ctrl-C (SIGINT), likewise


def initialize_distributed() -> None:
  """Starts multi-host JAX if the flags (or --jax_distributed=auto) ask for it."""
  explicit = [_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise errors.UserError(
        '--coordinator_address, --num_processes and --process_id must be given together'
      )
    if jax.config.jax_platforms in (None, '', 'cpu') or os.environ.get('JAX_PLATFORMS') == 'cpu':
      jax.config.update('jax_cpu_collectives_implementation', _CPU_COLLECTIVES.value)
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  elif _DISTRIBUTED.value == 'auto':
    jax.distributed.initialize()


def log_environment() -> None:
  logging.info(
    'JAX %s, process %d/%d, %d local / %d global devices: %s',
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[:8],
  )


def _main(argv: list[str], train_and_evaluate: Callable[[Any, str], Any]) -> None:
  if len(argv) > 1:
    _fail(f'unexpected argument {argv[1]!r}: every option is a --flag (see --help)')
  try:
    config = _CONFIG.value  # the config file is loaded lazily, on first use
    config_lib.to_dict(config)
  except Exception as e:  # noqa: BLE001 - any failure to load the file is the user's to fix
    _fail(f'cannot load --config: {_one_line(e)}')
  if config is None or not _WORKDIR.value:
    _fail('--config and --workdir are required')
  # Keep TF (pulled in by some tfds paths) off accelerators; JAX owns them.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  try:
    initialize_distributed()
    log_environment()
    if jax.process_index() != 0:
      logging.set_verbosity(logging.WARNING)
    # The workdir is created by the run (common.train_loop.Run), after the config, the mesh and
    # the paper's own checks have passed, so bad input leaves nothing behind.
    train_and_evaluate(config, _WORKDIR.value)
  except errors.UserError as e:
    _fail(str(e))
  except train_loop.Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(128 + int(e.signum))
  except KeyboardInterrupt:
    print('interrupted (Ctrl-C) before training started; nothing was saved', file=sys.stderr)
    sys.exit(INTERRUPT_EXIT_CODE)


def _fail(message: str) -> None:
  """One line on stderr, exit code 2: how every bad input ends."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _one_line(e: BaseException) -> str:
  """The informative last line of a (possibly wrapped, multi-line) flag-parsing error."""
  lines = [ln.strip() for ln in str(e).replace('\\n', '\n').splitlines() if ln.strip()]
  text = lines[-1] if lines else type(e).__name__
  for prefix in ('common.config.ConfigError: ', 'ConfigError: '):
    text = text.split(prefix, 1)[-1]
  # Wrapped reprs leave unbalanced quotes at the ends ('...?\''): drop them.
  for q in '\'"':
    if text.endswith(q) and text.count(q) % 2:
      text = text[:-1]
    if text.startswith(q) and text.count(q) % 2:
      text = text[1:]
  if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':
    text = text[1:-1]
  return text.strip()


def _unknown_override(argv: list[str]) -> str | None:
  """'unknown config key ...' naming the first --config.a.b=v whose path the config lacks."""
  files = [a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')]
  if not files:
    return None
  try:
    config = config_lib.load(files[-1])
  except Exception:  # noqa: BLE001 - the file's own error is reported instead
    return None
  for arg in argv[1:]:
    if not arg.startswith('--config.'):
      continue
    key = arg[len('--config.') :].split('=', 1)[0]
    node, walked = config, []
    for part in key.split('.'):
      if not hasattr(node, 'keys') or part not in node:
        where = '.'.join(walked) or 'the config'
        close = difflib.get_close_matches(part, list(node.keys()) if hasattr(node, 'keys') else [])
        hint = f'; did you mean {".".join([*walked, close[0]])!r}?' if close else ''
        return f'unknown config key {".".join([*walked, part])!r} in {arg} ({where} has no {part!r}{hint})'
      node, walked = node[part], [*walked, part]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports a bad --config override or file in one line (exit 2).

  ml_collections raises AttributeError for an unknown `--config.x` and absl wraps errors from the
  config file; both would otherwise end in a traceback or a multi-line FATAL message.
  """
  if any(a in ('--help', '-h', '--helpshort') for a in argv[1:]):
    print(help_text(argv))
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, flags.Error, errors.UserError, KeyError, TypeError, ValueError) as e:
    _fail(_unknown_override(argv) or _one_line(e))


def help_text(argv: list[str]) -> str:
  """Usage, the launcher's flags, and, when --config is given, every config key with its value."""
  module = pathlib.Path(argv[0]).parent.name if argv and argv[0].endswith('main.py') else '<p>'
  lines = [
    f'usage: python -m experiments.{module}.main --config=FILE.py[:variant,key=value] --workdir=DIR',
    '       [--config.KEY=VALUE ...] [--coordinator_address=H:P --num_processes=N --process_id=I]',
    '',
    'flags:',
  ]
  for name in (
    'config',
    'workdir',
    'coordinator_address',
    'num_processes',
    'process_id',
    'jax_distributed',
    'cpu_collectives',
  ):
    flag = flags.FLAGS[name]
    lines.append(
      f'  --{name}: {flag.help}' + (f' (default: {flag.default})' if flag.default else '')
    )
  files = [a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')]
  if not files:
    lines += ['', 'Give --config=FILE.py[:variant] with --help to list its keys.']
    return '\n'.join(lines)
  try:
    config = config_lib.load(files[-1])
  except Exception as e:  # noqa: BLE001 - the file's own error, shown instead of the keys
    return '\n'.join([*lines, '', f'cannot load {files[-1]}: {_one_line(e)}'])
  lines += ['', f'config keys of {files[-1]} (override with --config.KEY=VALUE):']
  flat = config_lib.flatten(config_lib.to_dict(config))
  width = max(len(k) for k in flat)
  lines += [f'  {k:<{width}}  {json.dumps(v)}' for k, v in flat.items()]
  return '\n'.join(lines)


def run(train_and_evaluate: Callable[[Any, str], Any]) -> None:
  """Parses flags and runs `train_and_evaluate(config, workdir)` (call from `if __name__...`)."""
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(lambda argv: _main(argv, train_and_evaluate), flags_parser=parse_flags)
