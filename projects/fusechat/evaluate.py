"""FuseChat's evaluation: per-skill accuracy and perplexity of any member, and the merges.

Every model is scored on the same tokenizer-free items and texts (corpora.py), with its own
tokenizer, so pivot, fused targets, merges and the sources themselves are comparable:

  code/acc, text/acc   multiple-choice accuracy (eval.num_items items per skill, 4 choices; chance
                       0.25): a choice's score is its log-likelihood after the context divided by
                       its length in characters (lm-eval's acc_norm); acc = the mean of the two.
  code/nll_byte,       held-out NLL in nats per UTF-8 byte (tokenizer-independent perplexity:
  text/nll_byte        exp(nll_byte) per byte) through the shared `common.models.perplexity`
                       windows: the first eval.ppl_chars characters of eval.ppl_docs held-out
                       code documents (eval seed) and R documentation validation pages.

Evaluations are memoised in the process (`Evaluator.__call__`): the key is the digest of the
model's whole state and configuration, of the evaluation rows its tokenizer gives, of config.eval
and of the mesh, so a model evaluated again bitwise unchanged (the pivot and the sources in every
run of a suite, the fused targets of a lambda = 1 run, which are identical copies) is not
recomputed; a model that differs in any bit is.

`merges(base, targets, config)` builds each merge of the fused targets' parameters
(`common.merging`): sce (FuseChat's select / calculate / erase, density merge.sce_density),
linear (the average of the targets), task_arithmetic (base + merge.ta_scale * sum of deltas), ties
(density merge.ties_density, disjoint mean) and dare (drop merge.dare_drop, rescale, then task
arithmetic with merge.ta_scale; key merge.dare_seed).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import hashlib
import json
import math

from flax import nnx
import jax
import ml_collections
import numpy as np

from common import cache
from common import merging
from common import sharding
from common.models import perplexity
from projects.fusechat import corpora

SKILLS = ('code', 'text')
_MEMO: dict[str, dict[str, float]] = {}  # Evaluator.__call__'s results, by evaluation key


def tree_digest(tree, salt: str = '') -> str | None:
  """`common.cache.tree_fingerprint` of a pytree, salted; None when a leaf is not all in this
  process (then nothing is memoised on it)."""
  if not cache.fully_addressable(tree):
    return None
  return hashlib.sha256(f'{salt}|{cache.tree_fingerprint(tree)}'.encode()).hexdigest()


def model_digest(model) -> str | None:
  """`tree_digest` of a model's whole state, salted with its type and configuration."""
  return tree_digest(
    nnx.state(model), f'{type(model).__qualname__}|{getattr(model, "cfg", None)!r}'
  )


def choice_windows(
  tok, items: Sequence[corpora.ChoiceItem], max_len: int = 192
) -> perplexity.Windows:
  """[start] + context + choice per (item, choice), item-major; the choice's tokens scored."""
  start = perplexity.start_id(tok)
  seqs, spans = [], []
  for it in items:
    ctx = tok.encode(it.context, add_bos=False)
    for c in it.choices:
      ch = tok.encode(c, add_bos=False)
      keep = max(0, max_len - len(ch) - 1)
      seq = [0 if start is None else start] + ctx[len(ctx) - keep :] + ch
      seqs.append(seq)
      spans.append(len(ch))
  width = -(-max(len(s) for s in seqs) // 16) * 16
  tokens = np.zeros((len(seqs), width), np.int32)
  mask = np.zeros((len(seqs), width), bool)
  for r, (s, n) in enumerate(zip(seqs, spans, strict=True)):
    tokens[r, : len(s)] = s
    mask[r, len(s) - n : len(s)] = True
  mask[:, 0] = False
  return perplexity.Windows(tokens, mask)


def choice_accuracy(nll: np.ndarray, items: Sequence[corpora.ChoiceItem]) -> float:
  """Accuracy from the per-row NLL of `choice_windows` (score = -NLL / characters)."""
  correct, r = 0, 0
  for it in items:
    scores = [-nll[r + j] / max(1, len(c)) for j, c in enumerate(it.choices)]
    correct += int(np.argmax(scores) == it.label)
    r += len(it.choices)
  return correct / len(items)


class Evaluator:
  """The fixed evaluation sets of config.eval, tokenized once per tokenizer."""

  def __init__(self, config: ml_collections.ConfigDict, *, mesh=None, rules=None):
    e = config.eval
    self.mesh, self.rules = mesh, rules or sharding.DEFAULT_RULES
    self.batch_size = e.batch_size
    self.seq_len = e.ppl_seq_len
    self.items = {
      'code': corpora.code_items(e.num_items, e.seed),
      'text': corpora.text_items(e.num_items, e.seed),
    }
    self.texts = {  # the first eval.ppl_chars characters of each held-out document
      'code': [d[: e.ppl_chars] for d in corpora.code_documents(e.ppl_docs, seed=e.seed + 1_000)],
      'text': [d[: e.ppl_chars] for d in corpora.eval_docs(e.ppl_docs)],
    }
    self.bytes = {k: sum(len(t.encode()) for t in v) for k, v in self.texts.items()}
    self._windows: dict[int, dict] = {}
    mesh_key = None if mesh is None else (dict(mesh.shape), [d.id for d in mesh.devices.flat])
    self._key = json.dumps([e.to_dict(), mesh_key, repr(self.rules)], sort_keys=True, default=str)

  def windows(self, tok) -> dict:
    """Every set's rows for `tok`, right-padded to one width (one compiled program per width)."""
    key = id(tok)
    if key not in self._windows:
      start = perplexity.start_id(tok)
      sets = {f'mc/{k}': choice_windows(tok, v) for k, v in self.items.items()}
      for k, v in self.texts.items():
        docs = [tok.encode(t, add_bos=False) for t in v]
        sets[f'ppl/{k}'] = perplexity.windows(docs, self.seq_len, start_id=start)
      width = max(w.tokens.shape[1] for w in sets.values())
      padded = {
        name: perplexity.Windows(
          np.pad(w.tokens, ((0, 0), (0, width - w.tokens.shape[1]))),
          np.pad(w.mask, ((0, 0), (0, width - w.mask.shape[1]))),
        )
        for name, w in sorted(sets.items())
      }
      h = hashlib.sha256(self._key.encode())
      for name, w in padded.items():
        h.update(f'{name}|{w.tokens.shape}'.encode())
        h.update(np.ascontiguousarray(w.tokens).tobytes())
        h.update(np.ascontiguousarray(w.mask).tobytes())
      # 'tok' keeps id(tok) unique while cached; 'key': what the rows and config.eval give.
      self._windows[key] = {'tok': tok, 'key': h.hexdigest(), **padded}
    return self._windows[key]

  def __call__(self, model, tok) -> dict[str, float]:
    """{'code/acc', ..., 'nll_byte'} of `model` with its tokenizer `tok` (memoised: see above)."""
    w = self.windows(tok)
    digest = model_digest(model)
    if digest is None:
      return self._evaluate(model, w)
    key = f'{w["key"]}|{digest}'
    if key not in _MEMO:
      _MEMO[key] = self._evaluate(model, w)
    return dict(_MEMO[key])

  def _evaluate(self, model, w: dict) -> dict[str, float]:
    out = {}
    for k in SKILLS:
      nll, _ = perplexity.row_nll(
        model, w[f'mc/{k}'], batch_size=self.batch_size, mesh=self.mesh, rules=self.rules
      )
      out[f'{k}/acc'] = choice_accuracy(nll, self.items[k])
      nll, _ = perplexity.row_nll(
        model, w[f'ppl/{k}'], batch_size=self.batch_size, mesh=self.mesh, rules=self.rules
      )
      out[f'{k}/nll_byte'] = math.fsum(nll) / self.bytes[k]
    out['acc'] = float(np.mean([out[f'{k}/acc'] for k in SKILLS]))
    out['nll_byte'] = float(np.mean([out[f'{k}/nll_byte'] for k in SKILLS]))
    return out


def merges(base, targets: Sequence, config: ml_collections.ConfigDict) -> dict[str, object]:
  """{method: merged parameters} for config.merge.methods (see the module docstring)."""
  m = config.merge
  n = len(targets)
  out = {}
  for method in m.methods:
    if method == 'sce':
      out[method] = merging.sce(base, targets, density=m.sce_density)
    elif method == 'linear':
      out[method] = merging.task_arithmetic(base, targets, weights=[1.0 / n] * n)
    elif method == 'task_arithmetic':
      out[method] = merging.task_arithmetic(base, targets, scale=m.ta_scale)
    elif method == 'ties':
      out[method] = merging.ties(base, targets, density=m.ties_density)
    elif method == 'dare':
      key = jax.random.key(m.dare_seed)
      out[method] = merging.dare(base, targets, drop_rate=m.dare_drop, key=key, scale=m.ta_scale)
    else:
      raise ValueError(f'unknown merge {method!r}')
  return out


def table(results: Mapping[str, float], names: Sequence[str], keys: Sequence[str]) -> str:
  """A small text table of `name/key` entries of an eval row."""
  lines = ['model'.ljust(18) + ''.join(k.rjust(15) for k in keys)]
  for name in names:
    cells = [results.get(f'{name}/{k}', float('nan')) for k in keys]
    lines.append(name.ljust(18) + ''.join(f'{c:15.4f}' for c in cells))
  return '\n'.join(lines)
