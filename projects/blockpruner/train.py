"""BlockPruner (arXiv 2406.10594): a resumable pruning search on the run skeleton.

`train_and_evaluate(config, workdir)` loads the model (models.py), builds the calibration set,
held-out text and multiple-choice tasks (input_pipeline.py), resolves config.prune.method to a
search object (search.py: BlockPruner or a baseline) and removes one unit per step for
config.train.num_steps steps (a block for block methods, a layer for layer methods):

  step s: the method picks its next removal (BlockPruner: the block whose removal gives the lowest
          calibration perplexity, losses.py) -> metrics.jsonl 'train' row: the removed block(s),
          calibration loss / perplexity, removed parameters (count and share of the model and of
          its blocks), MHA / MLP blocks removed so far, candidates scored;
          every train.eval_every steps (and at step 0 with train.eval_at_start: the dense model)
          -> 'eval' row: held-out perplexity and, every eval.mc_every evaluations (and at the end),
          multiple-choice accuracy (evaluate.py; an evaluation this process already ran, of the
          same model, sets and mask, is returned from evaluate.evaluate_memo, not rerun).

Nothing is trained: the checkpointed state is the block mask (int32 [num_layers, 2]) with the
removal order and the method's own state as JSON, saved every checkpoint.every_steps steps. A
killed run resumes from the blocks already removed and replays exactly (the search is
deterministic). At the end the structurally pruned model (`common.models.decoder.without_blocks`)
is written to WORKDIR/pruned/ (model.json + checkpoint; `python -m common.models.generate
--workdir=WORKDIR/pruned` talks to it) unless prune.save_model is False, and WORKDIR/removed.json
lists the removal order.
"""

from __future__ import annotations

import json
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import checkpoint as ckpt_lib
from common import config as config_lib
from common import metrics as metrics_lib
from common import sharding
from common import train_loop
from common.models import spec
from projects.blockpruner import evaluate
from projects.blockpruner import input_pipeline
from projects.blockpruner import losses
from projects.blockpruner import models
from projects.blockpruner import search


def max_steps(method: search.Method, num_layers: int, block_type: str) -> int:
  """How many steps the method can take before nothing is left to remove."""
  if method.unit == 'layer':
    return num_layers
  return len(models.all_blocks(num_layers, block_type))


def removal_metrics(
  removed: list[models.Block], sizes: dict[models.Block, int], total: int
) -> dict[str, float]:
  """Removed parameters (count, share of the model, share of its blocks) and blocks by kind."""
  gone = sum(sizes[tuple(b)] for b in removed)
  return {
    'removed_params': float(gone),
    'removed_frac': gone / total,
    'removed_block_frac': gone / sum(sizes.values()),
    'mha_removed': float(sum(k == 'mha' for _, k in removed)),
    'mlp_removed': float(sum(k == 'mlp' for _, k in removed)),
  }


def save_pruned(
  config: ml_collections.ConfigDict,
  model,
  tok,
  removed: list[models.Block],
  directory: pathlib.Path,
) -> None:
  """The structurally pruned model as a run common.models.spec can restore."""
  small = models.remove(model, removed)
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
  spec.write(directory, small.cfg, tokenizer=config.model.pretrained or tok)
  with ckpt_lib.Checkpointer(directory / 'checkpoints', async_save=False) as ckpt:
    ckpt.save(0, {'model': nnx.state(small)})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_loop.FitResult:
  input_pipeline.check_config(config)  # before the run creates the workdir
  with train_loop.Run(config, workdir) as run:
    if run.finished:
      return train_loop.FitResult.of_finished(run)
    mesh, rules = run.mesh, run.rules
    model, tok = models.load(config, mesh, rules)
    num_layers = model.cfg.num_layers
    method = search.from_config(config, num_layers)
    limit = max_steps(method, num_layers, config.prune.block_type)
    if run.num_steps > limit:
      raise config_lib.ConfigError(
        f'train.num_steps={run.num_steps}: {config.prune.method} can remove at most {limit} '
        f'{method.unit}s of this {num_layers}-layer model'
      )
    data = input_pipeline.make_data(config, tok)
    scorer = losses.CalibrationScorer(
      model,
      data.calibration,
      batch_size=config.calib.batch_size,
      mesh=mesh,
      rules=rules,
      prefix_cache=config.prune.prefix_cache,
    )
    sizes, total = models.block_params(model), models.num_params(model)
    memo_key = evaluate.fingerprint(
      model, data, batch_size=config.eval.batch_size, mesh=mesh, rules=rules
    )
    metrics_lib.log(
      '%s (%s) on a %d-layer model (%d parameters, %d in blocks); %d calibration windows of %d '
      'tokens; up to %d steps',
      config.prune.method,
      config.prune.block_type,
      num_layers,
      total,
      sum(sizes.values()),
      len(data.calibration),
      config.calib.seq_len,
      run.num_steps,
    )

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = {'mask': jax.ShapeDtypeStruct((num_layers, 2), jnp.int32, sharding=replicated)}
    state_spec = train_loop.ShardedState(None, abstract, {'mask': replicated})

    def init():
      return {'mask': jax.device_put(np.ones((num_layers, 2), np.int32), replicated)}

    start, state, extra, meta = run.restore_or_init(state_spec, init)
    extra = extra or {}
    removed = [(int(layer), str(kind)) for layer, kind in extra.get('removed', [])]
    method.restore(extra.get('method', {}))
    mask = np.asarray(jax.device_get(state['mask']), bool)
    if not np.array_equal(mask, models.mask_of(removed, num_layers)):
      raise ckpt_lib.CheckpointError('checkpointed mask and removal order disagree')
    last_train, last_eval = dict(meta.get('train', {})), dict(meta.get('eval', {}))
    evals_done = int(extra.get('evals', 0))

    def eval_now(step, final=False):
      nonlocal evals_done
      every = config.eval.mc_every
      with_mc = final or (every > 0 and evals_done % every == 0)
      evals_done += 1
      m = models.mask_of(removed, num_layers)

      def fn():
        with jax.set_mesh(mesh), sharding.axis_rules(rules):
          out = evaluate.evaluate_memo(
            memo_key,
            model,
            data,
            m,
            batch_size=config.eval.batch_size,
            mesh=mesh,
            rules=rules,
            with_mc=with_mc,
          )
        return {**out, **removal_metrics(removed, sizes, total)}

      return run.evaluate(step, fn)

    def save(step):
      run.save(
        step,
        {'mask': jax.device_put(models.mask_of(removed, num_layers).astype(np.int32), replicated)},
        extra={'removed': removed, 'method': method.state(), 'evals': evals_done},
        meta={'train': last_train, 'eval': last_eval},
      )

    if start == 0 and config.train.eval_at_start:
      last_eval = eval_now(0)
    for step in range(start + 1, run.num_steps + 1):
      s = method.step(removed, scorer)
      removed.extend(s.blocks)
      run.check_finite(step, s.loss)
      last_train = {
        'loss': s.loss,
        'perplexity': float(np.exp(s.loss)),
        'removed': '+'.join(models.block_name(b) for b in s.blocks),
        'layer': float(s.blocks[0][0]),
        'candidates': float(s.candidates),
        **removal_metrics(removed, sizes, total),
      }
      run.write(step, 'train', last_train)
      metrics_lib.log(
        'step %d/%d: removed %s, calibration perplexity %.4f, %.1f%% of the parameters removed',
        step,
        run.num_steps,
        last_train['removed'],
        last_train['perplexity'],
        100 * last_train['removed_frac'],
      )
      if run.should_eval(step):
        last_eval = eval_now(step, final=step == run.num_steps)
      if run.should_save(step):
        save(step)
      run.end_step(step, lambda step=step: save(step))

    if jax.process_index() == 0:
      metrics_lib.write_json(
        run.workdir / 'removed.json', [[layer, kind] for layer, kind in removed]
      )
    if config.prune.save_model:
      save_pruned(config, model, tok, removed, run.workdir / 'pruned')
    results = run.finish(last_train, last_eval)
  return train_loop.FitResult(run.num_steps, None, None, results['train'], results['eval'])


def removed_order(workdir: str | pathlib.Path) -> list[models.Block]:
  """The removal order a finished run wrote (WORKDIR/removed.json)."""
  rows = json.loads((pathlib.Path(workdir) / 'removed.json').read_text())
  return [(int(layer), str(kind)) for layer, kind in rows]
