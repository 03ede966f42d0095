"""A small arithmetic QA set (reasoning-gym, pinned) scored by greedy exact match and answer NLL.

GEM claims the model "keeps its language ability"; held-out perplexity measures that on the corpus,
and this measures it on a task with one right answer. Items come from reasoning-gym's
`basic_arithmetic` generator (two 1-digit operands, e.g. "Calculate 5 - 3." -> "2"), deterministic
per seed and fully offline. The prompt is few-shot (`shots` solved items from a disjoint seed
before the question), so a base LM can pick up the format in context.

Exact match is greedy decoding's, computed without a decoding loop: greedy decoding from the prompt
emits the answer's tokens iff at each answer position the argmax under teacher forcing (gold
prefix) is the gold token, because every greedy step then sees exactly the gold prefix. The answer
must also end there: the greedy token after it must not continue a number (a digit, '.' or ','), so
"2" does not match a continuation "23". Token-level, so an answer re-tokenised differently by the
model counts as a miss (a lower bound on string match; tests/gem/qa_test.py checks the equivalence
with common.sampling's greedy generation). `answer_nll` is the mean NLL of the answer tokens given
the prompt: it moves even when exact match is 0 for every model (the tiny smoke models).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common import losses as common_losses
from projects.gem import models

DATASET = 'basic_arithmetic'
GENERATOR = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)
SHOT_SEED_OFFSET = 10_000  # few-shot examples come from another seed: never the question itself


def items(n: int, seed: int = 0) -> list[tuple[str, str]]:
  """n (question, answer) pairs from reasoning-gym, deterministic per seed."""
  import reasoning_gym  # noqa: PLC0415

  if n <= 0:
    raise ValueError(f'QA set size must be positive, got {n}')
  ds = reasoning_gym.create_dataset(DATASET, size=n, seed=seed, **GENERATOR)
  return [(x['question'], str(x['answer'])) for x in ds]


def prompts(n: int, seed: int = 0, shots: int = 2) -> list[tuple[str, str]]:
  """(few-shot prompt ending in 'Answer:', ' answer') pairs; the answer keeps its leading space."""
  demo = items(shots, seed + SHOT_SEED_OFFSET) if shots else []
  prefix = ''.join(f'{q} Answer: {a}\n' for q, a in demo)
  return [(f'{prefix}{q} Answer:', f' {a}') for q, a in items(n, seed)]


def number_continuation_table(decode: Callable[[int], str], vocab_size: int) -> np.ndarray:
  """[V] bool: token id decodes to text starting with a digit, '.' or ',' (it would extend a number)."""
  out = np.zeros(vocab_size, bool)
  for i in range(vocab_size):
    s = decode(i)
    out[i] = bool(s) and (s[0].isdigit() or s[0] in '.,')
  return out


def row(prompt_ids: Sequence[int], answer_ids: Sequence[int], seq_len: int, pad_id: int) -> dict:
  """One teacher-forced row: inputs = prompt + answer (padded), loss on the answer's targets.

  Raises ValueError when prompt + answer does not fit in seq_len (the set is sized to fit; a silent
  truncation would score a different question).
  """
  p, a = list(map(int, prompt_ids)), list(map(int, answer_ids))
  if not p or not a:
    raise ValueError('QA row needs a non-empty prompt and answer')
  seq = p + a
  if len(seq) > seq_len:
    raise ValueError(f'QA prompt + answer is {len(seq)} tokens, over seq_len {seq_len}')
  inputs = np.full(seq_len, pad_id, np.int32)
  inputs[: len(seq)] = seq
  targets = np.full(seq_len, pad_id, np.int32)
  targets[: len(seq) - 1] = seq[1:]
  loss_mask = np.zeros(seq_len, np.float32)
  loss_mask[len(p) - 1 : len(seq) - 1] = 1.0  # positions predicting the answer tokens
  roles = np.full(seq_len, models.PAD, np.int32)
  roles[: len(seq)] = models.PREFIX  # plain causal LM, no special token
  return {
    'inputs': inputs,
    'targets': targets,
    'roles': roles,
    'loss_mask': loss_mask,
    'end_pos': np.int32(len(seq) - 1),  # its prediction is the token after the answer
  }


@nnx.jit
def score(model: models.GemModel, batch: dict, continues: jax.Array):
  """Per row: (answer NLL sum, answer token count, greedy exact match as 0/1)."""
  logits = model.logits(batch['inputs'], batch['roles'])
  m = batch['loss_mask']
  nll = -jnp.sum(common_losses.token_logprobs(logits, batch['targets']) * m, axis=1)
  pred = jnp.argmax(logits, axis=-1)
  hit = jnp.all(jnp.where(m > 0, pred == batch['targets'], True), axis=1)
  after = jnp.take_along_axis(pred, batch['end_pos'][:, None], axis=1)[:, 0]
  exact = hit & ~continues[after] & (jnp.sum(m, axis=1) > 0)
  return nll, jnp.sum(m, axis=1), exact.astype(jnp.float32)
