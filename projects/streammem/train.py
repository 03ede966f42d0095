"""StreamMem's run: a training-free streaming evaluation on the run skeleton (arXiv 2508.15717).

The paper trains nothing: its method is how the KV cache is filled and pruned while a stream is
prefilled. A run therefore loads a model (SmolLM2-135M-Instruct, or the cached smoke model) and
evaluates: step s of train.num_steps streams data.batch_size episodes (input_pipeline) under every
method and per-layer budget of the config and answers their questions (evaluate.evaluate_batch).
It still runs on `common.train_loop.Run`, so it has what every run has: a locked workdir,
config.json and run.json, metrics.jsonl (the running means every train.log_every steps, split
'eval'), checkpoints every checkpoint.every_steps steps holding the running sums (as JSON), resume
after a kill with the numbers of an uninterrupted run, SIGTERM handling, and results.json with the
final means ('train' holds the episode and question counts).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections

from common import metrics as metrics_lib
from common import optim
from common import train_loop
from projects.streammem import evaluate
from projects.streammem import input_pipeline
from projects.streammem import losses
from projects.streammem import models


def _progress_state(mesh) -> train_loop.ShardedState:
  """The checkpointed array state: only the step (the sums are JSON, `extra`)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = {'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
  return train_loop.ShardedState(None, abstract, {'step': replicated})


def train_video(config: ml_collections.ConfigDict, workdir: str) -> train_loop.FitResult:
  """The video run: trains the small video-language model (models.VideoLM) on short streams of
  real frames with scripted events (common.train_loop.fit: checkpoints, bitwise resume), then
  evaluates streaming at fixed budgets on 4-32x longer streams of a held-out video
  (evaluate.make_video_eval_fn, at the end and every train.eval_every steps)."""
  with train_loop.Run(config, workdir) as run:
    if run.finished:
      return train_loop.FitResult.of_finished(run)
    lang = models.video_language(config)
    tx = optim.make_optimizer(config.optimizer, config.train.num_steps)
    return train_loop.fit(
      run,
      create_state=lambda: train_loop.TrainState(models.create_video_lm(config), tx),
      loss_fn=losses.video_loss_fn,
      train_iter=input_pipeline.video_train_iterator(config, lang),
      eval_fn=evaluate.make_video_eval_fn(config, run.mesh, run.rules),
      learning_rate=optim.learning_rate(config.optimizer, config.train.num_steps),
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_loop.FitResult:
  input_pipeline.check_config(config)  # before the run creates the workdir
  if config.data.source == 'video':
    return train_video(config, workdir)
  with train_loop.Run(config, workdir) as run:
    if run.finished:
      return train_loop.FitResult.of_finished(run)
    model, tokenizer = models.create_model(config, run.mesh, run.rules)
    streamer = models.Streamer(model, mesh=run.mesh, rules=run.rules)
    episodes_at = input_pipeline.make_episodes(config, tokenizer)
    spec = _progress_state(run.mesh)

    def init():
      return {'step': jax.device_put(jnp.zeros((), jnp.int32), spec.shardings['step'])}

    start, state, extra, _ = run.restore_or_init(spec, init)
    totals = evaluate.Totals.from_json(extra)
    progress = metrics_lib.Progress(start, run.num_steps)
    questions = config.data.batch_size * config.data.facts_per_depth * 3

    def save(step):
      state = {'step': jax.device_put(jnp.asarray(step, jnp.int32), spec.shardings['step'])}
      run.save(step, state, extra=totals.to_json())

    metrics_lib.log(
      'steps %d-%d: %d episodes per step, %d methods x budgets %s; the first step compiles',
      start + 1,
      run.num_steps,
      config.data.batch_size,
      len(evaluate.methods_of(config)),
      evaluate.budgets_of(config),
    )
    for step in range(start + 1, run.num_steps + 1):
      t0 = time.perf_counter()
      episodes = episodes_at(step)
      evaluate.evaluate_batch(
        streamer, episodes, config, totals, train_loop.step_key(config.seed, step, 'press')
      )
      if step == start + 1:
        progress.compiled(start)
      if run.should_log(step):
        summary = totals.summary()
        run.write(step, 'eval', summary)
        shown = {k: round(v, 3) for k, v in summary.items() if k.endswith('/em')}
        run.log_progress(progress, step, shown)
        metrics_lib.log('step %d took %.1f s', step, time.perf_counter() - t0)
      if run.should_save(step):
        save(step)
      run.end_step(step, lambda step=step: save(step))
    train = {'episodes': float(run.num_steps * config.data.batch_size)}
    train['questions'] = float(run.num_steps * questions)
    results = run.finish(train, totals.summary())
    del state
  return train_loop.FitResult(run.num_steps, None, None, results['train'], results['eval'])


def summary_table(results_eval: dict[str, float], budgets, methods) -> list[list[str]]:
  """Rows (method, budget, em, em_early, em_middle, em_late, dloglik, kept) of a results.json
  'eval' dict, for reports and the README."""
  rows = []
  for m in methods:
    for b in [None] if m == evaluate.FULL else list(budgets):
      name = evaluate.label(m, b)
      if f'{name}/em' not in results_eval:
        continue
      r = results_eval
      cells = [m, '-' if b is None else str(b)]
      cells += [f'{r[f"{name}/em{s}"]:.3f}' for s in ('', '_early', '_middle', '_late')]
      cells += [f'{r[f"{name}/dloglik"]:+.3f}', str(int(r[f'{name}/kept']))]
      rows.append(cells)
  return rows
