"""FusionRoute training: stage 1 (SFT + routing, Eq. 2) then stage 2 (mixed SFT + CDPO, Alg. 1).

`train_and_evaluate(config, workdir)` runs the two stages as two `common.train_loop.Run`s:

  WORKDIR/stage1/   stage 1: config.stage1.num_steps of L_LM + lambda L_expert on balanced SFT rows
                    (its own config.json, metrics.jsonl, checkpoints and results.json; its final
                    evaluation is the paper's "SFT-only" ablation);
  WORKDIR/          stage 2: train.num_steps of Algorithm 1's mixed batches, started from stage 1's
                    final parameters (fit's `initial_state`: restore_params of stage 1's newest
                    checkpoint, a fresh optimizer), CDPO's reference log-probs computed once from
                    the stage-1 router (common.preference.reference, cached under
                    WORKDIR/reference).

Why two runs rather than one with a stage schedule: CDPO's reference is the stage-1 router, so its
log-probs of the pairs can only be computed once stage 1 has finished; as a separate run, stage 1
ends with a checkpoint that stage 2 initialises from (the brief's "stage 2 init_from stage 1"),
each stage keeps the launch contract (resume, SIGTERM, results.json) and the reference is scored
once, not carried as a frozen copy of the router in every step's state. Re-running the command
resumes whichever stage was interrupted (a finished stage 1 returns at once). Fault injection
(config.debug) applies to the stage config.debug.stage names (default 2, the run whose metrics the
invariant claims compare).

The model (models.FusionRoute) holds the router (the base LM every expert was fine-tuned from, plus
a fresh routing head seeded by config.seed) and the frozen experts (experts.py: trained once and
cached). `config.method='finetuned'` trains the paper's fine-tuned baseline instead: the same
stages with routing off (L_LM, then SFT + plain DPO), evaluated as the router LM alone.

config.experts.source picks the experts and their data: 'tiny' (the smoke's procedural domains,
experts.py and input_pipeline.py) or 'smollm2' (SmolLM2-135M-Instruct and its merged LoRA experts
on reasoning-gym families, smollm2.py); the stages, losses and evaluation are the same code.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import pathlib

from flax import nnx
import jax
import ml_collections

from common import checkpoint as ckpt_lib
from common import config as config_lib
from common import metrics as metrics_lib
from common import optim
from common import sharding
from common import train_loop
from common.models import decoder
from common.preference import reference
from projects.fusionroute import evaluate
from projects.fusionroute import experts as experts_lib
from projects.fusionroute import input_pipeline
from projects.fusionroute import losses
from projects.fusionroute import models
from projects.fusionroute import smollm2 as sm

METHODS = ('fusionroute', 'finetuned')
SOURCES = ('tiny', sm.SOURCE)
STAGE1_DIR = 'stage1'
BASELINES_FILE = 'baselines.json'


def domains(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The evaluation domains; expert i is domain i's."""
  return sm.DOMAINS if sm.is_source(config) else input_pipeline.DOMAINS


def expert_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Expert i's name, what router.init may name besides 'base'. The tiny experts are named by
  their domains; SmolLM2's third expert is SmolLM2 itself ('general'), not a 'logic' model."""
  return sm.EXPERTS if sm.is_source(config) else input_pipeline.DOMAINS


def check_config(config: ml_collections.ConfigDict) -> None:
  if config.experts.source not in SOURCES:
    raise config_lib.ConfigError(
      f'experts.source={config.experts.source!r} is not one of {SOURCES}'
    )
  input_pipeline.check_config(config)
  problems = []
  if config.method not in METHODS:
    problems.append(f'method={config.method!r} is not one of {METHODS}')
  inits = ('base', *expert_names(config))
  if config.router.init not in inits:
    problems.append(f'router.init={config.router.init!r} is not one of {inits}')
  if not sm.is_source(config) and len(config.experts.steps) != len(input_pipeline.DOMAINS):
    problems.append(
      f'experts.steps has {len(config.experts.steps)} entries; one per domain '
      f'{input_pipeline.DOMAINS} is needed'
    )
  if config.stage1.num_steps < 1:
    problems.append(f'stage1.num_steps={config.stage1.num_steps} must be >= 1')
  if config.debug.stage not in (1, 2):
    problems.append(f'debug.stage={config.debug.stage} must be 1 or 2')
  if problems:
    raise config_lib.ConfigError('; '.join(problems))
  if sm.is_source(config):
    sm.check_config(config)


# ---------------------------------------------------------------------------------------------------
# The model.


def load_experts(config: ml_collections.ConfigDict) -> experts_lib.Experts | sm.Experts:
  if sm.is_source(config):
    return sm.load_experts(config)
  return experts_lib.load(experts_lib.ExpertsConfig.from_config(config))


def decoder_config(config: ml_collections.ConfigDict) -> decoder.DecoderConfig:
  """The shapes of the router LM and of every expert."""
  if sm.is_source(config):
    return sm.decoder_config(config.dtype)
  return experts_lib.decoder_config(experts_lib.ExpertsConfig.from_config(config), config.dtype)


def build_model(
  config: ml_collections.ConfigDict, ex: experts_lib.Experts | sm.Experts | None
) -> models.FusionRoute:
  """The router (LM from config.router.init, fresh head seeded by config.seed) and the frozen
  experts; `ex=None` gives the same structure with random weights (abstract shapes, eval_shape)."""
  dcfg = decoder_config(config)
  n = len(domains(config))
  with sharding.unsharded():
    if ex is not None:  # built from the loaded weights (no random init drawn to be overwritten)
      init = (
        ex.base
        if config.router.init == 'base'
        else ex.experts[expert_names(config).index(config.router.init)]
      )
      lm = experts_lib.decoder_from(dcfg, init)
      experts = [experts_lib.decoder_from(dcfg, p) for p in ex.experts]
    else:
      lm = decoder.Decoder(dcfg, rngs=nnx.Rngs(0))
      experts = [decoder.Decoder(dcfg, rngs=nnx.Rngs(0)) for _ in range(n)]
    router = models.Router(lm, n, rngs=nnx.Rngs(config.seed))
    return models.FusionRoute(router, experts)


def sft_source(config: ml_collections.ConfigDict):
  """The router's SFT rows (both stages; stage 2 reads them from index 2**36 on)."""
  if sm.is_source(config):
    return sm.sft_source(config)
  return input_pipeline.SFTSource(input_pipeline.router_seed(config), config.data.flaw)


def preference_pairs(config: ml_collections.ConfigDict, ex) -> dict:
  if sm.is_source(config):
    return sm.preference_pairs(config, ex)
  return experts_lib.pairs(config, ex)


def create_state_fn(config: ml_collections.ConfigDict, num_steps: int, ex=None) -> Callable:
  tx = optim.make_optimizer(config.optimizer, num_steps)
  return lambda: train_loop.TrainState(build_model(config, ex), tx)


def host_state(config, num_steps, ex, spec: train_loop.ShardedState):
  """The real initial state (trained experts, router from its init) placed as `spec` says."""
  with sharding.unsharded():
    state = nnx.state(create_state_fn(config, num_steps, ex)())
  return jax.tree.map(lambda v, s: jax.device_put(v, s), state, spec.shardings)


# ---------------------------------------------------------------------------------------------------
# Stages.


FAULTS = ('kill_after_step', 'sigterm_after_step', 'sigint_after_step')


def _faults_for(c: ml_collections.ConfigDict, stage: int) -> ml_collections.ConfigDict:
  """c with its fault injection (config.debug) kept only if it targets `stage`."""
  if c.debug.stage != stage:
    for k in FAULTS:
      c.debug[k] = -1
  return c


def stage1_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Stage 1's run config: config with train.num_steps = stage1.num_steps, one evaluation at the
  end (the SFT-only ablation) and no outside checkpoint sources."""
  c = config.copy_and_resolve_references()
  c.train.num_steps = config.stage1.num_steps
  c.train.eval_every = config.stage1.num_steps
  c.train.eval_at_start = False
  c.checkpoint.resume_from = ''
  c.checkpoint.init_from = ''
  c = _faults_for(c, 1)
  c.lock()
  return c


def run_stage1(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, ex: experts_lib.Experts
) -> train_loop.FitResult:
  """Stage 1 in its own run (resumes, or returns at once when finished)."""
  c1 = stage1_config(config)
  with train_loop.Run(c1, workdir) as run:
    if run.finished:
      return train_loop.FitResult.of_finished(run)
    metrics_lib.log('stage 1 (SFT + routing, Eq. 2): %d steps in %s', run.num_steps, workdir)
    return train_loop.fit(
      run,
      create_state=create_state_fn(c1, run.num_steps),
      loss_fn=losses.stage1_loss_fn(c1),
      train_iter=input_pipeline.train_iterator(c1, sft_source(c1)),
      eval_fn=evaluate.make_eval_fn(c1, run.mesh, run.rules),
      initial_state=lambda spec: host_state(c1, run.num_steps, ex, spec),
      learning_rate=optim.learning_rate(c1.optimizer, run.num_steps),
    )


def stage1_model(stage1_dir: pathlib.Path, spec: train_loop.ShardedState) -> models.FusionRoute:
  """Stage 1's final model, restored onto spec's layout (its optimizer is not read)."""
  state = ckpt_lib.restore_params(stage1_dir / 'checkpoints', spec.state['model'])
  ts = nnx.merge(spec.graphdef, spec.state)  # abstract; only its model's structure is used
  nnx.update(ts.model, state)
  return ts.model


def reference_pairs(
  config: ml_collections.ConfigDict,
  run: train_loop.Run,
  model: models.FusionRoute,
  pairs: dict,
) -> dict:
  """The preference pairs with CDPO's reference log-probs: the stage-1 router LM's, computed once
  (common.preference.reference; cached under WORKDIR/reference, so a resumed stage 2 reads them)."""
  with jax.set_mesh(run.mesh), sharding.axis_rules(run.rules):
    ref = reference.reference_logps(
      model.router.lm,
      pairs,
      batch_size=config.data.batch_size,
      directory=run.workdir / 'reference',
      mesh=run.mesh,
      rules=run.rules,
    )
  metrics_lib.log(
    'CDPO reference: %d pairs (%d of the planted flaw), %s',
    len(pairs['chosen']),
    int(pairs['flaw'].sum()),
    'read from its cache' if ref.hit else 'scored by the stage-1 router',
  )
  return reference.with_reference(pairs, ref)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_loop.FitResult:
  check_config(config)  # before a run creates the workdir
  given = config  # stage 1's run config derives from it (with its own fault injection)
  config = _faults_for(config.copy_and_resolve_references(), 2)
  config.lock()
  with train_loop.Run(config, workdir) as run:
    if run.finished:
      return train_loop.FitResult.of_finished(run)
    ex = load_experts(config)
    # The experts' answers to the pair prompts (cached on disk) before stage 1, so that the host
    # copies of the experts can go before stage 2 (the SmolLM2 arm's are 1.6 GB).
    pairs = preference_pairs(config, ex)
    run_stage1(given, run.workdir / STAGE1_DIR, ex)
    del ex
    num_steps = run.num_steps
    create = create_state_fn(config, num_steps)
    spec = train_loop.abstract_state(create, run.mesh, run.rules)
    with jax.set_mesh(run.mesh):
      stage1 = stage1_model(run.workdir / STAGE1_DIR, spec)
    pairs = reference_pairs(config, run, stage1, pairs)

    def initial_state(spec):
      # Stage 1's model and a fresh optimizer (zero moments, step 0), placed as `spec` says; the
      # optimizer is initialised on the stage-1 parameters directly rather than by compiling and
      # running a random initialisation of the whole state only to replace its model.
      with sharding.unsharded():
        state = nnx.state(
          train_loop.TrainState(stage1, optim.make_optimizer(config.optimizer, num_steps))
        )
      return jax.tree.map(lambda v, s: jax.device_put(v, s), state, spec.shardings)

    metrics_lib.log('stage 2 (SFT + CDPO mix, Algorithm 1): %d steps', num_steps)
    return train_loop.fit(
      run,
      create_state=create,
      loss_fn=losses.stage2_loss_fn(config),
      train_iter=input_pipeline.mix_iterator(config, pairs, sft_source(config)),
      eval_fn=evaluate.make_eval_fn(config, run.mesh, run.rules),
      initial_state=initial_state,
      learning_rate=optim.learning_rate(config.optimizer, num_steps),
    )


def evaluate_baselines(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """The router-free baselines (evaluate.baselines) on this config's experts and eval set; written
  to WORKDIR/baselines.json and read back from there when present."""
  check_config(config)
  path = pathlib.Path(workdir) / BASELINES_FILE if workdir else None
  if path is not None and path.is_file():
    return json.loads(path.read_text())
  ex = load_experts(config)
  model = build_model(config, ex)
  out = evaluate.baselines(config, model, ex)
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics_lib.write_json(path, out)
  return out
