"""FuseChat (arXiv 2408.07990): pairwise fusion fine-tuning, then merging, on the run skeleton.

`train_and_evaluate(config, workdir)`:

  1. loads the pivot and the sources (models.py), builds the shared fusion corpus with each
     source's aligned top-k teacher (input_pipeline.py; cached on disk once);
  2. stage 1, pairwise fusion: one copy of the pivot per source (a *fused target*), each trained
     with full fine-tuning (every parameter; no adapters) on L = λ L_CLM + (1 - λ) L_fuse
     (losses.py) against its own source's teacher, all copies in lockstep on the same batches
     (train.num_steps steps; the batch of step s is a function of (seed, s), so a killed run
     resumes bitwise from its last checkpoint: state = every copy's parameters and AdamW state);
     'train' rows: `<target>/loss|clm|fuse` and `loss` (their mean);
  3. every train.eval_every steps: per-skill accuracy and perplexity of each fused target
     (evaluate.py), as `fused_<source>/<metric>`;
  4. at the end (the final 'eval' row, also results.json): the pivot, each source (its own
     tokenizer; evaluated right after its top-k pass, so that only one source is ever in
     memory), each fused target and each merge of the fused targets in parameter space
     (`sce`, `linear`, `task_arithmetic`, `ties`, `dare`: stage 2), all on the same items.
"""

from __future__ import annotations

import gc
import json

from flax import nnx
import jax
import ml_collections
import numpy as np
import optax

from common import config as config_lib
from common import metrics as metrics_lib
from common import optim
from common import sharding
from common import train_loop
from projects.fusechat import evaluate
from projects.fusechat import input_pipeline
from projects.fusechat import losses
from projects.fusechat import models


def short(name: str) -> str:
  """'tiny:coder' -> 'coder'; an asset name stays as it is."""
  return name.split(':', 1)[-1]


def target_names(config: ml_collections.ConfigDict) -> list[str]:
  return [f'fused_{short(s)}' for s in config.model.sources]


def model_names(config: ml_collections.ConfigDict) -> list[str]:
  """Every evaluated model in reading order: pivot, fused targets, merges, sources."""
  sources = [f'source_{short(s)}' for s in config.model.sources]
  return ['pivot', *target_names(config), *config.merge.methods, *sources]


_STEPS: dict[tuple, object] = {}  # make_step's jitted functions in this process, by their inputs


def make_step(graphdef, rest, tx, names, lam):
  """The jitted lockstep update of every fused target: (state, batch) -> (state, metrics)."""

  def loss_fn(params, tokens, mask, ids, probs):
    model = nnx.merge(graphdef, params, rest)
    logits = model(tokens[:, :-1])
    return losses.fusion_loss(logits, tokens[:, 1:], mask[:, 1:], ids, probs, lam)

  @jax.jit
  def step(state, batch):
    new_params, new_opt, m = {}, {}, {}
    for name in names:
      params = state['params'][name]
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch['tokens'], batch['mask'], batch['ids'][name], batch['probs'][name]
      )
      updates, new_opt[name] = tx.update(grads, state['opt'][name], params)
      new_params[name] = optax.apply_updates(params, updates)
      m[f'{name}/loss'], m[f'{name}/clm'], m[f'{name}/fuse'] = loss, aux['clm'], aux['fuse']
    m['loss'] = sum(m[f'{n}/loss'] for n in names) / len(names)
    return {'params': new_params, 'opt': new_opt}, m

  return step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_loop.FitResult:
  input_pipeline.check_config(config)  # before the run creates the workdir
  with train_loop.Run(config, workdir) as run:
    if run.finished:
      return train_loop.FitResult.of_finished(run)
    mesh, rules = run.mesh, run.rules
    pivot = models.load_member(config.model.pivot, config.dtype)
    data = input_pipeline.fusion_base(config, pivot)
    models.place(pivot, mesh)  # after its single-device top-k pass: replicated on the mesh
    evaluator = evaluate.Evaluator(config, mesh=mesh, rules=rules)
    names = target_names(config)
    # One source in memory at a time (the real ones are 0.3-0.5B parameters with 151k-262k
    # vocabularies): its teacher, then its own evaluation (it does not change), then it is freed.
    teachers, source_evals = [], {}
    for source in config.model.sources:
      src = models.load_member(source, config.dtype)
      teachers.append(input_pipeline.add_source(config, data, pivot, src))
      models.place(src, mesh)
      with jax.set_mesh(mesh), sharding.axis_rules(rules):
        res = evaluator(src.model, src.tokenizer)
      source_evals.update({f'source_{short(source)}/{k}': v for k, v in res.items()})
      big = sum(x.size for x in jax.tree.leaves(nnx.state(src.model))) > 10_000_000
      del src
      if big:  # free a real source now (a full collection costs ~0.5 s: not for the tiny ones)
        gc.collect()

    graphdef, base_params, rest = nnx.split(pivot.model, nnx.Param, ...)
    tx = optim.make_optimizer(config.optimizer, run.num_steps)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def init():
      state = {
        'params': {n: base_params for n in names},
        'opt': {n: tx.init(base_params) for n in names},
      }
      return jax.device_put(state, replicated)

    abstract = jax.eval_shape(init)
    shardings = jax.tree.map(lambda _: replicated, abstract)
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract
    )
    start, state, _, meta = run.restore_or_init(
      train_loop.ShardedState(None, abstract, shardings), init
    )
    last_train, last_eval = dict(meta.get('train', {})), dict(meta.get('eval', {}))
    # One traced step per distinct (model, optimizer, schedule length, targets, lambda, mesh) in
    # the process: a suite's seeds and controls reuse it instead of tracing it again.
    step_key = (
      graphdef,
      evaluate.tree_digest(rest),
      json.dumps(config_lib.to_dict(config.optimizer), sort_keys=True),
      run.num_steps,
      tuple(names),
      float(config.fuse.lam),
      tuple(mesh.shape.items()),
      tuple(d.id for d in mesh.devices.flat),
      repr(rules),
    )
    if step_key[1] is None:
      step_fn = make_step(graphdef, rest, tx, names, config.fuse.lam)
    else:
      if step_key not in _STEPS:
        _STEPS[step_key] = make_step(graphdef, rest, tx, names, config.fuse.lam)
      step_fn = _STEPS[step_key]
    base_host = jax.device_get(base_params)

    def model_of(params):
      return nnx.merge(graphdef, params, rest)

    def eval_now(step, final):
      def fn():
        out = {}
        with jax.set_mesh(mesh), sharding.axis_rules(rules):
          fused = {n: state['params'][n] for n in names}
          for n, p in fused.items():
            out.update({f'{n}/{k}': v for k, v in evaluator(model_of(p), pivot.tokenizer).items()})
          if final:
            out.update(
              {f'pivot/{k}': v for k, v in evaluator(pivot.model, pivot.tokenizer).items()}
            )
            out.update(source_evals)
            targets = [jax.device_get(fused[n]) for n in names]
            for method, merged in evaluate.merges(base_host, targets, config).items():
              merged = jax.device_put(merged, replicated)
              res = evaluator(model_of(merged), pivot.tokenizer)
              out.update({f'{method}/{k}': v for k, v in res.items()})
        for n, t in zip(names, teachers, strict=True):
          out[f'{n}/aligned_frac'] = t.aligned_frac
          out[f'{n}/mince_source_frac'] = float(np.mean(t.chosen))
        return out

      return run.evaluate(step, fn)

    def save(step):
      run.save(step, state, meta={'train': last_train, 'eval': last_eval})

    if start == 0 and config.train.eval_at_start:
      last_eval = eval_now(0, final=False)
    metrics_lib.log(
      'fusing %s into %s: %d texts x %d tokens, lambda %.2f, steps %d-%d',
      ', '.join(config.model.sources),
      pivot.name,
      len(data),
      config.fuse.seq_len,
      config.fuse.lam,
      start + 1,
      run.num_steps,
    )
    history = []
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
      for step in range(start + 1, run.num_steps + 1):
        rows = input_pipeline.batch_rows(config.seed, step, config.fuse.batch_size, len(data))
        batch = {
          'tokens': data.tokens[rows],
          'mask': data.mask[rows],
          'ids': {n: t.ids[rows] for n, t in zip(names, teachers, strict=True)},
          'probs': {n: t.probs[rows] for n, t in zip(names, teachers, strict=True)},
        }
        state, m = step_fn(state, sharding.global_rows(batch, mesh, rules))
        history.append(m)
        if run.should_log(step):
          history = jax.device_get(history)
          last_train = {k: float(np.mean([h[k] for h in history])) for k in history[-1]}
          run.check_finite(step, last_train['loss'])
          run.write(step, 'train', last_train)
          metrics_lib.log('step %d/%d: loss %.4f', step, run.num_steps, last_train['loss'])
          history = []
        if run.should_eval(step):
          last_eval = eval_now(step, final=step == run.num_steps)
        if run.should_save(step):
          save(step)
        run.end_step(step, lambda step=step: save(step))
    if not last_eval or 'pivot/acc' not in last_eval:  # eval_every = 0: the final evaluation
      last_eval = eval_now(run.num_steps, final=True)
    metrics_lib.log(
      'final:\n%s',
      evaluate.table(
        last_eval,
        model_names(config),
        ['code/acc', 'text/acc', 'acc', 'code/nll_byte', 'text/nll_byte'],
      ),
    )
    results = run.finish(last_train, last_eval)
  return train_loop.FitResult(run.num_steps, None, None, results['train'], results['eval'])
