"""OmniOPD's teachers and forks: the client counts and skips timeouts, empty replies and errors, per
request or per batch; an LM teacher's batch answers as its single requests; the scripted teacher's text and white-box faces; an LM teacher passes text only; the white-box LM
teacher's log-probabilities are its own next-token distribution on the rollout; K candidates forked
from the rollout's KV cache equal independent sampling of K tiled prefixes with the same keys; chunks scored
through the rollout's KV cache equal chunks scored after their whole prefixes, gradient included."""

import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import sharding
from common.rl import rollout
from common.sampling import kv_cache
from common.sampling import sampler as sampler_lib
from projects.omniopd import losses
from projects.omniopd import models
from projects.omniopd import train
from tests.common.rl import toy


class _Flaky:
  def __init__(self, behaviour):
    self.behaviour = behaviour

  def continue_text(self, prompt, prefix):
    kind = self.behaviour[prompt]
    if kind == 'slow':
      time.sleep(2.0)
      return 'late'
    if kind == 'raise':
      raise RuntimeError('teacher down')
    if kind == 'empty':
      return ''
    if kind == 'none':
      return None
    return prompt + prefix


def test_client_counts_and_skips_timeouts_empty_replies_and_errors():
  teacher = _Flaky({'a': 'ok', 'b': 'slow', 'c': 'raise', 'd': 'empty', 'e': 'none'})
  client = models.TeacherClient(teacher, timeout_s=0.2)
  t0 = time.perf_counter()
  got = [client.ask(p, '!') for p in 'abcde']
  assert time.perf_counter() - t0 < 1.5  # the slow call did not block the caller
  assert got == ['a!', None, None, None, None]
  assert client.state_dict() == {
    'teacher_calls': 5,
    'teacher_timeouts': 1,
    'teacher_empty': 2,
    'teacher_errors': 1,
  }
  again = models.TeacherClient(teacher, timeout_s=0.2)
  again.load_state_dict(client.state_dict())
  assert again.metrics() == {**client.state_dict(), 'teacher_failures': 4}


class _Batched(_Flaky):
  """_Flaky with a batched face: the whole list in one call."""

  def __init__(self, behaviour, answer_count=None, seconds=0.0):
    super().__init__(behaviour)
    self.batches, self.answer_count, self.seconds = [], answer_count, seconds

  def continue_texts(self, requests):
    self.batches.append(list(requests))
    time.sleep(self.seconds)
    kinds = {self.behaviour[p] for p, _ in requests}
    if 'slow' in kinds or 'raise' in kinds:  # one bad request fails the whole batch
      return [self.continue_text(p, q) for p, q in requests]
    out = [self.continue_text(p, q) for p, q in requests]
    return out[: self.answer_count] if self.answer_count is not None else out


def test_client_asks_a_batched_teacher_once_and_counts_every_request():
  teacher = _Batched({'a': 'ok', 'b': 'ok', 'd': 'empty', 'e': 'none'})
  client = models.TeacherClient(teacher, timeout_s=0.5)
  assert client.ask_many([('a', '!'), ('d', ''), ('b', '?'), ('e', '')]) == ['a!', None, 'b?', None]
  assert teacher.batches == [[('a', '!'), ('d', ''), ('b', '?'), ('e', '')]]
  assert client.state_dict() == {
    'teacher_calls': 4,
    'teacher_timeouts': 0,
    'teacher_empty': 2,
    'teacher_errors': 0,
  }
  assert client.ask_many([]) == [] and len(teacher.batches) == 1
  # A batch has the per-request timeout times its size: 4 requests in 0.5 s at 0.2 s each pass.
  busy = models.TeacherClient(_Batched({'a': 'ok'}, seconds=0.5), timeout_s=0.2)
  assert busy.ask_many([('a', str(i)) for i in range(4)]) == ['a0', 'a1', 'a2', 'a3']
  assert busy.state_dict()['teacher_timeouts'] == 0
  # A batch that runs past its timeout or raises costs every request in it, and never the run.
  slow = models.TeacherClient(_Batched({'a': 'ok', 'b': 'slow'}), timeout_s=0.2)
  t0 = time.perf_counter()
  assert slow.ask_many([('a', ''), ('b', '')]) == [None, None]
  assert time.perf_counter() - t0 < 1.5
  assert slow.state_dict()['teacher_timeouts'] == 2 and slow.state_dict()['teacher_calls'] == 2
  down = models.TeacherClient(_Batched({'a': 'ok', 'c': 'raise'}), timeout_s=0.5)
  assert down.ask_many([('a', ''), ('c', ''), ('a', '')]) == [None] * 3
  assert down.state_dict()['teacher_errors'] == 3
  # An answer list of the wrong length is an error, not a misaligned reply.
  short = models.TeacherClient(_Batched({'a': 'ok'}, answer_count=1), timeout_s=0.5)
  assert short.ask_many([('a', '1'), ('a', '2')]) == [None, None]
  assert short.state_dict()['teacher_errors'] == 2
  # A teacher without a batched face is asked request by request, each within its own timeout.
  seq = models.TeacherClient(_Flaky({'a': 'ok', 'b': 'slow', 'd': 'empty'}), timeout_s=0.2)
  assert seq.ask_many([('a', '!'), ('b', ''), ('d', '')]) == ['a!', None, None]
  assert seq.state_dict() == {
    'teacher_calls': 3,
    'teacher_timeouts': 1,
    'teacher_empty': 1,
    'teacher_errors': 0,
  }


def test_lm_teacher_answers_a_batch_as_it_answers_each_request():
  """Left-padded greedy rows give each request's own continuation (a real decoder, prompts of
  different lengths, padded to a bucket of 8 rows), and so do requests that share a prompt and
  read their group's longest prefill (nested prefixes, one equal to its host, a host alone)."""
  renders = {'p': [1, 5, 6], 'q': [1, 7, 3, 4, 9, 9, 4], 'r': [4]}

  def teacher(share):
    return models.LMTeacher(
      toy.model(0),
      lambda prompt, prefix: renders[prompt] + [3 + ord(c) % 12 for c in prefix],
      lambda ids: ','.join(map(str, ids)),
      max_new_tokens=5,
      stop_tokens=(toy.EOS,),
      share_prefixes=share,
    )

  plain = teacher(False)
  requests = [('p', ''), ('q', 'ab'), ('r', 'abcd')]
  alone = [plain.continue_text(p, q) for p, q in requests]
  assert plain.continue_texts(requests) == alone
  assert teacher(True).continue_texts(requests) == alone  # no prompt repeats: nothing to share
  assert len(set(alone)) > 1  # the requests are not answered alike
  grouped = [('p', 'ab'), ('p', ''), ('q', 'a'), ('p', 'abcde'), ('r', 'x'), ('q', 'ab')]
  grouped += [('p', 'abz'), ('p', 'ab'), ('q', 'ba')]
  alone = [plain.continue_text(p, q) for p, q in grouped]
  assert teacher(True).continue_texts(grouped) == alone
  assert len(set(alone)) > 3
  # Not only the greedy tokens: every row's log-probabilities are its own.
  shared, fresh = teacher(True).generate(grouped), plain.generate(grouped)
  np.testing.assert_array_equal(shared.tokens, fresh.tokens)
  np.testing.assert_allclose(shared.logprobs, fresh.logprobs, atol=1e-5)


def test_shared_prefixes_pick_the_longest_request_of_a_prompt_as_host():
  ids = [[1, 2, 3], [1, 2], [1, 2, 3, 4], [7, 8], [1, 2, 9, 9]]
  hosts, host_of, shared = models.shared_prefixes(ids, ['a', 'a', 'a', 'b', 'a'])
  assert hosts == [2, 3]
  assert host_of == [2, 2, 2, 3, 2]
  # Each reads the tokens it shares with its host, less one: its last token is always fed again.
  assert shared == [2, 1, 3, 1, 2]


def test_scripted_teacher_text_and_white_box_faces():
  answers = {f'{i}+1=': str(i + 1) for i in range(200)}
  t = models.ScriptedTeacher(answers, accuracy=0.8, eps=0.1)
  right = sum(t.target(p) == a for p, a in answers.items())
  assert 140 <= right <= 180  # about 80% of the prompts
  p = next(p for p in answers if t.target(p) == answers[p] and len(answers[p]) == 2)
  a = answers[p]
  assert t.continue_text(p, '') == a and t.continue_text(p, a[0]) == a[1:]
  assert t.continue_text(p, a) == ''  # nothing after the end: the client skips it
  ids = {c: i + 3 for i, c in enumerate('0123456789')}
  lp = t.logprobs(p, a[0], ids.__getitem__, 2, 13)
  assert np.argmax(lp) == ids[a[1]] and np.exp(lp).sum() == pytest.approx(1.0, rel=1e-5)
  assert np.argmax(t.logprobs(p, a, ids.__getitem__, 2, 13)) == 2  # EOS after the answer
  with pytest.raises(KeyError, match='no answer'):
    t.target('unknown')


def test_lm_teacher_passes_only_text():
  model = toy.model(0)
  seen = []

  def render(prompt, prefix):
    seen.append((prompt, prefix))
    return [1, 3 + len(prompt) % 8]

  teacher = models.LMTeacher(
    model, render, lambda ids: ' '.join(map(str, ids)), max_new_tokens=3, stop_tokens=(toy.EOS,)
  )
  out = teacher.continue_text('question', 'partial')
  assert isinstance(out, str) and seen == [('question', 'partial')]


def test_white_box_lm_teacher_gives_its_own_distribution_on_the_rollout():
  teacher = models.WhiteBoxLMTeacher(toy.model(0), lambda p, q: [1], str, max_new_tokens=3)
  rng = np.random.default_rng(0)
  b, p, n = 3, 5, 4
  inputs = rng.integers(3, toy.VOCAB, (b, p + n - 1)).astype(np.int32)
  batch = {
    'inputs': inputs,
    'positions': np.broadcast_to(np.arange(p + n - 1), inputs.shape).astype(np.int32),
    'segment_ids': np.ones_like(inputs),
    'targets': rng.integers(3, toy.VOCAB, (b, n)).astype(np.int32),
  }
  logp = teacher.rollout_logprobs(batch)
  full = np.asarray(
    teacher.model(inputs, positions=batch['positions'], segment_ids=batch['segment_ids'])
  )
  assert logp.shape == (b, n, full.shape[-1])  # the decoder's (padded) vocabulary, as the student's
  np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(logp, np.asarray(jax.nn.log_softmax(full[:, -n:], -1)), atol=1e-5)
  mask = np.ones((b, n), np.float32)
  # White-box OPD against itself: zero reverse KL; against another model: positive.
  assert float(losses.reverse_kl(full[:, -n:], logp, mask)) == pytest.approx(0.0, abs=1e-5)
  other = np.asarray(
    toy.model(1)(inputs, positions=batch['positions'], segment_ids=batch['segment_ids'])
  )
  assert float(losses.reverse_kl(other[:, -n:], logp, mask)) > 1e-3


def test_white_box_teacher_scores_a_trimmed_rollout_as_the_whole_one():
  """The OPD arm hands the teacher the rollout without its all-padding columns
  (rollout.trim_columns): the same distributions on the kept completion positions."""
  teacher = models.WhiteBoxLMTeacher(toy.model(0), lambda p, q: [1], str, max_new_tokens=3)
  rng = np.random.default_rng(1)
  prompts = toy.prompts(4)  # 2-3 tokens, left-padded to 10 columns
  toks, mask = rollout.pad_prompts(prompts, 10, 0)
  completion = rng.integers(3, toy.VOCAB, (4, 8)).astype(np.int32)
  batch = rollout.build_batch(toks, mask, completion, np.array([3, 1, 4, 2]))
  trimmed = rollout.trim_columns(batch, 2)
  assert trimmed['inputs'].shape == (4, 4 + 4 - 1)  # prompt 10 -> 4 columns, completion 8 -> 4
  whole, cut = teacher.rollout_logprobs(batch), teacher.rollout_logprobs(trimmed)
  np.testing.assert_allclose(cut, whole[:, :4], atol=1e-5)


def test_candidates_forked_from_the_rollout_cache_equal_sampling_each_prefix_afresh():
  """K candidates forked from the rollout's own KV cache (no prefix prefilled again) equal K
  tiled copies of each whole prefix sampled from scratch with the same keys: forks at the first
  completion token and later, ragged prompts, an unused slot (row 0 after its prompt)."""
  model = toy.model(0)
  mesh = toy.one_device_mesh()
  rules = sharding.DEFAULT_RULES
  p, n, chunk, k = 4, 5, 3, 4
  sampling = rollout.Sampling(prompt_len=p, max_new_tokens=n, temperature=1.0, stop_tokens=())
  prompts = toy.prompts(3)
  key = jax.random.key(7)
  with jax.set_mesh(mesh):
    ro = rollout.rollout(
      model,
      prompts,
      jax.random.key(3),
      sampling=sampling,
      rewards=rollout.VerifierRewards(toy.verifier),
      num_samples=1,
      mesh=mesh,
      rules=rules,
      return_cache=True,
    )
    pairs, slots = [(0, 0), (1, 3), (2, 4), (0, 2)], 5
    ids = np.asarray([11, 22, 33, 44, 55])
    cand, clen, done = train.fork_candidates(
      model,
      ro,
      pairs,
      ids,
      key,
      slots=slots,
      num_candidates=k,
      chunk_len=chunk,
      sampling=sampling,
      mesh=mesh,
      rules=rules,
    )
  assert cand.shape == (slots * k, chunk)
  prefixes = [list(prompts[b].tokens) + ro.completion[b, :t].tolist() for b, t in pairs]
  prefixes += [list(prompts[0].tokens)]
  toks, mask = sampler_lib.pad_prompts(prefixes, side='left', pad_id=0, length=p + n)
  keys = sampler_lib.fork_keys(sampler_lib.row_keys(key, ids), k)
  afresh = sampler_lib.generate(
    model,
    np.repeat(toks, k, 0),
    np.repeat(mask, k, 0),
    config=sampler_lib.SamplingConfig(max_new_tokens=chunk, temperature=1.0),
    key=keys,
    prompt_bucket=p + n,
  )
  np.testing.assert_array_equal(cand, np.asarray(afresh.tokens))
  np.testing.assert_array_equal(clen, np.asarray(afresh.lengths))
  np.testing.assert_array_equal(done, np.asarray(afresh.done))
  # The candidates of one fork differ from each other (K draws, not one copy), and forks of the
  # same row at different positions differ (the cut is honoured).
  assert len({tuple(r) for r in cand[:k]}) > 1
  assert not np.array_equal(cand[:k], cand[3 * k : 4 * k])


def test_fork_cache_cuts_grows_and_places_the_next_token():
  model = toy.model(0)
  cache = kv_cache.KVCache.init(model.cfg, 2, 6)
  ones = jnp.ones((2, 6, 1, 16))
  cache = cache.write(0, 0, ones, ones, jnp.broadcast_to(jnp.arange(6), (2, 6)))
  cache = cache.advance(6, jnp.asarray([6, 6]))
  forked = models.fork_cache(
    cache, jnp.asarray([1, 1, 0]), jnp.asarray([2, 5, 0]), jnp.asarray([9, 8, 7]), extra=3
  )
  layer = forked.read(0)
  assert forked.max_len == 9 and forked.batch == 3 and int(forked.length) == 6
  np.testing.assert_array_equal(
    np.asarray(layer.valid),
    [[1, 1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0, 0], [0] * 9],
  )
  np.testing.assert_array_equal(np.asarray(forked.next_position), [9, 8, 7])
  assert float(jnp.abs(layer.k[:, :, 6:]).max()) == 0.0


def test_forked_logprobs_equal_full_prefix_rows_with_their_gradient():
  """Chunks scored against the rollout's KV cache give the log-probs and the gradient of scoring
  each chunk after its whole prefix (the rows `rollout.build_batch` makes): ragged prompts, forks
  at the first completion token and at the last, unused fork slots, chunks of every length."""
  model = toy.model(0)
  rng = np.random.default_rng(0)
  p, n, chunk, k = 5, 6, 3, 2
  prompts = [list(rng.integers(3, toy.VOCAB, size=size)) for size in (3, 5, 1)]
  ptoks, pmask = sampler_lib.pad_prompts(prompts, side='left', pad_id=0, length=p)
  completion = rng.integers(3, toy.VOCAB, size=(3, n)).astype(np.int32)
  roll = rollout.build_batch(ptoks, pmask, completion, np.asarray([6, 4, 2]))
  pairs, slots = [(0, 2), (1, 0), (2, 1), (0, 5)], 5
  cand = rng.integers(3, toy.VOCAB, size=(slots * k, chunk)).astype(np.int32)
  clen = rng.integers(1, chunk + 1, size=slots * k)
  forks = models.fork_batch(roll, pairs, p, cand, clen, k)
  prefixes = [prompts[b] + completion[b, :t].tolist() for b, t in pairs]
  prefixes += [prompts[0]] * (slots - len(pairs))
  ftoks, fmask = sampler_lib.pad_prompts(prefixes, side='left', pad_id=0, length=p + n)
  full = rollout.build_batch(np.repeat(ftoks, k, 0), np.repeat(fmask, k, 0), cand, clen)
  np.testing.assert_array_equal(forks['targets'], full['targets'])
  np.testing.assert_array_equal(forks['completion_mask'], full['completion_mask'])
  roll_mask, fork_mask = roll['completion_mask'] > 0, full['completion_mask'] > 0
  w_roll = rng.normal(size=roll_mask.shape).astype(np.float32)
  w_fork = rng.normal(size=fork_mask.shape).astype(np.float32)

  def shared(m):
    return models.forked_logprobs(m, roll, forks)

  def separate(m):
    return rollout.completion_logprobs(m, roll), rollout.completion_logprobs(m, full)

  def loss(m, logprobs):
    a, b = logprobs(m)
    return jnp.sum(jnp.where(roll_mask, a * w_roll, 0)) + jnp.sum(
      jnp.where(fork_mask, b * w_fork, 0)
    )

  (a1, b1), (a0, b0) = shared(model), separate(model)
  np.testing.assert_allclose(np.where(roll_mask, a1, 0), np.where(roll_mask, a0, 0), atol=1e-5)
  np.testing.assert_allclose(np.where(fork_mask, b1, 0), np.where(fork_mask, b0, 0), atol=1e-5)
  g1 = nnx.to_pure_dict(nnx.grad(lambda m: loss(m, shared))(model))
  g0 = nnx.to_pure_dict(nnx.grad(lambda m: loss(m, separate))(model))
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g0))
  assert scale > 1e-2  # the check below is not vacuous
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5 * scale), g1, g0)
