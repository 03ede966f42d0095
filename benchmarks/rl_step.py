"""RL step speed: rollout tokens/s and update tokens/s of common.rl's loop pieces.

    python -m benchmarks.rl_step [--d_model=64] [--layers=2] [--prompts=16] [--group=4] [--steps=12]

Rollout: `common.sampling.sampler.generate` with num_samples=G (one prefill per prompt, the KV
cache forked G ways, jit-ed decode), and the whole `common.rl.rollout.rollout` (plus host-side
rewards and batch building), on a random decoder with the smoke's shapes (vocab 21, prompt 12, up to 8 new tokens, no
stop token so every row decodes the full length); compared in the same run with the same samples
drawn from G tiled copies of each prompt (G prefills), the way a loop without forking samples.
Update: one clipped-surrogate optimizer step (`train_loop.make_train_step` on
`loop.make_loss_fn`) over the M*G sequences; tokens/s counts every input position.

Medians and ranges over --steps timed repetitions after 2 warm-up ones.

EAD (arXiv 2510.05251), in the same run and interleaved: the rollout with EAD's annealed
within-sequence temperature schedule (common.sampling.schedules.ead, with the behaviour log-probs
under the temperature used) against the fixed-temperature rollout, and the update with truncated
importance sampling (common.rl.loss.tis_weights, C = 2) against the update without; the ratios
(EAD / fixed time) are printed, 1.00 meaning no measurable cost.

Peer (--peer=tunix, the default): google-tunix's GRPO learner (requirements-peers.txt; installed
beside the pinned stack with `pip install --no-deps --target DIR -r requirements-peers.txt` and run
with PYTHONPATH=DIR), in the same process and interleaved with ours. Its model is tunix's own
Llama3 class with our decoder's shapes (d_model, layers, 4 heads of d_model/4, SwiGLU MLP 4 d_model,
tied embeddings, vocabulary 128 = our padded vocabulary): the parameter counts are asserted equal.
Prompts are the same token ids through a character tokenizer (no BOS, an EOS id that cannot be
sampled, so both sides decode every row to the full length), temperature 1, no top-p/top-k.
  rollout: `RLCluster.generate` (tunix's vanilla sampler on the M*G tiled prompts; it has no
           forking) and `GRPOLearner._generate_and_compute_advantage` (generation, rewards,
           GRPO advantages, its metrics) vs ours: generate (forked and tiled) and loop.rollout
           plus GRPO advantages;
  update:  `RLCluster.update_actor` on that TrainExample (one optimizer step of tunix's GRPO loss,
           beta 0, epsilon 0.2, sequence-mean-token-mean, Adam 1e-4) vs our train step with
           kl_coef 0, clip 0.2/0.2, loss_agg sequence-mean, Adam 1e-4.
OmniOPD (arXiv 2606.01476; --omniopd_steps=S > 0, off by default): S steps of the OmniOPD config
--omniopd_variant (smoke: the warmed-up tiny student, the scripted text teacher, edit similarity, or
MiniLM with --omniopd_similarity=embedding; smollm2: SmolLM2-135M-Instruct with the
Qwen2.5-Coder-0.5B text teacher, MiniLM similarity) in a temporary workdir, and the median and range
over steps 2..S (step 1 compiles) of each part of a step as the loop logs it: student rollout, the
K-way forks at the audited positions, the teacher calls, the similarity (the embedder), the frozen
base model's forward for the KL anchor, the update, and the step's total.
--omniopd_update_memory=1,8 compiles the OmniOPD update of --omniopd_variant (the audited chunks
scored through the rollout's KV cache, projects.omniopd.models.forked_logprobs), its peer in the same
run (the same loss over full prefix + chunk rows, rollout.completion_logprobs, in G row groups) and
the GRPO arm's update (the shared loop's), for each rl.update_groups value G, and prints XLA's
accounting of each working set (temp) beside the state and batch (arguments): what decides whether
an update fits, without allocating it. --omniopd_update_reps=R > 0 also runs each compiled update R
times, interleaved, on a batch of the config's shapes (random tokens, every audit and token used)
and prints the median time and its ratio to the peer's (and runs nothing else).
--omniopd_fork_reps=R > 0 times OmniOPD's forks on one real rollout of --omniopd_variant's student
(its prompts, its audits at the rollout's entropy peaks, K chunks of L tokens each): forked from the
rollout's own KV cache (projects.omniopd.train.fork_candidates) against its peer in the same run,
every prefix prefilled afresh and forked K ways (what the forks did before), R interleaved runs of
each after one compiling run, the median time, their ratio and the share of candidates whose tokens
agree (the same keys; they differ only where float rounding moves a draw) (and runs nothing else).
--trim_reps=R > 0 times the shared loop's GRPO update (the reference's scoring forward and one
optimizer step, common.rl.loop.make_loss_fn) on one real rollout of --omniopd_variant's GRPO arm
(mode=grpo: its prompts, G samples each) over the columns common.rl.rollout.trim_columns keeps
(rl.trim_multiple: the prompt columns that are padding in every row and the completion columns
past every row's end dropped) against the whole padded batch, R interleaved runs of each (in
alternating order) after one compiling run, the medians, their ratio and the largest log-prob difference (and runs nothing
else).

Work per step is equal up to two implementation choices the output states: tunix's training
forward runs over all P+N positions and takes logits at every one, ours over P+N-1 positions
with logits only at the N completion positions. Tokens/s count the same tokens on both sides
(M*G*N generated; M*G*(P+N-1) trained), so the tokens/s ratio is the inverse ratio of times.
"""

from __future__ import annotations

import importlib.metadata
import statistics
import time
from typing import Any

from absl import app
from absl import flags
from flax import nnx
import jax
import numpy as np
import optax

from common import sharding
from common import train_loop
from common.models import decoder
from common.rl import advantages
from common.rl import curriculum
from common.rl import loop
from common.rl import loss as loss_lib
from common.rl import rollout
from common.sampling import sampler as sampler_lib
from common.sampling import schedules

FLAGS = flags.FLAGS
flags.DEFINE_integer('d_model', 64, 'model width')
flags.DEFINE_integer('layers', 2, 'decoder layers')
flags.DEFINE_integer('prompts', 16, 'prompts per step (M)')
flags.DEFINE_integer('group', 4, 'samples per prompt (G)')
flags.DEFINE_integer('new_tokens', 8, 'generated tokens per sample')
flags.DEFINE_integer('steps', 12, 'timed repetitions')
flags.DEFINE_enum('peer', 'tunix', ['tunix', 'none'], 'peer measured in the same run')
flags.DEFINE_integer('omniopd_steps', 0, 'OmniOPD smoke steps to time (0: skip)')
flags.DEFINE_enum('omniopd_similarity', None, ['exact', 'edit', 'embedding'], 'chunk similarity')
flags.DEFINE_enum('omniopd_variant', 'smoke', ['smoke', 'smollm2'], 'OmniOPD config variant')
flags.DEFINE_list('omniopd_update_memory', [], 'rl.update_groups values to compile and size')
flags.DEFINE_integer('omniopd_update_reps', 0, 'timed runs of each compiled OmniOPD update')
flags.DEFINE_integer('omniopd_fork_reps', 0, 'timed runs of OmniOPD forks, cached vs afresh')
flags.DEFINE_integer('trim_reps', 0, 'timed runs of the GRPO update, trimmed vs whole batch')

VOCAB, PROMPT_LEN = 21, 12


def _model():
  cfg = decoder.DecoderConfig(
    vocab_size=VOCAB,
    d_model=FLAGS.d_model,
    num_layers=FLAGS.layers,
    num_heads=4,
    num_kv_heads=4,
    head_dim=FLAGS.d_model // 4,
    mlp_dim=4 * FLAGS.d_model,
  )
  with sharding.unsharded():
    return decoder.Decoder(cfg, rngs=nnx.Rngs(0))


def _timed(fns, reps: int) -> list[list[float]]:
  """Seconds per call of each function, calls interleaved (a, b, c, a, b, c, ...) so that a
  change in the machine's load hits every candidate alike."""
  for _ in range(2):
    for fn in fns:
      fn()
  out = [[] for _ in fns]
  for _ in range(reps):
    for i, fn in enumerate(fns):
      t0 = time.perf_counter()
      fn()
      out[i].append(time.perf_counter() - t0)
  return out


class _CharTokenizer:
  """Token id t <-> one character, for tunix's text interface; bos_id 0 means no BOS is added and
  the EOS id is outside the vocabulary, so no row stops early."""

  OFFSET = 0x100

  def encode(self, text, **kwargs):
    del kwargs
    return [ord(c) - self.OFFSET for c in text]

  def decode(self, ids, **kwargs):
    del kwargs
    return ''.join(chr(self.OFFSET + int(i)) for i in ids)

  def bos_id(self):
    return 0

  def eos_id(self):
    return 10**6

  def pad_id(self):
    return 0


class _TunixPeer:
  """tunix's GRPO learner on a tunix Llama3 with our decoder's shapes (see the module docstring)."""

  def __init__(self, prompt_ids: list[list[int]], ours_params: int, padded_vocab: int):
    # Imported here: tunix is a peer-only package, and importing it sets flax's
    # flax_always_shard_variable=False process-wide (our models are built before, with
    # sharding.unsharded(), so nothing of ours changes).
    from tunix.models.llama3 import model as tunix_llama  # noqa: PLC0415
    from tunix.rl import rl_cluster  # noqa: PLC0415
    from tunix.rl.grpo import grpo_learner  # noqa: PLC0415
    from tunix.rl.rollout import base_rollout  # noqa: PLC0415

    m, g, n = FLAGS.prompts, FLAGS.group, FLAGS.new_tokens
    cfg = tunix_llama.ModelConfig(
      num_layers=FLAGS.layers,
      vocab_size=padded_vocab,
      embed_dim=FLAGS.d_model,
      hidden_dim=4 * FLAGS.d_model,
      num_heads=4,
      head_dim=FLAGS.d_model // 4,
      num_kv_heads=4,
      rope_theta=10_000,
      norm_eps=1e-6,
      weight_tying=True,
    )
    auto = (jax.sharding.AxisType.Auto,) * 2  # tunix's gathers fail under explicit axes
    self.mesh = jax.make_mesh((1, 1), ('fsdp', 'tp'), axis_types=auto)
    with jax.set_mesh(self.mesh):
      actor = tunix_llama.Llama3(cfg, rngs=nnx.Rngs(0))
      reference = tunix_llama.Llama3(cfg, rngs=nnx.Rngs(0))
    self.params = sum(x.size for x in jax.tree.leaves(nnx.state(actor, nnx.Param)))
    if self.params != ours_params:
      raise AssertionError(f'tunix model has {self.params} parameters, ours {ours_params}')
    training = rl_cluster.RLTrainingConfig(
      actor_optimizer=optax.adam(1e-4),
      eval_every_n_steps=10**9,
      max_steps=None,
      mini_batch_size=m,
      train_micro_batch_size=m,
      rollout_micro_batch_size=m,
      compute_logps_micro_batch_size=m,
      pbar_description=None,
    )
    rollout = base_rollout.RolloutConfig(
      max_tokens_to_generate=n,
      max_prompt_length=PROMPT_LEN,
      kv_cache_size=PROMPT_LEN + n,
      temperature=1.0,
      top_p=None,
      top_k=None,
    )
    roles = (rl_cluster.Role.ACTOR, rl_cluster.Role.REFERENCE, rl_cluster.Role.ROLLOUT)
    self.cluster = rl_cluster.RLCluster(
      actor=actor,
      reference=reference,
      tokenizer=_CharTokenizer(),
      cluster_config=rl_cluster.ClusterConfig(
        role_to_mesh={r: self.mesh for r in roles},
        rollout_engine='vanilla',
        offload_to_cpu=False,
        training_config=training,
        rollout_config=rollout,
      ),
    )
    self.learner = grpo_learner.GRPOLearner(
      rl_cluster=self.cluster,
      algo_config=grpo_learner.GRPOConfig(num_generations=g, num_iterations=1, beta=0.0),
      reward_fns=lambda prompts, completions, **kw: [
        float(len(c) > 0 and (ord(c[0]) - _CharTokenizer.OFFSET) % 2 == 0) for c in completions
      ],
    )
    tok = _CharTokenizer()
    self.prompts = [tok.decode(p) for p in prompt_ids for _ in range(g)]  # G tiled copies
    self.example = self.rollout()

  def generate(self):
    out = self.cluster.generate(prompts=self.prompts, micro_batch_size=len(self.prompts))
    return jax.block_until_ready(out.tokens)

  def rollout(self):
    ex = self.learner._generate_and_compute_advantage({'prompts': list(self.prompts)})  # noqa: SLF001
    return jax.block_until_ready(ex)

  def update(self):
    before = self.cluster.actor_trainer.train_steps
    self.cluster.update_actor([self.example], None)
    jax.block_until_ready(nnx.state(self.cluster.actor_trainer.model, nnx.Param))
    if self.cluster.actor_trainer.train_steps != before + 1:
      raise AssertionError('tunix update_actor did not take exactly one optimizer step')


def _fmt(name: str, seconds: list[float], tokens: int) -> str:
  rates = sorted(tokens / s for s in seconds)
  return (
    f'{name:<28} {statistics.median(seconds) * 1e3:8.1f} ms '
    f'({min(seconds) * 1e3:.1f}-{max(seconds) * 1e3:.1f})  '
    f'{statistics.median(rates):10.0f} tok/s ({rates[0]:.0f}-{rates[-1]:.0f})'
  )


def main(argv):
  del argv
  m, g, n = FLAGS.prompts, FLAGS.group, FLAGS.new_tokens
  rng = np.random.default_rng(0)
  prompts = [
    curriculum.Prompt(uid=i, tokens=tuple(rng.integers(3, VOCAB, size=8).tolist()), payload=None)
    for i in range(m)
  ]
  rl = loop.rl_config()
  rl.update(
    group_size=g,
    prompts_per_step=m,
    prompt_len=PROMPT_LEN,
    max_new_tokens=n,
    kl_coef=0.0,  # as the peer's beta=0: no reference term
    loss_agg='sequence-mean',  # the peer's default sequence-mean-token-mean
  )
  setup = loop.RLSetup(
    create_model=_model,
    tx=optax.adam(1e-4),
    train_prompts=prompts,
    eval_prompts=[],
    rewards=rollout.VerifierRewards(lambda p, c: float(len(c) > 0 and c[0] % 2 == 0)),
    estimator=advantages.GRPO(),
    stop_tokens=(),
  )
  model = _model()
  key = jax.random.key(0)
  mesh = sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])

  def full_rollout():
    ro = rollout.rollout(
      model,
      prompts,
      key,
      sampling=loop.sampling_of(rl, setup),
      rewards=setup.rewards,
      num_samples=g,
      mesh=mesh,
      rules=sharding.DEFAULT_RULES,
    )
    mask = np.ones(ro.rewards.shape, bool)
    return ro, setup.estimator.advantages(ro.rewards, mask, prompts).values

  ead_schedule = schedules.ead(1.2, 0.1, decay=schedules.ead_decay(0, n / 2), warmup_tokens=1)

  def ead_rollout():
    ro = rollout.rollout(
      model,
      prompts,
      key,
      sampling=loop.sampling_of(rl, setup),
      rewards=setup.rewards,
      num_samples=g,
      mesh=mesh,
      rules=sharding.DEFAULT_RULES,
      temperature=ead_schedule,
      sample_logprobs=True,
    )
    mask = np.ones(ro.rewards.shape, bool)
    w = loss_lib.tis_weights(
      ro.batch['behaviour_logp'], ro.batch['sample_logp'], 2.0, ro.batch['completion_mask']
    )
    return ro, setup.estimator.advantages(ro.rewards, mask, prompts).values, np.asarray(w)

  p_tokens, p_mask = rollout.pad_prompts(prompts, PROMPT_LEN, 0)

  def forked():
    gen = sampler_lib.generate(
      model,
      p_tokens,
      p_mask,
      config=sampler_lib.SamplingConfig(max_new_tokens=n),
      key=sampler_lib.row_keys(key, np.arange(m)),
      num_samples=g,
      prompt_bucket=PROMPT_LEN,
    )
    return jax.block_until_ready(gen.tokens)

  tiled_prompts = [p for p in prompts for _ in range(g)]
  tokens, mask = rollout.pad_prompts(tiled_prompts, PROMPT_LEN, 0)
  keys = sampler_lib.fork_keys(
    sampler_lib.row_keys(key, np.arange(m)), g
  )  # the forked run's per-sample keys

  def tiled():
    gen = sampler_lib.generate(
      model,
      tokens,
      mask,
      config=sampler_lib.SamplingConfig(max_new_tokens=n),
      key=keys,
      prompt_bucket=PROMPT_LEN,
    )
    return jax.block_until_ready(gen.tokens)

  ro, _ = full_rollout()
  graphdef, state = nnx.split(train_loop.TrainState(_model(), setup.tx))
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step = train_loop.make_train_step(graphdef, loop.make_loss_fn(rl), shardings)
  batch = dict(ro.batch)
  batch['advantages'] = rng.normal(size=m * g).astype(np.float32)
  batch['old_logp'] = batch.pop('behaviour_logp')  # on-policy, as in the loop
  batch['ref_logp'] = batch['old_logp']
  holder = {'state': state, 'tis_state': jax.tree.map(lambda x: x.copy(), state)}
  tis_batch = dict(batch, tis_weight=ead_rollout()[2])

  def update():
    holder['state'], metrics = step(holder['state'], batch, jax.random.key(1))
    jax.block_until_ready(metrics['loss'])

  def update_tis():
    holder['tis_state'], metrics = step(holder['tis_state'], tis_batch, jax.random.key(1))
    jax.block_until_ready(metrics['loss'])

  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  padded_vocab = model.cfg.padded_vocab
  peer = None
  if FLAGS.peer == 'tunix':
    try:
      peer = _TunixPeer([list(p.tokens) for p in prompts], params, padded_vocab)
    except ImportError as e:
      print(f'tunix peer not measured: {type(e).__name__}: {e}')

  rollouts = [forked, tiled, lambda: full_rollout(), lambda: ead_rollout()]
  updates = [update, update_tis]
  if peer is not None:
    rollouts += [peer.generate, peer.rollout]
    updates += [peer.update]
  roll_s = _timed(rollouts, FLAGS.steps)
  upd_s = _timed(updates, FLAGS.steps)

  gen_tokens = m * g * n
  train_tokens = int(batch['inputs'].size)  # M*G*(P+N-1)
  print(
    f'd_model {FLAGS.d_model}, {FLAGS.layers} layers ({params:,} params), M={m}, G={g}, '
    f'prompt {PROMPT_LEN} (8 real tokens), {n} new tokens, vocab {VOCAB} padded to '
    f'{padded_vocab}; {jax.devices()[0].platform}, {FLAGS.steps} interleaved reps'
  )
  print(_fmt('generate, forked (ours)', roll_s[0], gen_tokens))
  print(_fmt('generate, G tiled prompts', roll_s[1], gen_tokens))
  print(f'forked / tiled speed: {statistics.median(roll_s[1]) / statistics.median(roll_s[0]):.2f}x')
  print(_fmt('rollout + GRPO adv', roll_s[2], gen_tokens))
  print(_fmt('update (fwd+bwd+adam)', upd_s[0], train_tokens))
  print(_fmt('rollout, EAD schedule + TIS', roll_s[3], gen_tokens))
  print(_fmt('update with TIS weights', upd_s[1], train_tokens))
  print(
    f'EAD / fixed temperature time: rollout {statistics.median(roll_s[3]) / statistics.median(roll_s[2]):.2f}x '
    f'(min {min(roll_s[3]) / min(roll_s[2]):.2f}x), update '
    f'{statistics.median(upd_s[1]) / statistics.median(upd_s[0]):.2f}x '
    f'(min {min(upd_s[1]) / min(upd_s[0]):.2f}x)'
  )
  if peer is None:
    return
  print(
    f'tunix {importlib.metadata.version("google-tunix")} peer: Llama3 class, {peer.params:,} '
    f'params (= ours), same M, G, prompt ids, lengths; generated tokens {gen_tokens} on both '
    f'sides; trained sequences {m * g} x {n} scored tokens on both (tunix forward over '
    f'{PROMPT_LEN + n} positions with logits at all, ours over {PROMPT_LEN + n - 1} with logits '
    f'at the {n} completion positions)'
  )
  print(_fmt('tunix RLCluster.generate', roll_s[4], gen_tokens))
  print(_fmt('tunix learner rollout+adv', roll_s[5], gen_tokens))
  print(_fmt('tunix update_actor', upd_s[2], train_tokens))
  # Medians and minima: on a shared machine the minimum is the least disturbed repetition.
  for name, stat in (('median', statistics.median), ('min', min)):
    print(f'ratios, ours / tunix speed (ratio of {name} times):')
    print(
      f'  generate: forked {stat(roll_s[4]) / stat(roll_s[0]):.2f}x, tiled '
      f'{stat(roll_s[4]) / stat(roll_s[1]):.2f}x'
    )
    print(f'  rollout + rewards + advantages: {stat(roll_s[5]) / stat(roll_s[2]):.2f}x')
    print(f'  update: {stat(upd_s[2]) / stat(upd_s[0]):.2f}x')


OMNIOPD_PARTS = ('rollout_s', 'fork_s', 'teacher_s', 'similarity_s', 'anchor_s', 'update_s')


def omniopd_split(
  steps: int, similarity: str | None, variant: str = 'smoke'
) -> dict[str, list[float]]:
  """{part: seconds per step, steps 2..S} of an OmniOPD run (see the module docstring); similarity
  None keeps the variant's own."""
  import pathlib  # noqa: PLC0415
  import tempfile  # noqa: PLC0415

  from common import config as config_lib  # noqa: PLC0415
  from common import metrics as metrics_lib  # noqa: PLC0415
  from projects.omniopd import train as omniopd_train  # noqa: PLC0415

  root = pathlib.Path(__file__).resolve().parents[1]
  cfg = config_lib.load(
    f'{root}/experiments/omniopd/configs/base.py:{variant},train.num_steps={steps},'
    f'train.log_every=1,train.eval_every=0,checkpoint.every_steps={steps}'
    + (f',omniopd.similarity={similarity}' if similarity else '')
  )
  mesh = sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])
  with tempfile.TemporaryDirectory() as d:
    omniopd_train.train_and_evaluate(cfg, pathlib.Path(d) / 'run', mesh=mesh)
    rows = [r for r in metrics_lib.read_jsonl(pathlib.Path(d) / 'run' / 'metrics.jsonl')]
  rows = [r for r in rows if r['split'] == 'train' and r['step'] > 1]
  out = {k: [float(r[k]) for r in rows] for k in OMNIOPD_PARTS}
  out['total'] = [sum(r[k] for k in OMNIOPD_PARTS) for r in rows]
  return out


def print_omniopd_split(steps: int, similarity: str | None, variant: str = 'smoke') -> None:
  split = omniopd_split(steps, similarity, variant)
  total = statistics.median(split['total'])
  how = f'{similarity} similarity' if similarity else "the config's similarity"
  print(f'OmniOPD step time split ({variant} config, {how}, steps 2..{steps}):')
  for k, v in split.items():
    med = statistics.median(v)
    print(
      f'  {k:<14} {med * 1e3:8.1f} ms ({min(v) * 1e3:.1f}-{max(v) * 1e3:.1f}) '
      f'{100 * med / total:5.1f}% of the median total'
    )


def omniopd_updates(variant: str, groups: int, reps: int = 0) -> list[tuple[str, dict[str, float]]]:
  """[(what, {temp, arguments: GiB, and with reps > 0 seconds: [per run]})] of the compiled updates
  of `variant`'s OmniOPD arm, its full-row peer and its GRPO arm (the shared loop's), from an
  abstract state and a batch of the config's shapes (every rollout audited at every slot, chunks
  and completions at full length); with reps > 0 each runs `reps` times, interleaved."""
  import pathlib  # noqa: PLC0415

  import jax.numpy as jnp  # noqa: PLC0415

  from common import config as config_lib  # noqa: PLC0415
  from common import optim  # noqa: PLC0415
  from common.rl import policies  # noqa: PLC0415
  from projects.omniopd import losses as omniopd_losses  # noqa: PLC0415
  from projects.omniopd import train as omniopd_train  # noqa: PLC0415

  root = pathlib.Path(__file__).resolve().parents[1]
  cfg = config_lib.load(
    f'{root}/experiments/omniopd/configs/base.py:{variant},rl.update_groups={groups}'
  )
  mesh = sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])
  rules = sharding.rules_of(cfg)
  dcfg = policies.description(cfg)['config']
  tx = optim.make_optimizer(cfg.optimizer, cfg.train.num_steps)
  rl, c = cfg.rl, cfg.omniopd
  m, n, p, chunk = rl.prompts_per_step, rl.max_new_tokens, rl.prompt_len, c.chunk_len
  rows, length = m * c.audits * c.num_candidates, p + n + chunk - 1
  grpo_rows = m * rl.group_size // rl.num_minibatches
  i32, f32 = jnp.int32, jnp.float32
  rng = np.random.default_rng(0)

  def rows_of(prefix, b, t, n_out, extra=()):
    out = {f'{prefix}{k}': ((b, t), i32) for k in _INPUTS}
    out[f'{prefix}targets'] = ((b, n_out), i32)
    for k in ('completion_mask', *extra):
      out[f'{prefix}{k}'] = ((b, n_out), f32)
    return out

  roll = rows_of('r_', m, p + n - 1, n, ('anchor_mask', 'base_logp'))
  forks = {f'c_{k}': ((rows, chunk), i32) for k in ('inputs', 'positions', 'targets')}
  forks.update(c_rows=((rows,), i32), c_cut=((rows,), i32), c_adv=((rows,), f32))
  forks['c_completion_mask'] = ((rows, chunk), f32)

  def full_rows_loss(model, batch, key):
    """The peer: each chunk's log-probs from a forward over its whole prefix + chunk row."""
    del key
    cand = {k[2:]: v for k, v in batch.items() if k.startswith('f_')}
    roll_ = {k[2:]: v for k, v in batch.items() if k.startswith('r_')}
    return omniopd_losses.omniopd_loss(
      rollout.completion_logprobs(model, cand, row_groups=groups),
      cand['adv'],
      cand['completion_mask'],
      rollout.completion_logprobs(model, roll_, row_groups=groups),
      roll_['base_logp'],
      roll_['anchor_mask'],
      pg_coef=c.pg_coef,
      anchor_coef=c.anchor_coef,
    )

  updates = {
    f'OmniOPD, forks through the rollout KV cache ({rows} chunk rows x {chunk} after '
    f'{m} rollout rows x {p + n - 1})': (omniopd_train.make_loss_fn(cfg), {**forks, **roll}),
    f'OmniOPD peer, full rows ({rows} rows x {length}, {m} rollout rows x {p + n - 1})': (
      full_rows_loss,
      {**rows_of('f_', rows, length, chunk), 'f_adv': ((rows,), f32), **roll},
    ),
    f'GRPO ({grpo_rows} rows x {p + n - 1})': (
      loop.make_loss_fn(rl),
      rows_of('', grpo_rows, p + n - 1, n, ('advantages', 'old_logp', 'ref_logp')),
    ),
  }

  def concrete(name, shape, dtype):
    """A batch every loss accepts: causal rows, everything real and used, forks cut mid-rollout."""
    if name.endswith('rows'):
      return rng.integers(0, m, size=shape).astype(np.int32)
    if name.endswith('cut'):
      return rng.integers(p, p + n - 1, size=shape).astype(np.int32)
    if name == 'c_positions':  # a chunk's positions continue its prefix
      return np.full(shape, p, np.int32) + np.arange(shape[1], dtype=np.int32)
    if name.endswith('positions'):
      return np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()
    if name.endswith('segment_ids'):
      return np.ones(shape, np.int32)
    if dtype == i32:
      return rng.integers(0, dcfg.vocab_size, size=shape).astype(np.int32)
    if name.endswith(('base_logp', 'old_logp', 'ref_logp')):
      return np.full(shape, -1.0, np.float32)
    if name.endswith(('adv', 'advantages')):
      return rng.normal(size=shape).astype(np.float32)
    return np.ones(shape, np.float32)

  out, compiled = [], []
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    spec = train_loop.abstract_state(
      lambda: train_loop.TrainState(decoder.Decoder(dcfg, rngs=nnx.Rngs(0)), tx), mesh, rules
    )
    for what, (loss_fn, shapes) in updates.items():
      step = train_loop.make_train_step(spec.graphdef, loss_fn, spec.shardings)
      abstract = {k: jax.ShapeDtypeStruct(*v) for k, v in shapes.items()}
      exe = step.lower(spec.state, abstract, jax.random.key(0)).compile()
      mem = exe.memory_analysis()
      gib = {
        'temp': mem.temp_size_in_bytes / 2**30,
        'arguments': mem.argument_size_in_bytes / 2**30,
      }
      out.append((what, gib))
      compiled.append((exe, {k: concrete(k, *v) for k, v in shapes.items()}))
    if reps > 0:
      state = train_loop.init_state(
        lambda: train_loop.TrainState(decoder.Decoder(dcfg, rngs=nnx.Rngs(0)), tx), mesh, rules
      ).state
      for gib in (g for _, g in out):
        gib['seconds'] = []
      for _ in range(reps):
        for (exe, batch), (_, gib) in zip(compiled, out, strict=True):
          t0 = time.perf_counter()
          state, _ = jax.block_until_ready(exe(state, batch, jax.random.key(0)))  # donated
          gib['seconds'].append(time.perf_counter() - t0)
  return out


_INPUTS = ('inputs', 'positions', 'segment_ids')


def omniopd_forks(variant: str, reps: int) -> dict[str, Any]:
  """{seconds: {ours, afresh: [per run]}, agree: share of equal candidate rows, slots, forks,
  prefix_tokens} for `variant`'s forks at one real rollout's entropy peaks (module docstring)."""
  import pathlib  # noqa: PLC0415

  from common import config as config_lib  # noqa: PLC0415
  from projects.omniopd import input_pipeline as omniopd_input  # noqa: PLC0415
  from projects.omniopd import losses as omniopd_losses  # noqa: PLC0415
  from projects.omniopd import models as omniopd_models  # noqa: PLC0415
  from projects.omniopd import train as omniopd_train  # noqa: PLC0415

  root = pathlib.Path(__file__).resolve().parents[1]
  cfg = config_lib.load(f'{root}/experiments/omniopd/configs/base.py:{variant}')
  c, rl = cfg.omniopd, cfg.rl
  mesh = sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])
  rules = sharding.rules_of(cfg)
  task = omniopd_input.make_task(cfg)
  sampling = omniopd_train.sampling_of(cfg, task)
  prompts = task.train[: rl.prompts_per_step]
  m, n, k = len(prompts), sampling.max_new_tokens, c.num_candidates
  slots = m * c.audits
  key = train_loop.step_key(cfg.seed, 1, 'fork')
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    student = omniopd_models.create_policy(cfg, mesh, rules)()
    ro = rollout.rollout(
      student,
      prompts,
      train_loop.step_key(cfg.seed, 1, 'rollout'),
      sampling=sampling,
      rewards=task.verifier(),
      num_samples=1,
      mesh=mesh,
      rules=rules,
      return_cache=True,
    )
    peaks = omniopd_losses.peak_entropy_positions(ro.entropies, ro.lengths, c.audits, c.min_entropy)
    pairs = [(b, t) for b in range(m) for t in peaks[b]]
    ids = np.arange(slots) + 1
    prefixes = [list(prompts[b].tokens) + ro.completion[b, :t].tolist() for b, t in pairs]
    prefixes += [list(prompts[0].tokens)] * (slots - len(pairs))
    toks, mask = sampler_lib.pad_prompts(
      prefixes, side='left', pad_id=sampling.pad_id, length=sampling.prompt_len + n
    )
    config = sampler_lib.SamplingConfig(
      max_new_tokens=c.chunk_len,
      temperature=sampling.temperature,
      stop_tokens=tuple(sampling.stop_tokens),
      pad_id=sampling.pad_id,
    )

    def ours():
      return omniopd_train.fork_candidates(
        student,
        ro,
        pairs,
        ids,
        key,
        slots=slots,
        num_candidates=k,
        chunk_len=c.chunk_len,
        sampling=sampling,
        mesh=mesh,
        rules=rules,
      )[0]

    def afresh():
      gen = sampler_lib.generate(
        student,
        toks,
        mask,
        config=config,
        key=sampler_lib.row_keys(key, ids),
        num_samples=k,
        prompt_bucket=toks.shape[1],
      )
      return np.asarray(gen.tokens)

    fns = {'ours': ours, 'afresh': afresh}
    first = {name: fn() for name, fn in fns.items()}  # compiles
    seconds = {name: [] for name in fns}
    for _ in range(reps):
      for name, fn in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        seconds[name].append(time.perf_counter() - t0)
  agree = float(np.mean(np.all(first['ours'] == first['afresh'], axis=1)))
  return {
    'seconds': seconds,
    'agree': agree,
    'slots': slots,
    'forks': len(pairs),
    'prefix_tokens': int(mask.sum()),
  }


def print_omniopd_forks(variant: str, reps: int) -> None:
  r = omniopd_forks(variant, reps)
  print(
    f'OmniOPD forks ({variant} config: {r["slots"]} fork slots, {r["forks"]} at entropy peaks, '
    f'{r["prefix_tokens"]} prefix tokens; {reps} interleaved runs each):'
  )
  peer = statistics.median(r['seconds']['afresh'])
  for name, what in (('ours', 'from the rollout KV cache'), ('afresh', 'each prefix prefilled')):
    v = r['seconds'][name]
    print(
      f'  {what:<26} {statistics.median(v):8.3f} s ({min(v):.3f}-{max(v):.3f}) '
      f'{statistics.median(v) / peer:.3f}x'
    )
  print(f'  candidates with equal tokens: {100 * r["agree"]:.1f}%')


def trimmed_update(variant: str, reps: int) -> dict[str, Any]:
  """{seconds: {trimmed, whole: [per run]}, widths: {trimmed, whole}, logp_dev, real_tokens} of
  the shared loop's GRPO update (the reference's scoring forward + one optimizer step) on one real
  rollout of `variant`'s GRPO arm (its prompts, G samples each), over the columns
  rollout.trim_columns keeps (rl.trim_multiple) against the whole padded rectangle."""
  import pathlib  # noqa: PLC0415

  from common import config as config_lib  # noqa: PLC0415
  from common import optim  # noqa: PLC0415
  from projects.omniopd import input_pipeline as omniopd_input  # noqa: PLC0415
  from projects.omniopd import models as omniopd_models  # noqa: PLC0415
  from projects.omniopd import train as omniopd_train  # noqa: PLC0415

  root = pathlib.Path(__file__).resolve().parents[1]
  cfg = config_lib.load(f'{root}/experiments/omniopd/configs/base.py:{variant},mode=grpo')
  rl = cfg.rl
  mesh = sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])
  rules = sharding.rules_of(cfg)
  task = omniopd_input.make_task(cfg)
  sampling = omniopd_train.sampling_of(cfg, task)
  prompts = task.train[: rl.prompts_per_step]
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    create = omniopd_models.create_policy(cfg, mesh, rules)
    student = create()
    ro = rollout.rollout(
      student,
      prompts,
      train_loop.step_key(cfg.seed, 1, 'rollout'),
      sampling=sampling,
      rewards=task.verifier(),
      num_samples=rl.group_size,
      mesh=mesh,
      rules=rules,
    )
    adv = advantages.GRPO().advantages(ro.rewards, np.ones_like(ro.rewards, bool), ro.prompts)
    whole = dict(ro.batch, advantages=adv.values.reshape(-1).astype(np.float32))
    whole['old_logp'] = whole.pop('behaviour_logp')
    batches = {'trimmed': rollout.trim_columns(whole, rl.trim_multiple), 'whole': whole}
    ref_graphdef, ref_state = nnx.split(create())
    tx = optim.make_optimizer(cfg.optimizer, cfg.train.num_steps)
    graphdef, state = nnx.split(train_loop.TrainState(student, tx))
    shardings = sharding.state_shardings(state, mesh, rules)
    state = jax.device_put(state, shardings)
    step = train_loop.make_train_step(graphdef, loop.make_loss_fn(rl), shardings)

    def update(state, batch):
      batch = dict(batch)
      batch['ref_logp'] = rollout.score(
        ref_graphdef, ref_state, batch, train_state=False, mesh=mesh, rules=rules
      )
      rows = sharding.global_rows(batch, mesh, rules)
      return jax.block_until_ready(step(state, rows, jax.random.key(0)))[0]

    logp = {
      k: rollout.score(ref_graphdef, ref_state, b, train_state=False, mesh=mesh, rules=rules)
      for k, b in batches.items()
    }
    for b in batches.values():  # compiles
      state = update(state, b)
    seconds = {k: [] for k in batches}
    order = list(batches.items())
    for rep in range(reps):
      for k, b in order if rep % 2 == 0 else order[::-1]:  # each goes first every other run
        t0 = time.perf_counter()
        state = update(state, b)
        seconds[k].append(time.perf_counter() - t0)
  n = logp['trimmed'].shape[1]
  valid = whole['completion_mask'][:, :n] > 0
  dev = float(np.abs(logp['trimmed'] - logp['whole'][:, :n])[valid].max())
  return {
    'seconds': seconds,
    'widths': {k: b['inputs'].shape[1] for k, b in batches.items()},
    'rows': whole['inputs'].shape[0],
    'logp_dev': dev,
    'real_tokens': int(whole['segment_ids'].sum()),
  }


def print_trimmed_update(variant: str, reps: int) -> None:
  r = trimmed_update(variant, reps)
  w = r['widths']
  print(
    f'GRPO update of the {variant} OmniOPD config ({r["rows"]} rows of one real rollout, '
    f'{r["real_tokens"]} real input tokens; reference forward + optimizer step; {reps} '
    'interleaved runs each):'
  )
  peer = statistics.median(r['seconds']['whole'])
  for name in ('trimmed', 'whole'):
    v = r['seconds'][name]
    print(
      f'  {name:<8} {r["rows"]} x {w[name]:<4} {statistics.median(v):8.2f} s '
      f'({min(v):.2f}-{max(v):.2f}) {statistics.median(v) / peer:.3f}x'
    )
  print(f'  max |log-prob difference| over the completion tokens: {r["logp_dev"]:.2e}')


def _main_with_omniopd(argv):
  for g in FLAGS.omniopd_update_memory:
    updates = omniopd_updates(FLAGS.omniopd_variant, int(g), FLAGS.omniopd_update_reps)
    for what, r in updates:
      print(
        f'{what} update ({FLAGS.omniopd_variant}, rl.update_groups={g}): working set '
        f'{r["temp"]:.2f} GiB, state + batch {r["arguments"]:.2f} GiB'
      )
      if 'seconds' in r:
        med = statistics.median(r['seconds'])
        peer = statistics.median(updates[1][1]['seconds'])
        print(
          f'  run: {med:.2f} s ({min(r["seconds"]):.2f}-{max(r["seconds"]):.2f}, '
          f'{len(r["seconds"])} reps), {med / peer:.3f}x the full-row peer'
        )
  if FLAGS.omniopd_fork_reps > 0:
    print_omniopd_forks(FLAGS.omniopd_variant, FLAGS.omniopd_fork_reps)
  if FLAGS.trim_reps > 0:
    print_trimmed_update(FLAGS.omniopd_variant, FLAGS.trim_reps)
  if FLAGS.omniopd_update_memory or FLAGS.omniopd_fork_reps > 0 or FLAGS.trim_reps > 0:
    return
  if FLAGS.omniopd_steps > 0:
    print_omniopd_split(FLAGS.omniopd_steps, FLAGS.omniopd_similarity, FLAGS.omniopd_variant)
  main(argv)


if __name__ == '__main__':
  app.run(_main_with_omniopd)
