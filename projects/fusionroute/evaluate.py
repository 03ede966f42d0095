"""Exact-match evaluation of FusionRoute and its baselines, all on one footing.

Every method decodes the same held-out prompts greedily (the paper's setting) through the same
compiled loop (`models.generate`; only the `models.Mixing` and the weights differ), for at most
ANSWER_LEN tokens, and an answer counts when it equals the verified one exactly (the SmolLM2 arm:
at most data.max_new_tokens tokens, scored by reasoning-gym's verifier, `smollm2.grade`; its
domains are math / string / logic and its experts math / string / general):

  per domain   accuracy on data.eval_per_domain held-out prompts of each of math / code / instruct;
  mixed        the mean of the three (the paper's "Avg" over its benchmarks);
  flaw         accuracy on data.flaw_eval held-out math prompts of the planted flaw's kind, where
               the math expert was trained to answer wrongly;
  domain_match the share of generated tokens whose routed expert (argmax_i w_t) is the prompt's
               domain expert (core.md §2(e): routing should approach oracle domain routing).

Methods (`ROUTER_METHODS` need a trained router, the rest only the experts):
  fusionroute   Eq. 1: router LM + routed expert;   routing_only  the routed expert alone;
  router_lm     the router LM alone (run on a router trained with routing=False it is the paper's
                "fine-tuned model" baseline: the same SFT + DPO without routing);
  deferral      Co-LLM-style deferral: the router LM alone, the routed expert alone at tokens where
                the routing head's softmax probability of it reaches eval.defer_threshold (the
                trained routing head serves as the deferral gate; Co-LLM's own latent-variable
                training of the gate is not reproduced);
  expert_<d>    each expert alone;   uniform  uniform logit averaging;   oracle  the domain expert;
  sequence_selection  each expert answers, the answer with the highest mean token log-prob under
                its own expert wins (verifier- and reward-free, core.md §2(b));
  task_arithmetic / ties / dare  common.merging of the experts' task vectors over their base, decoded
                as one model (paper: DARE p=0.9 and TaskArithmetic with lambda=1).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import losses as lm_losses
from common import merging
from common import sharding
from common.sampling import sampler
from projects.fusionroute import experts as experts_lib
from projects.fusionroute import input_pipeline as ip
from projects.fusionroute import models
from projects.fusionroute import smollm2 as sm

ROUTER_METHODS = ('fusionroute', 'routing_only', 'router_lm', 'deferral')
MERGES = ('task_arithmetic', 'ties', 'dare')


def exact_match(
  problems: Sequence[ip.Problem], tokens: np.ndarray, lengths: np.ndarray
) -> tuple[list[str], np.ndarray]:
  """The smoke's rule: (answers, correct) where an answer equals the verified one and ends (EOS)."""
  del lengths  # decode() stops at EOS
  answers = [ip.decode(t) for t in tokens]
  correct = [
    a == p.answer and ip.EOS in t for a, p, t in zip(answers, problems, tokens, strict=True)
  ]
  return answers, np.asarray(correct, bool)


@dataclasses.dataclass
class EvalSet:
  """The held-out prompts: the domain set, then the flaw set (rows padded to whole batches), and
  how they are decoded and graded (the smoke's defaults; the SmolLM2 arm's in `eval_set`)."""

  problems: list  # ip.Problem, or the SmolLM2 arm's reasoning-gym examples
  flaw: np.ndarray  # [R] bool: the row belongs to the flaw set
  tokens: np.ndarray  # [R', P] left-padded prompts (R' >= R: whole batches)
  mask: np.ndarray  # [R', P] bool
  domains: np.ndarray  # [R'] int32
  batch_size: int
  grade: Callable[[Sequence, np.ndarray, np.ndarray], tuple[list[str], np.ndarray]] = exact_match
  domain_names: tuple[str, ...] = ip.DOMAINS
  expert_names: tuple[str, ...] = ip.DOMAINS  # expert i is the expert of domain i
  max_new_tokens: int = ip.ANSWER_LEN
  eos_id: int = ip.EOS
  pad_id: int = ip.PAD

  @property
  def rows(self) -> int:
    return len(self.problems)


def eval_set(config: ml_collections.ConfigDict) -> EvalSet:
  b = config.eval.batch_size
  if sm.is_source(config):
    every = sm.eval_problems(config)
    prompts = sm.prompts_of(sm.tokenizer(), every)
    problem_domains = [p['domain'] for p in every]
    flaw = np.zeros(len(every), bool)
    pad, length = sm.PAD, sm.PROMPT_LEN
    decoding = dict(
      grade=sm.grade,
      domain_names=sm.DOMAINS,
      expert_names=sm.EXPERTS,
      max_new_tokens=config.data.max_new_tokens,
      eos_id=sm.tokenizer().eos_id,
      pad_id=sm.PAD,
    )
  else:
    problems, flaw_set = ip.eval_problems(config), ip.flaw_problems(config)
    every = problems + flaw_set
    prompts = [ip.prompt_ids(p) for p in every]
    problem_domains = [p.domain for p in every]
    flaw = np.asarray([False] * len(problems) + [True] * len(flaw_set))
    pad, length = ip.PAD, ip.PROMPT_LEN
    decoding = {}
  total = -(-len(every) // b) * b
  prompts += [prompts[0]] * (total - len(every))
  tokens, mask = sampler.pad_prompts(prompts, side='left', pad_id=pad, length=length)
  domains = np.asarray(problem_domains + [problem_domains[0]] * (total - len(every)), np.int32)
  return EvalSet(every, flaw, tokens, mask, domains, b, **decoding)


@dataclasses.dataclass
class Decoded:
  """Host results of one method on an EvalSet (rows of the real problems only)."""

  answers: list[str]
  correct: np.ndarray  # [R] bool
  mean_logprob: np.ndarray  # [R] mean token log-prob under the decoding distribution
  experts: np.ndarray  # [R, N] routed expert per generated token (-1 after the end)


def decode(
  model: models.FusionRoute,
  es: EvalSet,
  mixing: Callable[[int, np.ndarray], models.Mixing],
  *,
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> Decoded:
  """Greedy answers of every eval prompt under `mixing(batch, domains)`, batch by batch."""
  toks, lps, sels, lens = [], [], [], []
  for start in range(0, len(es.tokens), es.batch_size):
    sl = slice(start, start + es.batch_size)
    mix = mixing(es.batch_size, es.domains[sl])
    inputs = (es.tokens[sl], es.mask[sl], mix.weights)
    if mesh is not None:  # rows sharded over the mesh's batch axes; every host holds them whole
      inputs = sharding.global_rows(inputs, mesh, rules)
    mix = mix._replace(weights=inputs[2])
    with _mesh_context(mesh, rules):
      gen = models.generate(
        model,
        inputs[0],
        mix,
        prompt_mask=inputs[1],
        max_new_tokens=es.max_new_tokens,
        eos_id=es.eos_id,
        pad_id=es.pad_id,
      )
    gen = sharding.gather_rows(gen)
    toks.append(np.asarray(gen.tokens))
    lps.append(np.asarray(gen.logprobs))
    sels.append(np.asarray(gen.experts))
    lens.append(np.asarray(gen.lengths))
  r = es.rows
  tokens, logprobs = np.concatenate(toks)[:r], np.concatenate(lps)[:r]
  lengths = np.concatenate(lens)[:r]
  answers, correct = es.grade(es.problems, tokens, lengths)
  mean_logprob = logprobs.sum(1) / np.maximum(lengths, 1)
  return Decoded(answers, correct, mean_logprob, np.concatenate(sels)[:r])


class _mesh_context:  # noqa: N801 - a context manager used like a function
  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules
    self._stack = []

  def __enter__(self):
    if self.mesh is not None:
      for ctx in (jax.set_mesh(self.mesh), sharding.axis_rules(self.rules)):
        ctx.__enter__()
        self._stack.append(ctx)

  def __exit__(self, *exc):
    while self._stack:
      self._stack.pop().__exit__(*exc)


def summarize(d: Decoded, es: EvalSet) -> dict[str, float]:
  """Accuracy per domain, mixed (their mean), on the flaw set, and the routed experts' domain match."""
  out = {}
  domain_rows = ~es.flaw
  accs = []
  for i, name in enumerate(es.domain_names):
    rows = domain_rows & (es.domains[: es.rows] == i)
    accs.append(float(d.correct[rows].mean()))
    out[name] = accs[-1]
  out['mixed'] = float(np.mean(accs))
  if es.flaw.any():
    out['flaw'] = float(d.correct[es.flaw].mean())
  gen = d.experts[domain_rows]
  dom = es.domains[: es.rows][domain_rows][:, None]
  valid = gen >= 0
  out['domain_match'] = float((gen == dom)[valid].mean()) if valid.any() else 0.0
  return out


def mixings(
  n: int, defer_threshold: float = 0.5, expert_names: Sequence[str] = ip.DOMAINS
) -> dict[str, Callable[[int, np.ndarray], models.Mixing]]:
  """Method name -> mixing(batch, domains) for the decoding rules over a model's own router
  (`expert_<name>`: expert i alone, named by expert_names[i])."""
  out = {
    'deferral': lambda b, _: models.deferral(b, n, defer_threshold),
    'fusionroute': lambda b, _: models.fusionroute(b, n),
    'routing_only': lambda b, _: models.routing_only(b, n),
    'router_lm': lambda b, _: models.router_lm(b, n),
    'uniform': lambda b, _: models.uniform(b, n),
    'oracle': lambda _, domains: models.oracle(domains, n),
  }
  for i, name in enumerate(expert_names):
    out[f'expert_{name}'] = lambda b, _, i=i: models.single_expert(b, n, i)
  return out


def evaluate_methods(
  model: models.FusionRoute,
  es: EvalSet,
  methods: Sequence[str],
  *,
  mesh=None,
  rules=sharding.DEFAULT_RULES,
  defer_threshold: float = 0.5,
) -> dict[str, Decoded]:
  table = mixings(model.num_experts, defer_threshold, es.expert_names)
  return {m: decode(model, es, table[m], mesh=mesh, rules=rules) for m in methods}


def flat_metrics(results: Mapping[str, Decoded], es: EvalSet) -> dict[str, float]:
  """{'<method>/<metric>': value} for metrics.jsonl."""
  return {f'{m}/{k}': v for m, d in results.items() for k, v in summarize(d, es).items()}


def method_metrics(flat: Mapping[str, float], method: str) -> dict[str, float]:
  """One method's summary back out of `flat_metrics`' dict (e.g. a results.json 'eval')."""
  prefix = f'{method}/'
  return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------
# The held-out LM loss (the run's eval 'loss').


@nnx.jit
def _nll_sum(lm, batch):
  logits = lm(batch['inputs'], positions=batch['positions'], segment_ids=batch['segment_ids'])
  nll = -lm_losses.token_logprobs(logits, batch['targets'])
  mask = batch['loss_mask'] > 0
  return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask)


def heldout_loss(
  model: models.FusionRoute,
  rows: Mapping[str, np.ndarray],
  mesh=None,
  rules=None,
  batch_size: int | None = None,
) -> float:
  """The router LM's mean NLL of the held-out answers (reply tokens), in one call, or in chunks of
  batch_size rows (the SmolLM2 arm: 192 rows of 96 x 49,152 logits would take 3.6 GB at once)."""
  batch = {k: v for k, v in rows.items() if k != 'domain'}
  n = len(batch['inputs'])
  size = n if batch_size is None else batch_size
  total, count = 0.0, 0.0
  for start in range(0, n, size):
    chunk = {k: v[start : start + size] for k, v in batch.items()}
    if len(chunk['inputs']) < size:  # the last chunk padded with masked rows: one shape
      pad = size - len(chunk['inputs'])
      chunk = {k: np.concatenate([v, np.zeros_like(v[:pad])]) for k, v in chunk.items()}
    if mesh is not None:
      chunk = sharding.global_rows(chunk, mesh, rules)
    with _mesh_context(mesh, rules):
      t, c = _nll_sum(model.router.lm, chunk)
    total, count = total + float(t), count + float(c)
  return total / max(count, 1.0)


def make_eval_fn(config: ml_collections.ConfigDict, mesh, rules) -> Callable:
  """fit's eval_fn(model, step): the router methods' accuracies and the held-out loss."""
  es = eval_set(config)
  rows = sm.eval_rows(config) if sm.is_source(config) else ip.eval_rows(ip.eval_problems(config))
  methods = ROUTER_METHODS if config.method == 'fusionroute' else ('router_lm',)

  def evaluate(model, step):
    del step
    decoded = evaluate_methods(
      model, es, methods, mesh=mesh, rules=rules, defer_threshold=config.eval.defer_threshold
    )
    out = flat_metrics(decoded, es)
    chunk = (
      config.eval.batch_size if sm.is_source(config) else None
    )  # the smoke: one call, as before
    out['loss'] = heldout_loss(model, rows, mesh, rules, chunk)
    return out

  return evaluate


# ---------------------------------------------------------------------------------------------------
# Baselines that need no trained router.


def with_router_lm(model: models.FusionRoute, params: dict) -> models.FusionRoute:
  """A copy of `model` whose router LM has `params` (e.g. a merged model's)."""
  copy = nnx.merge(*nnx.split(model))
  experts_lib.load_params(copy.router.lm, params)
  return copy


def merged_params(ex: experts_lib.Experts, method: str, config: ml_collections.ConfigDict) -> dict:
  """The experts merged over their base by common.merging: task arithmetic and DARE with the
  paper's settings (lambda = config.eval.merge_scale = 1, DARE drop rate p = 0.9), TIES at
  config.eval.ties_density (the paper runs no TIES; mergekit's examples use 0.5)."""
  e = config.eval
  if method == 'task_arithmetic':
    return merging.task_arithmetic(ex.base, ex.experts, scale=e.merge_scale)
  if method == 'ties':
    return merging.ties(ex.base, ex.experts, density=e.ties_density, scale=e.merge_scale)
  if method == 'dare':
    key = jax.random.key(config.seed)
    return merging.dare(ex.base, ex.experts, drop_rate=e.dare_drop, key=key, scale=e.merge_scale)
  raise ValueError(f'unknown merge {method!r}; expected one of {MERGES}')


def sequence_selection(per_expert: Sequence[Decoded], es: EvalSet) -> Decoded:
  """Per prompt, the expert answer with the highest mean token log-prob under its own expert."""
  scores = np.stack([d.mean_logprob for d in per_expert])  # [n, R]
  best = np.argmax(scores, axis=0)
  pick = lambda field: np.stack([getattr(d, field) for d in per_expert])[best, np.arange(es.rows)]  # noqa: E731
  answers = [per_expert[b].answers[r] for r, b in enumerate(best)]
  return Decoded(answers, pick('correct'), pick('mean_logprob'), pick('experts'))


def baselines(
  config: ml_collections.ConfigDict,
  model: models.FusionRoute,
  ex: experts_lib.Experts,
  *,
  mesh=None,
  rules=sharding.DEFAULT_RULES,
) -> dict[str, dict[str, float]]:
  """{method: summary} of every baseline that needs no trained router: each expert alone, uniform
  logit averaging, oracle domain routing, sequence selection and the three merges. `model` supplies
  the experts (its router is unused by these mixings, except the merges', which replace it)."""
  es = eval_set(config)
  names = [f'expert_{e}' for e in es.expert_names]
  results = evaluate_methods(model, es, [*names, 'uniform', 'oracle'], mesh=mesh, rules=rules)
  results['sequence_selection'] = sequence_selection([results[n] for n in names], es)
  table = mixings(model.num_experts, expert_names=es.expert_names)
  for merge in MERGES:
    merged = with_router_lm(model, params=merged_params(ex, merge, config))
    results[merge] = decode(merged, es, table['router_lm'], mesh=mesh, rules=rules)
  return {m: summarize(d, es) for m, d in results.items()}
