"""OmniOPD (arXiv 2606.01476) and its baselines on the shared run skeleton: `train_and_evaluate`.

config.mode picks the arm; every arm starts from the same student, sees the same prompts per step
(common.rl.curriculum, shuffled by the seed), takes one optimizer step per training step with the
same optimizer, and is evaluated by the same greedy held-out accuracy and repetition-loop count
(projects/omniopd/evaluate.py):

  omniopd  One student rollout per prompt (common.rl.rollout; the sampler's per-token entropies),
           audits at its entropy peaks (losses.peak_entropy_positions); at each audited position t
           K candidate chunks of L tokens are forked from the rollout's own KV cache, cut after
           the prefix prompt + y_<t (models.fork_cache; sampler.generate(num_samples=K)); the teacher
           (models.TeacherClient: text in, text out, counted, timeouts and empty replies skipped)
           continues the prefix's text; candidate k scores s_k = sim(chunk_k, teacher chunk)
           (exact / edit / MiniLM embedding); advantages s_k - p with p the Dirichlet-smoothed
           acceptance rate; loss = policy gradient on the audited candidates' tokens + beta *
           KL(pi || pi_base) on the rollout tokens no successful audit covers.
  opd      White-box on-policy distillation: the same rollouts, reverse KL to a same-vocabulary
           teacher's next-token distribution at every rollout token (one teacher call per rollout).
  sft      SFT on teacher traces: the teacher's continuation of each prompt (asked once per prompt,
           kept in the checkpointed state), negative log-likelihood on the student's tokens of it.
  grpo     Self-exploratory RL without a teacher: the shared loop (common.rl.loop) with GRPO.

Logged per step (metrics.jsonl): the cumulative teacher calls and failures (timeouts, empty,
errors) and student tokens (sampled: rollouts and forks), the loss terms, rollout reward, audits
made and skipped, mean candidate score and smoothed acceptance, and the wall-time split (rollout,
forks, teacher, similarity, update). Keys are `train_loop.step_key(seed, step, purpose)` and fork
keys fold in (prompt uid, position), so a killed-and-resumed run replays the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
import json
import pathlib
import time
from typing import Any

from flax import nnx
import jax
import ml_collections
import numpy as np

from common import config as config_lib
from common import metrics as metrics_lib
from common import optim
from common import sharding
from common import train_loop
from common.models import loader
from common.models import spec
from common.rl import curriculum
from common.rl import loop
from common.rl import policies
from common.rl import rollout
from common.sampling import sampler as sampler_lib
from projects.omniopd import evaluate
from projects.omniopd import input_pipeline
from projects.omniopd import losses
from projects.omniopd import models

MODES = ('omniopd', 'opd', 'sft', 'grpo')
TEACHERS = ('scripted', 'lm', 'sft')
TIMING_KEYS = (
  'rollout_s',
  'fork_s',
  'teacher_s',
  'similarity_s',
  'anchor_s',
  'update_s',
  'steps_per_sec',
)


def check_config(config: ml_collections.ConfigDict, mesh=None, rules=None) -> None:
  """OmniOPD's keys, before the workdir exists."""
  del mesh, rules
  if config.mode not in MODES:
    raise config_lib.ConfigError(f'mode={config.mode!r}; expected one of {MODES}')
  losses.check_config(config.omniopd)
  kind = config.teacher.kind
  if kind not in TEACHERS:
    raise config_lib.ConfigError(f'teacher.kind={kind!r}; expected one of {TEACHERS}')
  if config.mode == 'opd' and kind not in ('scripted', 'sft'):
    raise config_lib.ConfigError(
      f'mode=opd needs a white-box teacher with the student vocabulary (teacher.kind=scripted or '
      f'sft); teacher.kind={kind!r} only returns text'
    )
  if kind == 'sft' and (config.model.kind != 'pretrained' or config.teacher.sft_steps < 1):
    raise config_lib.ConfigError(
      f'teacher.kind=sft fine-tunes the student model itself (the same vocabulary) for '
      f'teacher.sft_steps: it needs model.kind=pretrained and teacher.sft_steps >= 1; got '
      f'{config.model.kind!r}, {config.teacher.sft_steps}'
    )
  if config.mode == 'grpo' and config.rl.group_size < 2:
    raise config_lib.ConfigError('mode=grpo needs rl.group_size >= 2')


# ---------------------------------------------------------------------------------------------------
# Teachers and similarity.


def make_teacher(config: ml_collections.ConfigDict, task: input_pipeline.Task):
  t = config.teacher
  if t.kind == 'scripted':
    return models.ScriptedTeacher(task.answers(), accuracy=t.accuracy, eps=t.eps, seed=t.seed)
  if t.kind == 'sft':  # the student's own model after its SFT warm-up: the same vocabulary
    name, teacher_cls = config.model.name, models.WhiteBoxLMTeacher
    warmup = policies.PretrainedWarmup(steps=t.sft_steps)
    tmodel = policies.warm_pretrained(name, warmup, config.data.task_set, dtype=config.dtype)[0]
  else:
    name, teacher_cls = t.name, models.LMTeacher
    tmodel = loader.load_pretrained(name, dtype=config.dtype)[0]
  tok = loader.load_tokenizer(name)

  def render(prompt: str, prefix: str):
    text = tok.apply_chat_template([{'role': 'user', 'content': prompt}], True)
    return tok.encode(text + prefix, add_bos=False)

  stop = tuple(tok.stop_ids)
  # The sft arm asks for whole traces, the others for continuations of a prefix.
  whole = config.mode == 'sft' and t.trace_tokens > 0
  return teacher_cls(
    tmodel,
    render,
    tok.decode,
    max_new_tokens=t.trace_tokens if whole else t.max_new_tokens,
    stop_tokens=stop,
    pad_id=stop[0],
  )


def make_similarity(config: ml_collections.ConfigDict, embed=None):
  kind = config.omniopd.similarity
  if kind == 'embedding' and embed is None:
    from common import minilm  # noqa: PLC0415  (real weights: loaded only when asked for)

    embed = minilm.MiniLM().embed
  return losses.similarity_fn(kind, embed)


class CountingRewards:
  """The verifier as the GRPO arm's reward source, also counting the sampled training tokens
  (calls with the training group size; evaluation samples one response per prompt)."""

  def __init__(self, source: rollout.VerifierRewards, group_size: int):
    self.source, self.group_size, self.tokens = source, group_size, 0

  def score(self, prompts, completions, lengths, group_size):
    if group_size == self.group_size:
      self.tokens += int(np.sum(lengths))
    return self.source.score(prompts, completions, lengths, group_size)

  def state_dict(self):
    return {**self.source.state_dict(), 'student_tokens': self.tokens}

  def load_state_dict(self, state):
    self.source.load_state_dict(state)
    self.tokens = int(state.get('student_tokens', 0))

  def metrics(self):
    return {**self.source.metrics(), 'student_tokens': self.tokens, 'teacher_calls': 0}


# ---------------------------------------------------------------------------------------------------
# Loss functions (one jit-ed update each).


def _view(batch: dict, prefix: str) -> dict:
  return {k[len(prefix) :]: v for k, v in batch.items() if k.startswith(prefix)}


def make_loss_fn(config: ml_collections.ConfigDict) -> Callable:
  mode, c = config.mode, config.omniopd

  def omniopd(model, batch, key):
    del key
    forks, roll = _view(batch, 'c_'), _view(batch, 'r_')
    roll_logp, fork_logp = models.forked_logprobs(model, roll, forks)
    return losses.omniopd_loss(
      fork_logp,
      forks['adv'],
      forks['completion_mask'],
      roll_logp,
      roll['base_logp'],
      roll['anchor_mask'],
      pg_coef=c.pg_coef,
      anchor_coef=c.anchor_coef,
    )

  def opd(model, batch, key):
    del key
    n = batch['targets'].shape[1]
    h = model.hidden_states(
      batch['inputs'], positions=batch['positions'], segment_ids=batch['segment_ids']
    )
    logits = model.logits_from_hidden(h[:, -n:])
    kl = losses.reverse_kl(logits, batch['teacher_logp'], batch['completion_mask'])
    return kl, {'reverse_kl': kl}

  def sft(model, batch, key):
    del key
    nll = losses.sft_loss(rollout.completion_logprobs(model, batch), batch['completion_mask'])
    return nll, {'nll': nll}

  return {'omniopd': omniopd, 'opd': opd, 'sft': sft}[mode]


# ---------------------------------------------------------------------------------------------------
# The loop (omniopd, opd, sft).


@dataclasses.dataclass
class _Ctx:
  run: train_loop.Run
  task: input_pipeline.Task
  spec: train_loop.ShardedState
  base_graphdef: Any
  base_state: Any
  sampler: curriculum.Sampler
  sampling: rollout.Sampling
  rewards: rollout.VerifierRewards
  client: models.TeacherClient
  similarity: Callable | None
  train_step: Callable
  counters: dict  # student_tokens, traces (sft)

  @property
  def config(self):
    return self.run.config


def sampling_of(config, task) -> rollout.Sampling:
  return rollout.Sampling(
    prompt_len=config.rl.prompt_len,
    max_new_tokens=config.rl.max_new_tokens,
    temperature=config.rl.temperature,
    stop_tokens=task.stop,
    pad_id=task.pad,
  )


def _rollout(ctx: _Ctx, model, prompts, step: int) -> rollout.Rollout:
  return rollout.rollout(
    model,
    prompts,
    train_loop.step_key(ctx.config.seed, step, 'rollout'),
    sampling=ctx.sampling,
    rewards=ctx.rewards,
    num_samples=1,
    mesh=ctx.run.mesh,
    rules=ctx.run.rules,
  )


def fork_candidates(
  model,
  ro: rollout.Rollout,
  pairs: Sequence[tuple[int, int]],
  ids: np.ndarray,
  key: jax.Array,
  *,
  slots: int,
  num_candidates: int,
  chunk_len: int,
  sampling: rollout.Sampling,
  mesh,
  rules,
):
  """K candidate chunks of L tokens at each fork (row b, completion index t) of a rollout, forked
  from the rollout's own KV cache (`ro.cache`; `models.fork_points`, `models.fork_cache`): no
  prefix is prefilled again, each fork feeds its prefix's last token once and samples K chunks.
  (chunk tokens [slots*K, L], lengths [slots*K], done [slots*K]); rows b*K .. b*K+K-1 belong to
  fork slot b; slots past the pairs fork row 0 after its prompt.

  Row keys are fold_in(key, ids[a]) and sample k of slot a uses fold_in(that key, k)
  (`sampler.fork_keys`), so a candidate depends only on (key, its id, k), and equals sampling from
  its whole prefix afresh with those keys (to float rounding in the logits: the prefix's keys and
  values come from the rollout's decode steps instead of one prefill)."""
  if ro.cache is None:
    raise ValueError('fork_candidates needs the rollout cache: rollout.rollout(return_cache=True)')
  rows, cut, token, position = models.fork_points(ro.batch, pairs, sampling.prompt_len, slots)
  cache = models.fork_cache(ro.cache, rows, cut, position, extra=1 + chunk_len)
  keys = jax.random.key_data(sampler_lib.row_keys(key, np.asarray(ids, np.int64) % (2**31)))
  keys = jax.random.wrap_key_data(sharding.global_rows(np.asarray(keys), mesh, rules))
  gen = sampler_lib.generate(
    model,
    sharding.global_rows(token[:, None], mesh, rules),
    sharding.global_rows(np.ones((slots, 1), bool), mesh, rules),
    config=sampler_lib.SamplingConfig(
      max_new_tokens=chunk_len,
      temperature=sampling.temperature,
      stop_tokens=tuple(sampling.stop_tokens),
      pad_id=sampling.pad_id,
    ),
    key=keys,
    num_samples=num_candidates,
    cache=cache,
    prompt_bucket=1,
  )
  cand, clen, done = sharding.gather_rows((gen.tokens, gen.lengths, gen.done))
  return np.asarray(cand), np.asarray(clen), np.asarray(done)


@dataclasses.dataclass
class Audits:
  """One OmniOPD rollout with its audits: `pairs` [(row, t)], the number of fork slots (A >=
  len(pairs)), candidates [A*K, L] with lengths and done flags, and per audit a record
  {row, t, prefix, teacher (None: skipped), candidates, scores, advantages, acceptance}."""

  rollout: rollout.Rollout
  pairs: list[tuple[int, int]]
  slots: int
  candidates: np.ndarray
  lengths: np.ndarray
  done: np.ndarray
  records: list[dict]
  times: dict[str, float]


def audit(
  model,
  prompts,
  task: input_pipeline.Task,
  c: ml_collections.ConfigDict,
  *,
  rollout_key: jax.Array,
  fork_key: jax.Array,
  sampling: rollout.Sampling,
  rewards: rollout.RewardSource,
  client: models.TeacherClient,
  similarity: Callable,
  mesh,
  rules,
) -> Audits:
  """Rollout -> entropy peaks -> K forked chunks per peak -> teacher text -> scores -> advantages.

  Every rollout gets `c.audits` slots (one compiled fork program): slots without a peak fork the
  first prompt again under ids no real audit has, and their candidates are never used. The
  rollout keeps its KV cache until the forks have continued it."""
  m, n, k = len(prompts), sampling.max_new_tokens, c.num_candidates
  slots = m * c.audits
  times = {}
  t0 = time.perf_counter()
  ro = rollout.rollout(
    model,
    prompts,
    rollout_key,
    sampling=sampling,
    rewards=rewards,
    num_samples=1,
    mesh=mesh,
    rules=rules,
    return_cache=True,
  )
  times['rollout_s'] = time.perf_counter() - t0
  peaks = losses.peak_entropy_positions(ro.entropies, ro.lengths, c.audits, c.min_entropy)
  pairs = [(b, t) for b in range(m) for t in peaks[b]]
  ids = [prompts[b].uid * (n + 1) + t for b, t in pairs]
  ids += [2**31 - 1 - i for i in range(slots - len(pairs))]
  t0 = time.perf_counter()
  cand, clen, done = fork_candidates(
    model,
    ro,
    pairs,
    np.asarray(ids),
    fork_key,
    slots=slots,
    num_candidates=k,
    chunk_len=c.chunk_len,
    sampling=sampling,
    mesh=mesh,
    rules=rules,
  )
  ro = dataclasses.replace(ro, cache=None)  # the forks were its last reader
  times['fork_s'] = time.perf_counter() - t0
  requests = [(task.text(prompts[b]), task.decode(ro.completion[b, :t])) for b, t in pairs]
  t0 = time.perf_counter()
  replies = client.ask_many(requests)  # one batched call when the teacher batches
  times['teacher_s'] = time.perf_counter() - t0
  records, texts, refs, answered = [], [], [], []
  for i, ((b, t), (prompt, prefix), reply) in enumerate(zip(pairs, requests, replies, strict=True)):
    rec = {'row': b, 't': t, 'prompt': prompt, 'prefix': prefix, 'teacher': reply}
    records.append(rec)
    if reply is not None:
      rows = range(i * k, (i + 1) * k)
      rec['candidates'] = [task.decode(cand[r, : clen[r]]) for r in rows]
      rec['ended'] = [bool(done[r]) for r in rows]
      texts += rec['candidates']
      refs += [
        losses.teacher_chunk(reply, x, e)
        for x, e in zip(rec['candidates'], rec['ended'], strict=True)
      ]
      answered.append(rec)
  # Every answered audit's K candidates scored in one call (one embedder batch per step).
  t0 = time.perf_counter()
  scores = np.asarray(similarity(texts, refs), np.float64).reshape(len(answered), k)
  for rec, s in zip(answered, scores, strict=True):
    rec['advantages'], rec['acceptance'] = losses.chunk_advantages(
      s, c.alpha_accept, c.alpha_reject
    )
    rec['scores'] = s
  times['similarity_s'] = time.perf_counter() - t0
  return Audits(ro, pairs, slots, cand, clen, done, records, times)


def _omniopd_batch(ctx: _Ctx, model, prompts, step: int):
  c = ctx.config.omniopd
  k, chunk = c.num_candidates, c.chunk_len
  au = audit(
    model,
    prompts,
    ctx.task,
    c,
    rollout_key=train_loop.step_key(ctx.config.seed, step, 'rollout'),
    fork_key=train_loop.step_key(ctx.config.seed, step, 'fork'),
    sampling=ctx.sampling,
    rewards=ctx.rewards,
    client=ctx.client,
    similarity=ctx.similarity,
    mesh=ctx.run.mesh,
    rules=ctx.run.rules,
  )
  ro = au.rollout
  adv = np.zeros((au.slots * k,), np.float32)
  use = np.zeros_like(adv)
  anchor = ro.batch['completion_mask'].copy()
  scores, accept = [], []
  for i, rec in enumerate(au.records):
    if rec['teacher'] is None:
      continue
    adv[i * k : (i + 1) * k], use[i * k : (i + 1) * k] = rec['advantages'], 1.0
    anchor[rec['row'], rec['t'] : rec['t'] + chunk] = 0.0
    scores.extend(float(x) for x in rec['scores'])
    accept.append(rec['acceptance'])
  skipped = sum(rec['teacher'] is None for rec in au.records)
  # The chunks run against their rollout row's KV cache in the update (models.forked_logprobs).
  cb = models.fork_batch(
    ro.batch, au.pairs, ctx.sampling.prompt_len, au.candidates, au.lengths, num_candidates=k
  )
  cb['completion_mask'] = cb['completion_mask'] * use[:, None]
  cb['adv'] = adv
  rb = {key: ro.batch[key] for key in ('inputs', 'positions', 'segment_ids', 'targets')}
  rb['completion_mask'] = ro.batch['completion_mask']
  rb['anchor_mask'] = anchor
  run = ctx.run
  t0 = time.perf_counter()
  rb['base_logp'] = rollout.score(
    ctx.base_graphdef, ctx.base_state, rb, train_state=False, mesh=run.mesh, rules=run.rules
  ).astype(np.float32)
  au.times['anchor_s'] = time.perf_counter() - t0  # the frozen base model's forward
  batch = {**{f'c_{k_}': v for k_, v in cb.items()}, **{f'r_{k_}': v for k_, v in rb.items()}}
  sampled = int(ro.lengths.sum()) + int(au.lengths[: len(au.pairs) * k].sum())
  stats = {
    'reward_mean': float(ro.rewards.mean()),
    'response_len': float(ro.lengths.mean()),
    'entropy': _entropy(ro),
    'audits': float(len(au.pairs) - skipped),
    'audits_skipped': float(skipped),
    'score_mean': float(np.mean(scores)) if scores else 0.0,
    'accept_mean': float(np.mean(accept)) if accept else 0.0,
    'anchor_tokens': float(anchor.sum()),
    **au.times,
  }
  return batch, sampled, stats


def _entropy(ro: rollout.Rollout) -> float:
  valid = ro.batch['completion_mask'] > 0
  return float(ro.entropies[valid].mean()) if valid.any() else 0.0


def _opd_batch(ctx: _Ctx, model, prompts, step: int):
  rl, task = ctx.config.rl, ctx.task
  t0 = time.perf_counter()
  ro = _rollout(ctx, model, prompts, step)
  times = {'rollout_s': time.perf_counter() - t0}
  keys = ('inputs', 'positions', 'segment_ids', 'targets', 'completion_mask')
  # The teacher's forward and the update skip the columns that are padding in every row.
  batch = rollout.trim_columns({key: ro.batch[key] for key in keys}, rl.trim_multiple)
  n, v = batch['targets'].shape[1], task.vocab_size
  teacher = ctx.client.teacher
  t0 = time.perf_counter()
  ctx.client.calls += len(prompts)  # one white-box query (a forward over the rollout) per sequence
  if isinstance(teacher, models.WhiteBoxLMTeacher):
    teacher_logp = teacher.rollout_logprobs(batch)
  else:
    teacher_logp = np.zeros((len(prompts), n, v), np.float32)
    token_id = lambda ch: task.encode_text(ch)[0]  # noqa: E731
    for b, p in enumerate(prompts):
      text = task.text(p)
      for j in range(int(ro.lengths[b])):
        prefix = task.decode(ro.completion[b, :j])
        teacher_logp[b, j] = teacher.logprobs(text, prefix, token_id, task.eos_id, v)
  times['teacher_s'] = time.perf_counter() - t0
  batch['teacher_logp'] = teacher_logp
  stats = {
    'reward_mean': float(ro.rewards.mean()),
    'response_len': float(ro.lengths.mean()),
    'entropy': _entropy(ro),
    **times,
  }
  return batch, int(ro.lengths.sum()), stats


def _sft_batch(ctx: _Ctx, model, prompts, step: int):
  del model, step
  rl, task = ctx.config.rl, ctx.task
  traces = ctx.counters['traces']
  n = rl.max_new_tokens
  comp = np.full((len(prompts), n), task.pad, np.int32)
  lens = np.zeros((len(prompts),), np.int32)
  t0 = time.perf_counter()
  # The teacher is asked once per distinct prompt (first come, first asked), all in one batch.
  new = list({str(p.uid): p for p in prompts if str(p.uid) not in traces}.items())
  replies = ctx.client.ask_many([(task.text(p), '') for _, p in new])
  traces.update({key: reply for (key, _), reply in zip(new, replies, strict=True) if reply})
  missing = 0
  for b, p in enumerate(prompts):
    key = str(p.uid)
    if key not in traces:
      missing += 1
      continue
    comp[b], lens[b] = task.trace_tokens(traces[key], n)
  times = {'teacher_s': time.perf_counter() - t0}
  toks, mask = rollout.pad_prompts(prompts, rl.prompt_len, task.pad)
  batch = rollout.trim_columns(rollout.build_batch(toks, mask, comp, lens), rl.trim_multiple)
  return batch, 0, {'traces': float(len(traces)), 'rows_without_trace': float(missing), **times}


_BATCHES = {'omniopd': _omniopd_batch, 'opd': _opd_batch, 'sft': _sft_batch}


def _extra_state(ctx: _Ctx) -> dict:
  out = {**ctx.client.state_dict(), **ctx.rewards.state_dict()}
  out['student_tokens'] = ctx.counters['student_tokens']
  out['sft_traces'] = json.dumps(ctx.counters['traces'], sort_keys=True)
  return out


def _load_extra(ctx: _Ctx, extra: dict | None) -> None:
  extra = extra or {}
  ctx.client.load_state_dict(extra)
  ctx.rewards.load_state_dict(extra)
  ctx.counters['student_tokens'] = int(extra.get('student_tokens', 0))
  ctx.counters['traces'] = json.loads(extra.get('sft_traces', '{}'))


def _train(run: train_loop.Run, task: input_pipeline.Task, *, teacher=None, embed=None) -> dict:
  config, mesh, rules = run.config, run.mesh, run.rules
  rl = config.rl
  loop.check_config(config, mesh, rules)
  create = models.create_policy(config, mesh, rules)
  policy = create()
  base_graphdef, base_state = nnx.split(create())
  tx = optim.make_optimizer(config.optimizer, config.train.num_steps)
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    graphdef, state = nnx.split(train_loop.TrainState(policy, tx))
    shardings = sharding.state_shardings(state, mesh, rules)
    state = jax.device_put(state, shardings)
    abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    sspec = train_loop.ShardedState(graphdef, abstract, shardings)
  start, state, extra, meta = run.restore_or_init(sspec, lambda: state)
  teacher = teacher if teacher is not None else make_teacher(config, task)
  ctx = _Ctx(
    run=run,
    task=task,
    spec=sspec,
    base_graphdef=base_graphdef,
    base_state=base_state,
    sampler=curriculum.make_sampler('shuffled', task.train, rl.prompts_per_step, config.seed),
    sampling=sampling_of(config, task),
    rewards=task.verifier(),
    client=models.TeacherClient(teacher, config.omniopd.teacher_timeout_s),
    similarity=make_similarity(config, embed) if config.mode == 'omniopd' else None,
    train_step=train_loop.make_train_step(sspec.graphdef, make_loss_fn(config), sspec.shardings),
    counters={'student_tokens': 0, 'traces': {}},
  )
  _load_extra(ctx, extra)
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    return _loop(ctx, state, start, meta)


def _loop(ctx: _Ctx, state, start: int, meta: dict) -> dict:
  run, config = ctx.run, ctx.config
  progress = metrics_lib.Progress(start, run.num_steps)
  last_train, last_eval = dict(meta.get('train', {})), dict(meta.get('eval', {}))

  def save(step):
    run.save(step, state, extra=_extra_state(ctx), meta={'train': last_train, 'eval': last_eval})

  def evaluate_(step):
    return run.evaluate(
      step,
      lambda: evaluate.heldout(
        train_loop.model_of(ctx.spec.graphdef, state),
        ctx.task.test,
        batch=config.rl.eval_batch,
        sampling=ctx.sampling,
        rewards=ctx.rewards,
        mesh=run.mesh,
        rules=run.rules,
      ),
    )

  if start == 0 and config.train.eval_every > 0:
    last_eval = evaluate_(0)
  for step in range(start + 1, run.num_steps + 1):
    model = train_loop.model_of(ctx.spec.graphdef, state)
    prompts = ctx.sampler.batch(step)
    batch, sampled, stats = _BATCHES[config.mode](ctx, model, prompts, step)
    ctx.counters['student_tokens'] += sampled
    t0 = time.perf_counter()
    state, m = ctx.train_step(
      state,
      sharding.global_rows(batch, run.mesh, run.rules),
      train_loop.step_key(config.seed, step, 'update'),
    )
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    stats['update_s'] = time.perf_counter() - t0
    if step == start + 1:
      progress.compiled(step)
    run.check_finite(step, m['loss'])
    last_train = {**m, **stats, **ctx.client.metrics(), **ctx.rewards.metrics()}
    last_train['student_tokens'] = ctx.counters['student_tokens']
    if run.should_log(step):
      run.write(step, 'train', last_train)
      shown = {k: v for k, v in last_train.items() if k not in TIMING_KEYS}
      run.log_progress(progress, step, shown)
    if run.should_eval(step):
      last_eval = evaluate_(step)
    if run.should_save(step):
      save(step)
    run.end_step(step, lambda step=step: save(step))
  return run.finish({k: v for k, v in last_train.items() if k not in TIMING_KEYS}, last_eval)


# ---------------------------------------------------------------------------------------------------
# GRPO on the shared loop.


def grpo_setup(config, task: input_pipeline.Task, mesh, rules) -> loop.RLSetup:
  sampling = sampling_of(config, task)
  rewards = CountingRewards(task.verifier(), config.rl.group_size)

  def extra_eval(model):
    return evaluate.heldout(
      model,
      task.test,
      batch=config.rl.eval_batch,
      sampling=sampling,
      rewards=rewards.source,
      mesh=mesh,
      rules=rules,
    )

  return loop.RLSetup(
    create_model=models.create_policy(config, mesh, rules),
    tx=optim.make_optimizer(config.optimizer, config.train.num_steps),
    train_prompts=task.train,
    eval_prompts=task.test,
    rewards=rewards,
    estimator=loop.estimator_from_config(config.rl),
    stop_tokens=task.stop,
    pad_id=task.pad,
    decode=task.decode,
    learning_rate=optim.learning_rate(config.optimizer, config.train.num_steps),
    extra_eval=extra_eval,
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str | pathlib.Path,
  *,
  mesh: jax.sharding.Mesh | None = None,
  teacher: models.Teacher | None = None,
  embed: Callable | None = None,
) -> dict[str, Any]:
  """Runs (or resumes) one arm (config.mode); returns results.json. `teacher` / `embed` replace the
  config's teacher and MiniLM (tests, notebooks)."""
  check_config(config)
  with train_loop.Run(config, workdir, mesh=mesh, checks=[loop.check_config, check_config]) as run:
    spec.write(run.workdir, **models.description(config))
    if run.finished:
      return run.results
    task = input_pipeline.make_task(config)
    if config.mode == 'grpo':
      return loop.train(run, grpo_setup(config, task, run.mesh, run.rules))
    return _train(run, task, teacher=teacher, embed=embed)
