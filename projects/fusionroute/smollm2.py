"""Real experts for FusionRoute (issue #20 item 4): SmolLM2-135M-Instruct and two merged LoRA fine-tunes.

The SmolLM2 arm's three experts share SmolLM2's tokenizer (49,152 tokens), as logit addition needs:

  * `general`: SmolLM2-135M-Instruct itself (also the router's initialisation, as the paper starts
    its router from Llama-3.1-8B-Instruct, its instruct expert);
  * `math`:   SmolLM2 + LoRA (common.adapters, rank `rank` on every attention and MLP projection),
    fine-tuned on reasoning-gym `basic_arithmetic` (a +/- b, 1-2 digit operands, the smollm2_easy
    family), then merged into the base kernels (`merged_params`);
  * `string`: the same on reasoning-gym `word_sequence_reversal` (3-4 words).

The three evaluation domains are those two families plus reasoning-gym `syllogism` (Yes / No; the
general expert's domain: neither fine-tune sees it). Every prompt is SmolLM2's chat template with a
system line asking for the final answer only; the supervised reply is reasoning-gym's gold answer
followed by <|im_end|>. Scoring is reasoning-gym's own verifier (`common.datasets.reasoning_gym.
score`, binary) on a greedy completion of at most `max_new_tokens` tokens, so a verbose but correct
answer still counts (SmolLM2 untuned answers in sentences).

Preference pairs (`pairs`): chosen = the verified gold reply, rejected = an expert's greedy answer
that the verifier rejects (the domain's own expert first), as in the smoke.

The fine-tuned adapters are cached outside the repo under a fingerprint of this code, the task
specs and the training settings (`ExpertSpec.key`), so the experts train once per machine; a
merged expert is rebuilt from the pretrained weights plus its cached adapter in seconds.

The launcher's arm (`experiments/fusionroute/configs/base.py:smollm2`, experts.source='smollm2')
reads its pieces from here, in the shapes `train` and `evaluate` take from the smoke's modules:
`load_experts` (an `Experts` like experts.Experts: base = SmolLM2, experts = math, string,
general), `sft_source` (the router's balanced rows), `eval_problems` / `grade` / `eval_rows` (the
held-out questions, the verifier, the held-out loss rows) and `preference_pairs` (cached with the
experts' keys). The held-out questions are reasoning-gym's test split of data.seed (de-duplicated
against its train split, which is the experts' training data). The router's questions
(`router_examples`) come from another reasoning-gym seed, ROUTER_SEED + data.seed, each distinct
and none of them an expert's training question or a held-out one (as the smoke's router never
trains on its experts' rows); per domain the first data.pair_prompts make the preference pairs,
the rest the router's SFT rows.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import functools
import hashlib
import inspect
import json
import time
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from common import cache
from common import config as config_lib
from common import losses as lm_losses
from common import sharding
from common.adapters import core as adapters
from common.adapters import lora
from common.datasets import reasoning_gym as rgd
from common.models import decoder
from common.models import loader
from common.preference import scoring
from common.sampling import sampler
from projects.fusionroute import experts as experts_lib
from projects.fusionroute import input_pipeline as ip

ASSET = 'smollm2'
DOMAINS = ('math', 'string', 'logic')
EXPERTS = ('math', 'string', 'general')  # expert i is the expert of DOMAINS[i]
SYSTEM = 'Reply with the final answer only.'
LORA_PATTERN = r'layers/\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)'
PAD = 0  # <|endoftext|>; <|im_end|> (2) is the reply's end
SOURCE = 'smollm2'  # config.experts.source of this arm
PROMPT_LEN = 80  # the longest chat prompt of the three families is 73 tokens
TRAIN_EXAMPLES, TEST_EXAMPLES = 2000, 200  # per domain (math's test split: 94 after de-duplication)
ROUTER_SEED = (
  1000  # reasoning-gym seed offset of the router's questions (485 distinct new math ones)
)


def task_specs(train: int, test: int) -> dict[str, rgd.TaskSpec]:
  """The reasoning-gym family of each domain (train / test examples per domain)."""
  return {
    'math': rgd.TaskSpec.make(
      'basic_arithmetic',
      train,
      test,
      min_terms=2,
      max_terms=2,
      min_digits=1,
      max_digits=2,
      operators=('+', '-'),
      allow_parentheses=False,
      allow_negation=False,
    ),
    'string': rgd.TaskSpec.make('word_sequence_reversal', train, test, min_words=3, max_words=4),
    'logic': rgd.TaskSpec.make('syllogism', train, test),
  }


def load_examples(train: int, test: int, seed: int = 0) -> dict[str, dict[str, list[dict]]]:
  """{domain: {'train': [...], 'test': [...]}} (reasoning-gym; test de-duplicated against train)."""
  out = {}
  for dom, spec in task_specs(train, test).items():
    out[dom] = rgd.examples([spec], seed)
  return out


# ---------------------------------------------------------------------------------------------------
# Rows.


def prompt_ids(tok, example: Mapping[str, Any]) -> list[int]:
  messages = [
    {'role': 'system', 'content': SYSTEM},
    {'role': 'user', 'content': str(example['question']).strip()},
  ]
  return tok.encode_chat(messages)


def reply_ids(tok, answer: str) -> list[int]:
  return [*tok.encode(str(answer).strip(), add_bos=False), tok.eos_id]


def stack(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def domain_rows(tok, examples: Sequence[dict], domain: int, seq_len: int) -> list[dict]:
  """SFT rows of examples that fit seq_len (longer ones are dropped and counted in the log)."""
  rows = []
  for ex in examples:
    p, r = prompt_ids(tok, ex), reply_ids(tok, ex['answer'])
    if len(p) + len(r) - 1 <= seq_len:
      rows.append(ip.reply_row(p, r, seq_len, domain))
  if len(rows) < len(examples):
    logging.info(
      'dropped %d of %d rows over %d tokens', len(examples) - len(rows), len(examples), seq_len
    )
  return rows


def row_lengths(tok, examples: Sequence[dict]) -> list[int]:
  """Each example's SFT row length as domain_rows measures it (that function is part of the
  adapters' cache key, so it is left as it is rather than rewritten on top of this one)."""
  return [len(prompt_ids(tok, ex)) + len(reply_ids(tok, ex['answer'])) - 1 for ex in examples]


# ---------------------------------------------------------------------------------------------------
# LoRA experts, merged.


def add_lora(model: decoder.Decoder, rank: int, seed: int) -> list[str]:
  """LoRA of `rank` (alpha = rank) on every attention and MLP projection; the rest frozen."""
  with sharding.unsharded():
    return adapters.adapt(model, LORA_PATTERN, lora.factory(rank=rank, rngs=nnx.Rngs(seed)))


def merged_params(model: nnx.Module) -> dict:
  """The plain decoder's pure parameter dict of an adapted model with every mergeable adapter
  folded into its base kernel: W0 + delta, read without changing `model` (AdaptedLinear's
  'base' level removed from the paths, the adapters' own parameters dropped)."""
  layers = adapters.adapted(model)
  state = nnx.to_pure_dict(nnx.state(model))

  def strip(tree, path):
    if isinstance(tree, dict):
      here = '/'.join(str(p) for p in path)
      if here in layers:
        layer = layers[here]
        if not layer.adapter.mergeable:
          raise adapters.AdapterError(f'adapter at {here} cannot be merged')
        base = strip(tree['base'], (*path, 'base'))
        if not layer.merged:
          base['kernel'] = base['kernel'] + layer.adapter.delta_kernel().astype(
            base['kernel'].dtype
          )
        return base
      return {k: strip(v, (*path, k)) for k, v in tree.items()}
    return tree

  return jax.tree.map(np.asarray, strip(state, ()))


def load_params(model: nnx.Module, params: dict) -> nnx.Module:
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(model, state)
  return model


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
  """One LoRA fine-tune: domain, steps, batch rows, sequence length, rank, learning rate, seed."""

  domain: str
  steps: int = 150
  batch_size: int = 8
  seq_len: int = 96
  rank: int = 16
  lr: float = 1e-3
  train_examples: int = 2000
  seed: int = 0

  def key(self) -> str:
    parts = [finetune, add_lora, ip.reply_row, prompt_ids, reply_ids, domain_rows, task_specs]
    src = ''.join(inspect.getsource(p) for p in parts) + SYSTEM + LORA_PATTERN
    src += json.dumps(dataclasses.asdict(self), sort_keys=True)
    return hashlib.sha256(src.encode()).hexdigest()[:20]


# The pilot's experts (sequence lengths: the longest math row is 34 tokens, string rows about 80).
EXPERT_SPECS = {
  'math': ExpertSpec('math', steps=120, seq_len=40),
  'string': ExpertSpec('string', steps=40, seq_len=88),
}


def expert_specs(config: ml_collections.ConfigDict) -> dict[str, ExpertSpec]:
  """The arm's LoRA experts: EXPERT_SPECS with config.experts.lora_steps (math, string) steps (the
  defaults give the pilot's specs, so the pilot's cached adapters serve the arm)."""
  steps = tuple(int(s) for s in config.experts.lora_steps)
  if len(steps) != len(EXPERT_SPECS):
    raise config_lib.ConfigError(
      f'experts.lora_steps={steps} needs one entry per LoRA expert {tuple(EXPERT_SPECS)}'
    )
  return {
    name: dataclasses.replace(spec, steps=n)
    for (name, spec), n in zip(EXPERT_SPECS.items(), steps, strict=True)
  }


def row_loss(model, batch) -> jax.Array:
  logits = model(batch['inputs'], segment_ids=batch['segment_ids'], positions=batch['positions'])
  return lm_losses.cross_entropy(logits, batch['targets'], batch['loss_mask'])[0]


def finetune(
  model: decoder.Decoder, rows: Sequence[dict], spec: ExpertSpec, log: Callable = logging.info
) -> dict[str, Any]:
  """AdamW (warm-up + cosine) on the adapters of an adapted model, rows drawn without
  replacement in a seeded order (epochs reshuffled). Returns the loss curve and step times."""
  steps = spec.steps
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, spec.lr, max(1, steps // 10), steps, 0.1 * spec.lr
  )
  with sharding.unsharded():
    opt = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.0), wrt=adapters.AdapterParam)

  @nnx.jit
  def step(model, opt, batch):
    loss, grads = nnx.value_and_grad(row_loss, argnums=nnx.DiffState(0, adapters.AdapterParam))(
      model, batch
    )
    opt.update(model, grads)
    return loss

  rng = np.random.default_rng([spec.seed, 0xF7])
  order: list[int] = []
  curve, times = [], []
  for i in range(steps):
    if len(order) < spec.batch_size:
      order += list(rng.permutation(len(rows)))
    idx, order = order[: spec.batch_size], order[spec.batch_size :]
    batch = stack([rows[j] for j in idx])
    batch.pop('domain')
    t0 = time.perf_counter()
    loss = float(step(model, opt, batch))
    times.append(time.perf_counter() - t0)
    curve.append(loss)
    if i % 10 == 0 or i == steps - 1:
      log(f'  {spec.domain} expert step {i + 1}/{steps}: loss {loss:.4f} ({times[-1]:.2f} s)')
  return {'curve': curve, 'step_s': times}


def pretrained(dtype: str = 'float32'):
  """(SmolLM2-135M-Instruct as a Decoder, its tokenizer) on one device."""
  model, _, tok = loader.load_pretrained(ASSET, dtype=dtype)
  return model, tok


def expert(spec: ExpertSpec, log: Callable = logging.info) -> tuple[dict, dict]:
  """(merged parameters, training record) of one LoRA expert; the adapter is trained on first use
  and cached (cache_dir('fusionroute', 'smollm2_adapters')/<key>.npz with its record)."""
  path = cache.cache_dir('fusionroute', 'smollm2_adapters') / f'{spec.key()}.npz'
  model, tok = pretrained()
  add_lora(model, spec.rank, spec.seed)
  cached = path.exists()

  def train():
    data = load_examples(spec.train_examples, 0, seed=spec.seed)[spec.domain]['train']
    rows = domain_rows(tok, data, DOMAINS.index(spec.domain), spec.seq_len)
    log(f'{spec.domain} expert: LoRA rank {spec.rank}, {len(rows)} rows, {spec.steps} steps')
    t0 = time.perf_counter()
    record = finetune(model, rows, spec, log)
    record['wall_s'] = time.perf_counter() - t0
    record['spec'] = dataclasses.asdict(spec)
    record['trainable'] = adapters.count_trainable(model)
    flat = cache.tree_to_arrays(nnx.to_pure_dict(nnx.state(model, adapters.AdapterParam)))
    return {'__record__': np.asarray(json.dumps(record)), **flat}

  flat = cache.load_or_compute(path, train)
  record = json.loads(str(flat.pop('__record__')))
  if cached:  # else the model holds the adapter it was just trained into
    state = nnx.state(model, adapters.AdapterParam)
    pure = cache.arrays_to_tree(flat, nnx.to_pure_dict(state), leaf_fn=lambda a, _: jnp.asarray(a))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    log(f'{spec.domain} expert: adapter read from {path}')
  return merged_params(model), record


def decoder_from(params: dict, dtype: str = 'float32') -> decoder.Decoder:
  """A plain SmolLM2 decoder holding `params` (e.g. a merged expert's)."""
  model, _ = pretrained(dtype)
  return load_params(model, params)


# ---------------------------------------------------------------------------------------------------
# Evaluation: greedy answers scored by reasoning-gym's verifier.


def prompts_of(tok, examples: Sequence[dict]) -> list[list[int]]:
  return [prompt_ids(tok, ex) for ex in examples]


def score(tok, examples: Sequence[dict], tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """[R] 1.0 where the verifier accepts the decoded completion (up to its <|im_end|>)."""
  return grade(examples, tokens, lengths, tok)[1].astype(np.float32)


def grade(
  problems: Sequence[dict], tokens: np.ndarray, lengths: np.ndarray, tok=None
) -> tuple[list[str], np.ndarray]:
  """(decoded completions up to their lengths, verifier-correct [R] bool): a verbose but
  correct answer counts (reasoning-gym's answer extraction)."""
  tok = tok or tokenizer()
  answers = [
    tok.decode([int(t) for t in row[: int(n)]]) for row, n in zip(tokens, lengths, strict=True)
  ]
  correct = [
    rgd.score(ex['task'], text, ex, binary=True) > 0
    for ex, text in zip(problems, answers, strict=True)
  ]
  return answers, np.asarray(correct, bool)


def greedy(
  model: decoder.Decoder,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int,
  eos_id: int,
  batch: int,
) -> tuple[np.ndarray, np.ndarray]:
  """A plain decoder's greedy completions (common.sampling), batch by batch (one shape)."""
  cfg = sampler.SamplingConfig(
    max_new_tokens=max_new_tokens, temperature=0.0, stop_tokens=(eos_id,), pad_id=PAD
  )
  toks, lens = [], []
  for start in range(0, len(prompts), batch):
    chunk = list(prompts[start : start + batch])
    real = len(chunk)
    chunk += [chunk[0]] * (batch - real)
    with sharding.unsharded():
      gen = sampler.generate(model, chunk, config=cfg, prompt_bucket=32)
    toks.append(np.asarray(gen.tokens)[:real])
    lens.append(np.asarray(gen.lengths)[:real])
  return np.concatenate(toks), np.concatenate(lens)


def matrix(
  models: Mapping[str, decoder.Decoder],
  tok,
  test: Mapping[str, Sequence[dict]],
  *,
  max_new_tokens: int = 24,
  batch: int = 32,
  log: Callable = logging.info,
) -> dict[str, dict[str, float]]:
  """{model: {domain: verifier accuracy}} of greedy answers, every model on every domain."""
  out: dict[str, dict[str, float]] = {}
  for name, m in models.items():
    out[name] = {}
    for dom, examples in test.items():
      t0 = time.perf_counter()
      tokens, lengths = greedy(m, prompts_of(tok, examples), max_new_tokens, tok.eos_id, batch)
      out[name][dom] = float(score(tok, examples, tokens, lengths).mean())
      log(f'  {name} on {dom}: {out[name][dom]:.3f} ({time.perf_counter() - t0:.1f} s)')
    out[name]['mixed'] = float(np.mean([out[name][d] for d in test]))
  return out


def pairs(
  tok,
  examples: Mapping[str, Sequence[dict]],
  answers: Sequence[Mapping[str, tuple[np.ndarray, np.ndarray]]],
  prompt_len: int,
  response_len: int,
) -> dict[str, np.ndarray]:
  """Preference pairs from verified answers: chosen = the gold reply, rejected = the first expert
  answer the verifier rejects (the domain's own expert first). answers[i][domain] = expert i's
  greedy (tokens, lengths) on examples[domain]."""
  prompts, chosen, rejected, domain, expert_of = [], [], [], [], []
  for d, (dom, exs) in enumerate(examples.items()):
    order = sorted(range(len(answers)), key=lambda i: i != d)
    for j, ex in enumerate(exs):
      for i in order:
        toks, lens = answers[i][dom]
        reply = [int(t) for t in toks[j][: int(lens[j])]]
        text = tok.decode(reply)
        if rgd.score(ex['task'], text, ex, binary=True) < 1.0:
          if not reply or reply[-1] != tok.eos_id:
            reply = [*reply, tok.eos_id]
          prompt, gold = prompt_ids(tok, ex), reply_ids(tok, ex['answer'])
          if len(prompt) > prompt_len or max(len(gold), len(reply)) > response_len:
            break  # filtered, never truncated (a cut reply is another answer)
          prompts.append(prompt)
          chosen.append(gold)
          rejected.append(reply)
          domain.append(d)
          expert_of.append(i)
          break
  if not prompts:
    raise ValueError('every expert answered every pair prompt correctly: no preference pairs')
  out = scoring.pad_pairs(
    prompts, chosen, rejected, prompt_len=prompt_len, response_len=response_len, pad_id=PAD
  )
  out['domain'] = np.asarray(domain, np.int32)
  out['expert'] = np.asarray(expert_of, np.int32)
  return out


# ---------------------------------------------------------------------------------------------------
# The launcher's arm (config.experts.source == SOURCE).


def decoder_config(dtype: str = 'float32') -> decoder.DecoderConfig:
  """SmolLM2-135M-Instruct's shapes (the router LM and every expert)."""
  return loader.load_config(ASSET, dtype=dtype)


@dataclasses.dataclass
class Experts:
  """The arm's experts as host parameter dicts, read as experts.Experts is by `train` and
  `evaluate`: `base` = SmolLM2-135M-Instruct (the merges' common base and the router's 'base'
  init), `experts` = (math, string, general) in EXPERTS order, general being the base itself."""

  base: dict
  experts: list[dict]
  key: str

  def decoders(self, dtype: str = 'float32') -> list[decoder.Decoder]:
    cfg = decoder_config(dtype)
    return [experts_lib.decoder_from(cfg, p) for p in self.experts]


def load_experts(config: ml_collections.ConfigDict, log: Callable = logging.info) -> Experts:
  """SmolLM2 and its two merged LoRA experts (adapters trained on first use, then cached)."""
  specs = expert_specs(config)
  merged = {name: expert(spec, log)[0] for name, spec in specs.items()}
  model, _ = pretrained()
  base = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  params = {**merged, 'general': base}
  key = hashlib.sha256('|'.join(s.key() for s in specs.values()).encode()).hexdigest()[:20]
  return Experts(base=base, experts=[params[e] for e in EXPERTS], key=key)


@functools.lru_cache(maxsize=1)
def tokenizer():
  return loader.load_tokenizer(ASSET)


@functools.lru_cache(maxsize=4)
def _examples(seed: int) -> dict[str, dict[str, list[dict]]]:
  return load_examples(TRAIN_EXAMPLES, TEST_EXAMPLES, seed)


def is_source(config: ml_collections.ConfigDict) -> bool:
  """Whether a FusionRoute config runs this arm (config.experts.source)."""
  return config.experts.source == SOURCE


@functools.lru_cache(maxsize=4)
def _router_examples(seed: int, expert_seeds: tuple[int, ...]) -> dict[str, list[dict]]:
  trained = {
    ex['question'] for s in expert_seeds for d in DOMAINS for ex in _examples(s)[d]['train']
  }
  evaluated = {ex['question'] for d in DOMAINS for ex in _examples(seed)[d]['test']}
  held = trained | evaluated
  out = {}
  for dom in DOMAINS:
    fresh = []
    for ex in _examples(ROUTER_SEED + seed)[dom]['train']:
      if ex['question'] not in held:
        held.add(ex['question'])
        fresh.append(ex)
    out[dom] = fresh
  return out


def router_examples(config: ml_collections.ConfigDict) -> dict[str, list[dict]]:
  """{domain: the router's questions}: reasoning-gym train questions of seed ROUTER_SEED +
  data.seed, in order, without repeats and without any question the experts trained on or the
  evaluation holds out (so pairs and SFT rows are disjoint from both and from each other)."""
  seeds = tuple(sorted({spec.seed for spec in expert_specs(config).values()}))
  return _router_examples(config.data.seed, seeds)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The arm's data keys, one line per problem (before a run creates its workdir)."""
  missing = [
    f'{group}.{key}'
    for group, key in (('experts', 'lora_steps'), ('data', 'seq_len'), ('data', 'max_new_tokens'))
    if key not in config[group]
  ]
  if missing:
    raise config_lib.ConfigError(
      f'experts.source={SOURCE!r} needs {", ".join(missing)}: start from the smollm2 variant '
      '(configs/base.py:smollm2)'
    )
  d = config.data
  problems = []
  if d.flaw != 'none':
    problems.append(f"data.flaw={d.flaw!r}: the SmolLM2 experts have no planted flaw; use 'none'")
  if d.max_new_tokens < 1 or d.seq_len < 1:
    problems.append(
      f'data.max_new_tokens={d.max_new_tokens} and data.seq_len={d.seq_len} must be >= 1'
    )
  if problems:
    raise config_lib.ConfigError('; '.join(problems))
  expert_specs(config)
  test = _examples(d.seed)
  short = {
    dom: len(test[dom]['test']) for dom in DOMAINS if len(test[dom]['test']) < d.eval_per_domain
  }
  if short:
    raise config_lib.ConfigError(
      f'data.eval_per_domain={d.eval_per_domain} exceeds the held-out questions of {short}'
    )
  router = router_examples(config)
  few = {dom: len(router[dom]) for dom in DOMAINS if len(router[dom]) <= d.pair_prompts}
  if few:
    raise config_lib.ConfigError(
      f'data.pair_prompts={d.pair_prompts} leaves no SFT rows of the router questions {few}'
    )
  # Rows longer than seq_len are dropped (and logged); a domain left with none is an error now,
  # not an empty SFT source or held-out loss once the experts are loaded.
  tok, held_out = tokenizer(), eval_problems(config)
  shortest = {
    f'{what} {dom}': min(row_lengths(tok, exs))
    for i, dom in enumerate(DOMAINS)
    for what, exs in (
      ('SFT', router[dom][d.pair_prompts :]),
      ('held-out', [p for p in held_out if p['domain'] == i]),
    )
  }
  over = {k: n for k, n in shortest.items() if n > d.seq_len}
  if over:
    raise config_lib.ConfigError(
      f'data.seq_len={d.seq_len} is shorter than every row of {over} (shortest, in tokens)'
    )


class SFTSource:
  """The router's training rows: item g is a row of domain g % 3 (balanced), each domain's rows
  visited in a fresh order every epoch (a seeded permutation per domain and epoch), so item g is
  a function of (seed, g) only and a resumed run reads the same rows."""

  def __init__(self, rows: Sequence[Sequence[dict]], seed: int):
    if any(not r for r in rows):
      raise ValueError('a domain has no SFT rows')
    self.rows, self.seed = [list(r) for r in rows], seed

  def __len__(self) -> int:
    return 1 << 40

  @functools.lru_cache(maxsize=8)  # noqa: B019 - a few epochs' permutations, per source
  def _order(self, domain: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, 0x5F7, domain, epoch]).permutation(
      len(self.rows[domain])
    )

  def __getitem__(self, g: int) -> dict[str, np.ndarray]:
    g = int(g)
    dom = g % len(self.rows)
    epoch, pos = divmod(g // len(self.rows), len(self.rows[dom]))
    return self.rows[dom][int(self._order(dom, epoch)[pos])]


def sft_source(config: ml_collections.ConfigDict) -> SFTSource:
  """Balanced rows of every domain's router questions past the first data.pair_prompts."""
  d, tok = config.data, tokenizer()
  router = router_examples(config)
  rows = [
    domain_rows(tok, router[dom][d.pair_prompts :], i, d.seq_len) for i, dom in enumerate(DOMAINS)
  ]
  return SFTSource(rows, ip.router_seed(config))


def eval_problems(config: ml_collections.ConfigDict) -> list[dict]:
  """data.eval_per_domain held-out questions of each domain, domain-major (with 'domain' set)."""
  data = _examples(config.data.seed)
  return [
    {**ex, 'domain': i}
    for i, dom in enumerate(DOMAINS)
    for ex in data[dom]['test'][: config.data.eval_per_domain]
  ]


def eval_rows(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """SFT rows of the held-out questions (the router LM's held-out loss)."""
  tok, problems = tokenizer(), eval_problems(config)
  rows = []
  for i in range(len(DOMAINS)):
    rows += domain_rows(tok, [p for p in problems if p['domain'] == i], i, config.data.seq_len)
  return stack(rows)


def preference_pairs(config: ml_collections.ConfigDict, ex: Experts) -> dict[str, np.ndarray]:
  """`pairs` over the first data.pair_prompts train questions of each domain, from every expert's
  greedy answers (data.max_new_tokens), cached under the experts' key; 'flaw' is all False."""
  d, tok = config.data, tokenizer()
  router = router_examples(config)
  examples = {dom: router[dom][: d.pair_prompts] for dom in DOMAINS}
  parts = [preference_pairs, pairs, greedy, prompt_ids, reply_ids, score, rgd.score]
  parts += [scoring.pad_pairs, _router_examples, load_examples, task_specs]
  src = ''.join(inspect.getsource(p) for p in parts)
  settings = [ex.key, d.seed, d.pair_prompts, d.max_new_tokens, config.eval.batch_size]
  settings += [PROMPT_LEN, EXPERTS, DOMAINS, ROUTER_SEED, SYSTEM]
  key = hashlib.sha256(f'{settings}|{src}'.encode()).hexdigest()[:20]
  path = cache.cache_dir('fusionroute', 'smollm2_pairs') / f'{key}.npz'

  def compute():
    answers = []
    for name, model in zip(EXPERTS, ex.decoders(), strict=True):
      t0 = time.perf_counter()
      answers.append(
        {
          dom: greedy(
            model, prompts_of(tok, exs), d.max_new_tokens, tok.eos_id, config.eval.batch_size
          )
          for dom, exs in examples.items()
        }
      )
      logging.info('pair answers of the %s expert: %.0f s', name, time.perf_counter() - t0)
    out = pairs(tok, examples, answers, PROMPT_LEN, d.max_new_tokens + 1)
    out['flaw'] = np.zeros(len(out['domain']), bool)
    return out

  return cache.load_or_compute(path, compute)
