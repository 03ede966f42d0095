"""Decoder-only LM pretraining: the template every paper's train.py follows.

`train_and_evaluate(config, workdir)` wires the shared pieces: model (models.py: common.models
.decoder), data (input_pipeline.py: real text by default, or the procedural Markov language), loss
(losses.py: common.losses' next-token cross-entropy), the optimizer (common.optim: clipped AdamW,
warm-up + cosine to optimizer.final_lr_frac), evaluation (evaluate.py) and the standard loop
(common.train_loop.fit) with checkpointing, metrics and resume.

Its claim: the held-out loss per token is below that of the unigram baseline (token frequencies of
the train split, add-one smoothed) on the same held-out tokens; every evaluation reports both, as
nats/token and, for text, bits per UTF-8 byte. On the Markov language it also reports the exact
optimum (the language's entropy rate) that no model can beat.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from common import optim
from common import train_loop
from common.models import spec
from projects.lm_pretrain import evaluate
from projects.lm_pretrain import input_pipeline
from projects.lm_pretrain import losses
from projects.lm_pretrain import models


def create_state_fn(config: ml_collections.ConfigDict) -> Callable[[], train_loop.TrainState]:
  """fit's create_state: the seeded decoder and the run's optimizer as one TrainState."""
  tx = optim.make_optimizer(config.optimizer, config.train.num_steps)
  return lambda: train_loop.TrainState(models.create_model(config), tx)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_loop.FitResult:
  input_pipeline.check_config(config)  # before the run creates the workdir
  with train_loop.Run(config, workdir) as run:
    text = config.data.source != input_pipeline.MARKOV  # the Markov language has no text
    tok = {'file': input_pipeline.TOKENIZER_FILE, 'eos': input_pipeline.EOS} if text else None
    spec.write(  # model.json: how common.export / generate --workdir rebuild the model
      run.workdir, models.model_config(config), tokenizer=tok, context_length=config.data.seq_len
    )
    if run.finished:
      return train_loop.FitResult.of_finished(run)
    d = input_pipeline.make_data(config, run.workdir)
    return train_loop.fit(
      run,
      create_state=create_state_fn(config),
      loss_fn=losses.loss_fn,
      train_iter=input_pipeline.train_iterator(config, d),
      eval_fn=evaluate.make_eval_fn(config, run.mesh, run.rules, d),
      learning_rate=optim.learning_rate(config.optimizer, config.train.num_steps),
    )
