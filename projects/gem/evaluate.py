"""Evaluate a finished (or stopped) GEM run again, without training: the full eval dict at chosen steps.

Why: evaluation sets grow after runs finish (chatterbot_qa came after the SmolLM2 runs started), and
retraining a SmolLM2 run costs hours. This reads the run's own config.json, switches on what is
asked (default `eval.chatterbot=True`; a config written before that key existed reads as off), and
evaluates with train.make_eval_fn, the code the run used:

  step 0     the run's initial state, rebuilt, not read from a checkpoint (the real pretrained
             weights + the k special rows for `model.pretrained`, else the seeded from-scratch init):
             the "base" of the SmolLM2 runs, whose step-0 metrics are in metrics.jsonl;
  step N     the model parameters of checkpoint N (checkpoint.restore_params: the 'model' subtree
             only, read without Orbax's tmp-directory cleanup);
  latest     the newest checkpoint.

Each evaluation is written as JSON ({'workdir', 'step', 'overrides', 'eval', 'logged_max_abs_diff',
'wall_s', 'cpu_s'}) to --out_dir (default <workdir>/evaluations/step_<N>.json). logged_max_abs_diff
compares the metrics the run logged at that step (metrics.jsonl) with the new ones on their shared
names: 0 (or float noise) says the evaluation reproduces the run's own, so the new names are
comparable with the old. The workdir's config.json, checkpoints and metrics are never written.

COMMAND:
  python -m projects.gem.evaluate --workdir=/tmp/gem_smoke --steps=0,latest
  python -m projects.gem.evaluate --workdir=RUN --steps=latest --set=eval.minilm=False
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import json
import math
import os
import pathlib
import sys
import time
import types

from absl import app
from absl import flags
import jax
import ml_collections

from common import checkpoint as ckpt_lib
from common import config as config_lib
from common import errors
from common import metrics as metrics_lib
from common import sharding
from common import train_loop
from projects.gem import train

DEFAULT_OVERRIDES = ('eval.chatterbot=True',)


class EvaluateError(errors.UserError, ValueError):
  """A workdir or step that cannot be evaluated (no config.json, no such checkpoint)."""


def load_config(workdir: str | os.PathLike, overrides: Sequence[str] = ()):
  """The run's config.json with eval keys added since defaulted off, then DEFAULT_OVERRIDES and
  `overrides` (key=value, later ones win) applied."""
  path = pathlib.Path(workdir) / 'config.json'
  if not path.is_file():
    raise EvaluateError(f'{path} does not exist: not a run workdir')
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  if 'chatterbot' not in config.eval:  # configs written before the key existed
    config.eval.chatterbot = False
  for item in (*DEFAULT_OVERRIDES, *overrides):
    key, sep, value = item.partition('=')
    if not sep:
      raise EvaluateError(f'override {item!r} is not key=value')
    config_lib.set_key(config, key.strip(), value.strip())
  config.lock()
  return config


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  d = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def resolve_step(workdir: str | os.PathLike, step: int | str) -> int:
  """'latest' -> the newest checkpoint's step; 0 and existing checkpoint steps as they are."""
  steps = checkpoint_steps(workdir)
  if step == 'latest':
    if not steps:
      raise EvaluateError(f'{workdir} has no checkpoint')
    return steps[-1]
  step = int(step)
  if step != 0 and step not in steps:
    raise EvaluateError(f'{workdir} has no checkpoint at step {step} (it has {steps})')
  return step


def model_at(config, workdir, step: int, vocab_size: int, mesh):
  """The GemModel of the run at `step` (0: the rebuilt initial state), laid out on `mesh`."""
  rules = tuple(tuple(r) for r in config.sharding.rules)
  create = train.create_state_fn(config, vocab_size)
  spec = train_loop.abstract_state(create, mesh, rules)
  if step == 0:
    if config.checkpoint.get('resume_from'):
      raise EvaluateError(
        f'{workdir} started from checkpoint.resume_from={config.checkpoint.resume_from}, not from '
        'step 0: evaluate that run instead'
      )
    initial = train.initial_state_fn(config)
    if initial is not None:
      state = initial(spec)
    else:
      state = train_loop.init_state(create, mesh, rules).state
    if config.checkpoint.get('init_from'):  # as restore_or_init: parameters on top of the init
      state['model'] = ckpt_lib.restore_params(config.checkpoint.init_from, spec.state['model'])
  else:
    state = spec.state
    path = pathlib.Path(workdir) / 'checkpoints' / str(step)
    state['model'] = ckpt_lib.restore_params(path, spec.state['model'])
  return train_loop.model_of(spec.graphdef, state)


def _logged(workdir, step: int) -> dict | None:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.is_file():
    return None
  rows = [r for r in metrics_lib.read_jsonl(path) if r['split'] == 'eval' and r['step'] == step]
  return rows[-1] if rows else None


def _max_abs_diff(logged: dict | None, new: dict) -> float | None:
  if logged is None:
    return None
  shared = [k for k in new if k in logged and k not in ('step', 'split')]
  if not shared:
    return None
  return max(abs(float(new[k]) - float(logged[k])) for k in shared)


def evaluate_workdir(
  workdir: str | os.PathLike,
  steps: Sequence[int | str] = ('latest',),
  overrides: Sequence[str] = (),
  *,
  mesh: jax.sharding.Mesh | None = None,
  out_dir: str | os.PathLike | None = None,
) -> dict[int, dict]:
  """{step: record} for each of `steps` (see the module docstring); writes one JSON per step."""
  config = load_config(workdir, overrides)
  resolved = [resolve_step(workdir, s) for s in steps]
  mesh = mesh or sharding.make_mesh(config_lib.mesh_spec(config))
  rules = tuple(tuple(r) for r in config.sharding.rules)
  d = train.Data(config)
  evaluate = train.make_eval_fn(config, mesh, d)
  out_dir = pathlib.Path(out_dir) if out_dir else pathlib.Path(workdir) / 'evaluations'
  records = {}
  for step in resolved:
    t0, c0 = time.perf_counter(), time.process_time()
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
      model = model_at(config, workdir, step, d.vocab_size, mesh)
      result = {k: float(v) for k, v in evaluate(model, step).items()}
    bad = [k for k, v in result.items() if not math.isfinite(v)]
    if bad:
      metrics_lib.log('non-finite metrics at step %d: %s', step, bad)
    record = {
      'workdir': str(pathlib.Path(workdir).absolute()),
      'step': step,
      'overrides': [*DEFAULT_OVERRIDES, *overrides],
      'eval': result,
      'logged_max_abs_diff': _max_abs_diff(_logged(workdir, step), result),
      'wall_s': round(time.perf_counter() - t0, 2),
      'cpu_s': round(time.process_time() - c0, 2),
    }
    if jax.process_index() == 0:
      out_dir.mkdir(parents=True, exist_ok=True)
      metrics_lib.write_json(out_dir / f'step_{step}.json', record)
    metrics_lib.log(
      'step %d: %d metrics, logged_max_abs_diff %s, %.1f s -> %s',
      step,
      len(result),
      record['logged_max_abs_diff'],
      record['wall_s'],
      out_dir / f'step_{step}.json',
    )
    records[step] = record
  return records


def define_flags() -> types.SimpleNamespace:
  """The CLI's flags, defined only when this module runs as a program.

  Importing the module (tests, notebooks, experiments.gem.sweep) then never registers a second
  --workdir next to another entry point's (absl flags are process-global).
  """
  return types.SimpleNamespace(
    workdir=flags.DEFINE_string(
      'workdir', None, 'the run to evaluate (its config.json + checkpoints)'
    ),
    steps=flags.DEFINE_list('steps', ['latest'], "steps: 0 (initial state), N, or 'latest'"),
    overrides=flags.DEFINE_multi_string(
      'set', [], f'config overrides key=value, applied after {", ".join(DEFAULT_OVERRIDES)}'
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
    evaluate_workdir(
      cli.workdir.value, cli.steps.value, cli.overrides.value, out_dir=cli.out_dir.value
    )
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(functools.partial(main, cli=define_flags()))
