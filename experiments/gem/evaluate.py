"""Evaluates a finished (or stopped) GEM run again, without training (projects/gem/evaluate.py).

  python -m experiments.gem.evaluate --workdir=/tmp/gem_smoke --steps=0,latest
  python -m experiments.gem.evaluate --workdir=RUN --steps=latest --set=eval.minilm=False

--steps: 0 (the run's rebuilt initial state), N (checkpoint N) or 'latest'; --set: config overrides
applied after eval.chatterbot=True. Each step's evaluation goes to --out_dir (default
WORKDIR/evaluations/step_<N>.json) with logged_max_abs_diff against the run's own logged metrics.
"""

from __future__ import annotations

import functools
import sys
import types

from absl import app
from absl import flags

from common import errors
from projects.gem import evaluate


def define_flags() -> types.SimpleNamespace:
  """The CLI's flags, defined only when this module runs as a program.

  Importing the module (tests, the all-modules import check) then never registers a second
  --workdir next to another entry point's (absl flags are process-global).
  """
  return types.SimpleNamespace(
    workdir=flags.DEFINE_string(
      'workdir', None, 'the run to evaluate (its config.json + checkpoints)'
    ),
    steps=flags.DEFINE_list('steps', ['latest'], "steps: 0 (initial state), N, or 'latest'"),
    overrides=flags.DEFINE_multi_string(
      'set',
      [],
      f'config overrides key=value, applied after {", ".join(evaluate.DEFAULT_OVERRIDES)}',
    ),
    out_dir=flags.DEFINE_string(
      'out_dir', None, 'where step_<N>.json go (default WORKDIR/evaluations)'
    ),
  )


def main(argv: list[str], cli: types.SimpleNamespace) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not cli.workdir.value:
    raise app.UsageError('--workdir is required')
  try:
    evaluate.evaluate_workdir(
      cli.workdir.value, cli.steps.value, cli.overrides.value, out_dir=cli.out_dir.value
    )
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(functools.partial(main, cli=define_flags()))
