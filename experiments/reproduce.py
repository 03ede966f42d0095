"""The claims suite: re-measures every paper's registered claims and writes reports/claims.md + plots.

    python -m experiments.reproduce --suite=smoke [--only=lm_pretrain[/claim],...] [--out=reports]
    python -m experiments.reproduce --suite=full [--workdir_root=DIR]

Why a registry rather than ad-hoc scripts: a paper counts as reproduced here only when one command,
on a clean checkout, re-measures what the paper says and puts our number, the paper's, the verdict,
the command and the commit side by side. Each paper declares its claims in
`experiments/<p>/claims.py` as `CLAIMS = [reproduce.Claim(...), ...]` (optionally `TITLE = '...'`);
this module discovers those files, runs them and renders the table. It is the one module allowed to
import across experiments/ and projects/ (tests/repo_test.py).

Two kinds of claim (../shared/docs/architecture.md, "Claims and the reproduction suite"):
  * invariant: exact properties of the code (bitwise resume, sharded == unsharded within tolerance).
    A violation makes the suite exit non-zero.
  * empirical: a number measured over seeds, summarised as mean and spread and labelled supported /
    not supported / inconclusive by the rule declared with the claim, before it runs. Empirical
    claims never fail the suite, so nobody is tempted to tune them until they pass.
A claim that crashes is reported as verdict 'error' with a one-line reason; the other claims still
run and the suite exits non-zero.

Suites: `smoke` uses tiny models (about 5 minutes per paper, 30 in all on 2 cores) and starts its
workdirs afresh; `full` runs the claims' full configs (their budgets are stated in the config
docstrings) in workdirs kept under --workdir_root per commit, so an interrupted run resumes where it
stopped. Results of every run are merged into `<out>/claims.json` (rows of other suites and of papers
not selected by --only are kept) and `<out>/claims.md` is rendered from it, with plots under
`<out>/plots/`. Exit codes: 0 all invariants hold and nothing crashed; 1 otherwise; 2 bad usage.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import datetime
import importlib
import json
import math
import os
import pathlib
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from typing import Any

from common import assets
from common import machine

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUITES = ('smoke', 'full')
INVARIANT = 'invariant'
EMPIRICAL = 'empirical'
# Verdict labels.
HOLDS, VIOLATED = 'holds', 'violated'
SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = 'supported', 'not supported', 'inconclusive'
ERROR = 'error'
FAILING = (VIOLATED, ERROR)
# Wall-time budgets (seconds) from the architecture doc; exceeding one is reported, not fatal.
BUDGET_PER_PAPER = {'smoke': 5 * 60}
SMOKE_ASSET_LIMIT = 10_000_000  # bytes: small data assets only, never model weights
BUDGET_TOTAL = {'smoke': 30 * 60}


# ---------------------------------------------------------------------------------------------------
# What a claim returns.


@dataclasses.dataclass
class Plot:
  """An optional figure for a claim: named curves (x, y) and horizontal reference lines."""

  title: str
  xlabel: str
  ylabel: str
  curves: Mapping[str, tuple[Sequence[float], Sequence[float]]] = dataclasses.field(
    default_factory=dict
  )
  hlines: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Measurement:
  """What a claim's function measured: one number per seed (or per run), keyed by a label.

  values: e.g. {'seed=0': -0.29, 'seed=1': -0.30}; an invariant usually measures one run.
  detail: one line of context shown with the result (baselines, what was compared).
  plot: drawn into <out>/plots/ and linked from the report.
  """

  values: Mapping[str, float]
  detail: str = ''
  plot: Plot | None = None


# ---------------------------------------------------------------------------------------------------
# Verdict rules, declared with the claim before it runs.

# Two-sided 95% Student-t quantiles by degrees of freedom (scipy.stats.t.ppf(0.975, df)).
_T975 = {
  1: 12.706,
  2: 4.303,
  3: 3.182,
  4: 2.776,
  5: 2.571,
  6: 2.447,
  7: 2.365,
  8: 2.306,
  9: 2.262,
  10: 2.228,
  15: 2.131,
  20: 2.086,
  30: 2.042,
}


def t_quantile_975(df: int) -> float:
  """The 97.5% t quantile; between tabulated df the next smaller df (a slightly wider interval)."""
  if df < 1:
    raise ValueError('need at least 2 values for a t interval')
  if df > 30:
    return 1.96
  return _T975[max(k for k in _T975 if k <= df)]


@dataclasses.dataclass(frozen=True)
class Summary:
  n: int
  mean: float
  spread: float  # half-width of the 95% t interval of the mean (nan for n < 2)
  low: float  # smallest value
  high: float  # largest value


def summarize(values: Sequence[float]) -> Summary:
  xs = [float(v) for v in values]
  if not xs:
    raise ValueError('no values')
  n, mean = len(xs), math.fsum(xs) / len(xs)
  # By hand, not statistics.stdev, so a NaN propagates instead of raising.
  sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
  spread = t_quantile_975(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
  return Summary(n, mean, spread, min(xs), max(xs))


@dataclasses.dataclass(frozen=True)
class Verdict:
  label: str
  reason: str


@dataclasses.dataclass(frozen=True)
class AllWithin:
  """Invariant rule: every measured value v satisfies |v| <= tol (tol=0: exact)."""

  tol: float = 0.0
  kind = INVARIANT

  def describe(self) -> str:
    return 'every value == 0 (exact)' if self.tol == 0 else f'every |value| <= {self.tol:g}'

  def verdict(self, values: Sequence[float]) -> Verdict:
    if not values:
      return Verdict(VIOLATED, 'nothing was measured')
    bad = [v for v in values if not abs(v) <= self.tol]  # NaN is bad too
    if bad:
      return Verdict(VIOLATED, f'{len(bad)} of {len(values)} values outside: {bad[0]:.3g}')
    return Verdict(HOLDS, self.describe())


@dataclasses.dataclass(frozen=True)
class MeanBelow:
  """Empirical rule: the claim is that the mean is below `threshold` (MeanAbove: above).

  supported: the whole 95% t interval of the mean lies on the claimed side; not supported: it lies
  wholly on the other side; inconclusive: it contains the threshold, or fewer than 2 values.
  """

  threshold: float
  kind = EMPIRICAL
  below = True

  def describe(self) -> str:
    side = '<' if self.below else '>'
    return f'95% t interval of the mean {side} {self.threshold:g}'

  def verdict(self, values: Sequence[float]) -> Verdict:
    if len(values) < 2:
      return Verdict(INCONCLUSIVE, f'{len(values)} value(s): no interval')
    s = summarize(values)
    lo, hi = s.mean - s.spread, s.mean + s.spread
    if not (math.isfinite(lo) and math.isfinite(hi)):
      return Verdict(INCONCLUSIVE, 'non-finite values')
    claimed, opposite = (hi < self.threshold, lo > self.threshold)
    if not self.below:
      claimed, opposite = opposite, claimed
    interval = f'[{lo:.4g}, {hi:.4g}] vs {self.threshold:g}'
    if claimed:
      return Verdict(SUPPORTED, interval)
    if opposite:
      return Verdict(NOT_SUPPORTED, interval)
    return Verdict(INCONCLUSIVE, f'{interval}: interval contains the threshold')


@dataclasses.dataclass(frozen=True)
class MeanAbove(MeanBelow):
  below = False


Rule = AllWithin | MeanBelow


# ---------------------------------------------------------------------------------------------------
# Claims.

Measure = Callable[[str, pathlib.Path], Measurement]


@dataclasses.dataclass(frozen=True)
class Claim:
  """One registered claim.

  name: short identifier, unique within the paper (used by --only=paper/name).
  kind: INVARIANT or EMPIRICAL; must match the rule's kind.
  paper_figure: what the paper states (text, with its table/figure number), or 'n/a' and why.
  measure: measure(suite, workdir_root) -> Measurement. workdir_root is the paper's directory for
    this suite (shared by its claims, so they may share runs); for the full suite it persists, so
    re-running resumes. The function picks its configs from the suite name.
  rule: AllWithin for invariants; MeanBelow / MeanAbove for empirical claims.
  command: the command that reproduces the row; '{suite}' is replaced. Default: this suite, --only.
  unit: shown after the numbers.
  suites: the suites the claim belongs to.
  assets: {suite: asset names} the claim needs there; fetched (and said so) before it runs, so
    the suite works on a fresh machine. The smoke suite takes only assets under
    SMOKE_ASSET_LIMIT bytes (small data sets, never model weights).
  """

  name: str
  kind: str
  paper_figure: str
  measure: Measure
  rule: Rule
  command: str = ''
  unit: str = ''
  suites: tuple[str, ...] = SUITES
  assets: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.kind not in (INVARIANT, EMPIRICAL):
      raise ValueError(f'claim {self.name}: kind must be {INVARIANT!r} or {EMPIRICAL!r}')
    if self.rule.kind != self.kind:
      raise ValueError(
        f'claim {self.name}: a {self.kind} claim needs a {self.kind} rule, '
        f'got {type(self.rule).__name__}'
      )
    if not self.name or '/' in self.name or ',' in self.name:
      raise ValueError(f'bad claim name {self.name!r}')
    unknown = set(self.suites) - set(SUITES)
    if unknown:
      raise ValueError(f'claim {self.name}: unknown suites {sorted(unknown)}')
    unknown = set(self.assets) - set(self.suites)
    if unknown:
      raise ValueError(f'claim {self.name}: assets for suites it is not in: {sorted(unknown)}')


@dataclasses.dataclass(frozen=True)
class Paper:
  name: str  # the experiments/<name> directory
  title: str
  claims: tuple[Claim, ...]


def discover(root: pathlib.Path = ROOT) -> list[Paper]:
  """Imports every experiments/<p>/claims.py (sorted by name) and reads its CLAIMS list."""
  papers = []
  for path in sorted((root / 'experiments').glob('*/claims.py')):
    name = path.parent.name
    module = importlib.import_module(f'experiments.{name}.claims')
    claims = tuple(getattr(module, 'CLAIMS', ()))
    names = [c.name for c in claims]
    if len(set(names)) != len(names):
      raise ValueError(f'{path}: duplicate claim names {names}')
    papers.append(Paper(name, getattr(module, 'TITLE', name), claims))
  return papers


def select(papers: Sequence[Paper], only: str, suite: str) -> list[tuple[Paper, list[Claim]]]:
  """The (paper, claims) to run: --only is a comma list of 'paper' or 'paper/claim'."""
  wanted = [w.strip() for w in only.split(',') if w.strip()] if only else []
  known = {p.name: p for p in papers}
  for w in wanted:
    paper, _, claim = w.partition('/')
    if paper not in known:
      raise UsageError(f'--only: no paper {paper!r}; known: {", ".join(sorted(known)) or "none"}')
    if claim and claim not in {c.name for c in known[paper].claims}:
      names = ', '.join(c.name for c in known[paper].claims)
      raise UsageError(f'--only: paper {paper!r} has no claim {claim!r}; it has: {names}')
  out = []
  for p in papers:
    claims = [c for c in p.claims if suite in c.suites]
    if wanted:
      claims = [c for c in claims if p.name in wanted or f'{p.name}/{c.name}' in wanted]
    if claims:
      out.append((p, claims))
  return out


class UsageError(Exception):
  pass


# ---------------------------------------------------------------------------------------------------
# The shared invariant claims: every paper's runs resume bitwise and shard like one device.
#
# Both need fresh processes (a SIGKILL, a different device count), launched exactly as a user would:
# `python -m experiments.<paper>.main --config=FILE:ARG --workdir=DIR`. A paper declares its
# launcher once and adds `*reproduce.invariant_claims(launcher, ...)` to its CLAIMS.


@dataclasses.dataclass(frozen=True)
class Launcher:
  """How a paper's invariant runs start: its main module, config file and smoke arguments."""

  paper: str  # experiments/<paper>/main.py
  config: str  # experiments/<paper>/configs/<file>.py
  args: tuple[str, ...]  # variant and overrides of every invariant run, e.g. ('smoke', 'seed=0')
  timeout_s: int = 900

  def launch(self, workdir: pathlib.Path, *extra: str, devices: int = 1):
    """`python -m experiments.<paper>.main` in a fresh process with `devices` CPU devices."""
    flags = [
      f
      for f in os.environ.get('XLA_FLAGS', '').split()
      if not f.startswith('--xla_force_host_platform_device_count')
    ]
    env = {
      **os.environ,
      'JAX_PLATFORMS': 'cpu',
      'XLA_FLAGS': ' '.join([*flags, f'--xla_force_host_platform_device_count={devices}']),
    }
    arg = ','.join(self.args + extra)
    cmd = [
      sys.executable,
      '-m',
      f'experiments.{self.paper}.main',
      f'--config={self.config}:{arg}',
      f'--workdir={workdir}',
    ]
    return subprocess.run(
      cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=self.timeout_s, check=False
    )

  def ensure(self, workdir: pathlib.Path, *extra: str, devices: int = 1) -> pathlib.Path:
    """A finished run in `workdir` (reused when results.json is there: claims share runs)."""
    if not (workdir / 'results.json').is_file():
      p = self.launch(workdir, *extra, devices=devices)
      if p.returncode != 0:
        raise RuntimeError(f'run in {workdir.name} exited {p.returncode}: {last_line(p)}')
    return workdir


def last_line(p: subprocess.CompletedProcess) -> str:
  lines = (p.stderr or p.stdout or '').strip().splitlines()
  return lines[-1][:200] if lines else ''


def count_differences(a: Any, b: Any) -> tuple[int, int]:
  """(leaves that differ bitwise or in presence, leaves compared) of two JSON trees."""
  if isinstance(a, dict) and isinstance(b, dict):
    pairs = [count_differences(a.get(k), b.get(k)) for k in sorted(set(a) | set(b))]
    return sum(d for d, _ in pairs), sum(n for _, n in pairs)
  if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
    pairs = [count_differences(x, y) for x, y in zip(a, b, strict=True)]
    return sum(d for d, _ in pairs), sum(n for _, n in pairs)
  return int(type(a) is not type(b) or a != b), 1


def _jsonl(path: pathlib.Path) -> list[dict]:
  """metrics.jsonl lines without their wall-clock stamp (common.metrics.WALL_CLOCK; not imported
  here so that JAX starts only after setup_jax_environment)."""
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [{k: v for k, v in r.items() if k != 'time'} for r in rows]


def _curve(rows: Sequence[Mapping], split: str = 'train', key: str = 'loss'):
  picked = [(r['step'], r[key]) for r in rows if r.get('split') == split and key in r]
  return [s for s, _ in picked], [v for _, v in picked]


def _max_rel(a: Sequence[float], b: Sequence[float]) -> float:
  if len(a) != len(b) or not a:
    raise ValueError(f'cannot compare {len(a)} with {len(b)} values')
  return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b, strict=True))


def invariant_claims(
  launcher: Launcher,
  *,
  kill_after_step: int,
  sharded_mesh: tuple[str, ...] = ('mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2'),
  first_steps: int = 5,
  first_rtol: float = 1e-5,
  final_rtol: float | None = None,
  final_splits: tuple[str, ...] = ('train', 'eval'),
  ignore_keys: tuple[str, ...] = (),
) -> list[Claim]:
  """The architecture doc's invariants as claims, on `launcher`'s smoke runs in both suites (they
  are properties of the code, not of scale):

    resume_bitwise: a run SIGKILLed right after step `kill_after_step` (between checkpoints) and
      resumed with the same command writes exactly the uninterrupted run's metrics.jsonl and
      results.json (values differing, must be 0; `ignore_keys`: wall-clock speeds).
    sharded_first_steps: 8 devices (`sharded_mesh`) vs 1 device, the first `first_steps` per-step
      train losses to `first_rtol` relative (the launcher's args must log every step).
    sharded_final_loss (when `final_rtol`): the final losses of `final_splits` to `final_rtol`
      (Adam amplifies rounding differences over a run).
  """
  name = launcher.paper

  def run(root, label, *extra, devices=1):
    return launcher.ensure(root / label, *extra, devices=devices)

  def rows(workdir):
    return [
      {k: v for k, v in r.items() if k not in ignore_keys}
      for r in _jsonl(workdir / 'metrics.jsonl')
    ]

  def results(workdir):
    res = json.loads((workdir / 'results.json').read_text())
    return {k: {m: v for m, v in res[k].items() if m not in ignore_keys} for k in ('train', 'eval')}

  def measure_resume(suite, root):
    del suite
    ref = run(root, 'invariant_1dev')
    workdir = root / 'invariant_killed'
    if not (workdir / 'results.json').is_file():
      killed = launcher.launch(workdir, f'debug.kill_after_step={kill_after_step}')
      if killed.returncode != -signal.SIGKILL:
        raise RuntimeError(f'expected SIGKILL after step {kill_after_step}: {last_line(killed)}')
      logged = max((r['step'] for r in _jsonl(workdir / 'metrics.jsonl')), default=0)
      if logged != kill_after_step:
        raise RuntimeError(f'the killed run logged up to step {logged}, not {kill_after_step}')
      launcher.ensure(workdir)  # the same command again: resumes from the last checkpoint
    diff, compared = count_differences(
      {'metrics': rows(ref), 'results': results(ref)},
      {'metrics': rows(workdir), 'results': results(workdir)},
    )
    detail = (
      f'{compared} values compared (every metrics.jsonl line and results.json train/eval'
      f'{", speeds excluded" if ignore_keys else ""}); the run was SIGKILLed after step '
      f'{kill_after_step} and resumed from its last checkpoint.'
    )
    plot = Plot(
      title=f'{name}: SIGKILL + resume vs uninterrupted (smoke)',
      xlabel='step',
      ylabel='train loss',
      curves={'uninterrupted': _curve(rows(ref)), 'killed + resumed': _curve(rows(workdir))},
    )
    return Measurement({'seed=0': diff}, detail, plot)

  def sharded(root):
    return run(root, 'invariant_8dev', *sharded_mesh, devices=8)

  def measure_first_steps(suite, root):
    del suite
    ref, eight = run(root, 'invariant_1dev'), sharded(root)
    a, b = _curve(rows(eight))[1][:first_steps], _curve(rows(ref))[1][:first_steps]
    plot = Plot(
      title=f'{name}: 8 devices vs 1 device (smoke)',
      xlabel='step',
      ylabel='train loss',
      curves={'1 device': _curve(rows(ref)), '8 devices': _curve(rows(eight))},
    )
    detail = f'max relative difference of the first {first_steps} per-step train losses.'
    return Measurement({'seed=0': _max_rel(a, b)}, detail, plot)

  def measure_final(suite, root):
    del suite
    ref, eight = results(run(root, 'invariant_1dev')), results(sharded(root))
    pairs = {k: (eight[k]['loss'], ref[k]['loss']) for k in final_splits}
    detail = 'max relative difference of the final losses: ' + ', '.join(
      f'{k} {a:.6f} vs {b:.6f}' for k, (a, b) in pairs.items()
    )
    return Measurement(
      {'seed=0': _max_rel([a for a, _ in pairs.values()], [b for _, b in pairs.values()])}, detail
    )

  mesh = ' x '.join(m.split('=')[1] for m in sharded_mesh)
  claims = [
    Claim(
      name='resume_bitwise',
      kind=INVARIANT,
      paper_figure='architecture doc: a killed and resumed run replays exactly',
      measure=measure_resume,
      rule=AllWithin(0.0),
      unit='values differ',
    ),
    Claim(
      name='sharded_first_steps',
      kind=INVARIANT,
      paper_figure=(
        f'architecture doc: first steps on 8 devices ({mesh}) == 1 device to {first_rtol:g}'
      ),
      measure=measure_first_steps,
      rule=AllWithin(first_rtol),
      unit='max relative difference',
    ),
  ]
  if final_rtol is not None:
    claims.append(
      Claim(
        name='sharded_final_loss',
        kind=INVARIANT,
        paper_figure=f'architecture doc: final smoke loss sharded == 1 device to {final_rtol:g}',
        measure=measure_final,
        rule=AllWithin(final_rtol),
        unit='max relative difference',
      )
    )
  return claims


# ---------------------------------------------------------------------------------------------------
# Running.


@dataclasses.dataclass
class Row:
  """One claim's result as stored in claims.json and rendered in claims.md."""

  suite: str
  paper: str
  paper_title: str
  claim: str
  kind: str
  paper_figure: str
  rule: str
  values: dict[str, float]
  verdict: str
  reason: str
  detail: str
  unit: str
  command: str
  commit: str
  wall_s: float
  date: str
  plot: str = ''

  @property
  def key(self) -> str:
    return f'{self.suite}/{self.paper}/{self.claim}'


def one_line(exc: BaseException) -> str:
  text = str(exc).strip().splitlines()
  return f'{type(exc).__name__}: {text[0] if text else ""}'.rstrip(': ')[:300]


def ensure_assets(names: Sequence[str], suite: str) -> None:
  """Fetches what a claim needs unless cached; the smoke suite refuses anything large."""
  for name in names:
    asset = assets.ASSETS.get(name)
    if asset is None:
      raise assets.AssetError(f'unknown asset {name!r}; known: {", ".join(sorted(assets.ASSETS))}')
    if suite == 'smoke' and asset.size > SMOKE_ASSET_LIMIT:
      raise assets.AssetError(
        f'the smoke suite fetches no asset over {SMOKE_ASSET_LIMIT / 1e6:.0f} MB; '
        f'{name} is {asset.size / 1e6:.1f} MB (use it in the full suite)'
      )
    if not assets.is_fetched(name):
      print(f'   fetching asset {name} ({asset.size / 1e6:.1f} MB) for this claim', flush=True)
      assets.fetch(name, log=lambda line: print(f'   {line}', flush=True))


def run_claim(
  paper: Paper,
  claim: Claim,
  suite: str,
  workdir: pathlib.Path,
  commit: str,
  plots_dir: pathlib.Path,
) -> Row:
  """Runs one claim, never raising (a crash becomes an 'error' row with a one-line reason)."""
  command = (claim.command or default_command(paper.name, claim.name)).replace('{suite}', suite)
  t0 = time.perf_counter()
  values: dict[str, float] = {}
  detail, plot_path = '', ''
  try:
    ensure_assets(claim.assets.get(suite, ()), suite)
    m = claim.measure(suite, workdir)
    if not isinstance(m, Measurement):
      raise TypeError(f'measure returned {type(m).__name__}, not Measurement')
    values = {str(k): float(v) for k, v in m.values.items()}
    detail = m.detail
    verdict = claim.rule.verdict(list(values.values()))
  except Exception as e:  # noqa: BLE001 - a crash is reported as the claim's result
    traceback.print_exc()
    verdict, m = Verdict(ERROR, one_line(e)), None
  if m is not None and m.plot is not None:
    try:  # a figure that fails to draw loses the figure, not the measurement
      plot_path = str(draw(m.plot, plots_dir / f'{suite}-{paper.name}-{claim.name}.png'))
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      detail = f'{detail} (plot failed: {one_line(e)})'.strip()
  return Row(
    suite=suite,
    paper=paper.name,
    paper_title=paper.title,
    claim=claim.name,
    kind=claim.kind,
    paper_figure=claim.paper_figure,
    rule=claim.rule.describe(),
    values=values,
    verdict=verdict.label,
    reason=verdict.reason,
    detail=detail,
    unit=claim.unit,
    command=command,
    commit=commit,
    wall_s=round(time.perf_counter() - t0, 1),
    date=datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC'),
    plot=plot_path,
  )


def default_command(paper: str, claim: str) -> str:
  return f'python -m experiments.reproduce --suite={{suite}} --only={paper}/{claim}'


def draw(plot: Plot, path: pathlib.Path) -> pathlib.Path:
  """Renders a Plot to PNG (matplotlib's Agg backend: no display needed)."""
  import matplotlib  # noqa: PLC0415 - heavy, and only needed when a claim plots

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  path.parent.mkdir(parents=True, exist_ok=True)
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for label, (xs, ys) in plot.curves.items():
    ax.plot(list(xs), list(ys), label=label, marker='.' if len(xs) < 30 else None)
  for i, (label, y) in enumerate(plot.hlines.items()):
    ax.axhline(y, linestyle='--', color=f'C{(len(plot.curves) + i) % 10}', label=label)
  ax.set(title=plot.title, xlabel=plot.xlabel, ylabel=plot.ylabel)
  ax.grid(alpha=0.3)
  if plot.curves or plot.hlines:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, metadata={'Software': None})  # no version stamp: plots diff only on data
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------------------------------
# Rendering.


def _num(x: float) -> str:
  if x == 0 or not math.isfinite(x):
    return f'{x:g}'
  return f'{x:.4g}' if 1e-3 <= abs(x) < 1e5 else f'{x:.2e}'


def format_ours(row: Row) -> str:
  """Empirical: 'mean ± spread (n=3, range lo..hi)'; invariant: the value(s) exactly."""
  unit = f' {row.unit}' if row.unit else ''
  if row.verdict == ERROR and not row.values:
    return '-'
  vals = list(row.values.values())
  if row.kind == EMPIRICAL:
    s = summarize(vals)
    if s.n == 1:
      return f'{_num(s.mean)}{unit} (n=1)'
    return f'{_num(s.mean)} ± {_num(s.spread)}{unit} (n={s.n}, range {_num(s.low)}..{_num(s.high)})'
  if len(vals) == 1:
    return f'{_exact(vals[0])}{unit}'
  return ', '.join(f'{k}: {_exact(v)}' for k, v in row.values.items()) + unit


def _exact(x: float) -> str:
  """Every digit of an invariant's value (repr round-trips), counts without a '.0'."""
  return str(int(x)) if math.isfinite(x) and x.is_integer() and abs(x) < 1e15 else repr(x)


def _cell(text: str) -> str:
  return text.replace('|', '\\|').replace('\n', ' ')


def render(rows: Sequence[Row], runs: Mapping[str, Mapping[str, Any]]) -> str:
  """claims.md: per suite, a table of every claim, then the details (per-seed values, plots)."""
  lines = [
    '# Claims',
    '',
    'Written by `python -m experiments.reproduce` (do not edit by hand; re-run it). Verdicts: an '
    '*invariant* holds or is violated (a violation fails the suite); an *empirical* claim is '
    'supported / not supported / inconclusive by the rule declared with it (mean ± half-width of '
    'the 95% t interval over seeds), never failing the suite; *error*: the claim crashed. '
    '*wall s* is the claim\'s own time: a run shared by several claims counts for the first.',
    '',
  ]
  for suite in ('full', 'smoke'):  # the full suite's results are the headline
    # By paper; within a paper, in registration order (rows are stored in that order).
    srows = sorted((r for r in rows if r.suite == suite), key=lambda r: r.paper)
    if not srows:
      continue
    run = runs.get(suite, {})
    lines += [f'## Suite `{suite}`', '']
    if run:
      lines += [
        f'Last run: {run.get("date", "?")}, commit `{run.get("commit", "?")}`, '
        f'`{run.get("command", "")}`: {run.get("wall_s", 0):.0f} s wall, '
        f'{run.get("cpu_s", 0):.0f} s CPU, on {run.get("machine", "?")} '
        f'(load average {run.get("load_avg", "?")}).'
        + (f' **{run["budget_note"]}**' if run.get('budget_note') else ''),
        '',
      ]
    lines += _paper_runs_table(run.get('papers', {}), BUDGET_PER_PAPER.get(suite))
    lines += [
      '| paper | claim | kind | paper\'s figure | ours | verdict | rule | wall s | command '
      '| commit |',
      '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in srows:
      verdict = f'**{r.verdict}**' if r.verdict in FAILING else r.verdict
      if r.verdict == ERROR:
        verdict += f': {r.reason}'
      lines.append(
        '| '
        + ' | '.join(
          _cell(x)
          for x in (
            r.paper,
            r.claim,
            r.kind,
            r.paper_figure,
            format_ours(r),
            verdict,
            r.rule,
            f'{r.wall_s:.0f}',
            f'`{r.command}`',
            f'`{r.commit}`',
          )
        )
        + ' |'
      )
    lines += ['', f'### Details (`{suite}`)', '']
    for r in srows:
      values = ', '.join(f'{k}: {_exact(v)}' for k, v in r.values.items()) or '-'
      lines.append(f'- **{r.paper}/{r.claim}** ({r.verdict}: {r.reason}). Values: {values}.')
      if r.detail:
        lines.append(f'  {r.detail}')
      if r.plot:
        lines.append(f'  ![{r.paper}/{r.claim}]({r.plot})')
    lines.append('')
  return '\n'.join(lines).rstrip() + '\n'


def _paper_runs_table(papers: Mapping[str, Mapping[str, Any]], budget: float | None) -> list[str]:
  """Which run last produced each paper's rows: a `--only` run updates only its papers' lines.

  The "Last run" line above describes the latest invocation alone; with `--only` re-runs the rows
  come from several invocations, and this table says for each paper when, at which commit and at
  what cost (wall and CPU seconds, load average) its claims last ran.
  """
  if not papers:
    return []
  lines = [
    '| paper | claims run | last run | commit | wall s | CPU s | load average | command |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for name in sorted(papers):
    p = papers[name]
    wall = f'{p.get("wall_s", 0):.0f}'
    if budget and p.get('wall_s', 0) > budget:
      wall = f'**{wall}** (budget {budget:.0f})'
    cells = (
      name,
      p.get('claims', '?'),
      p.get('date', '?'),
      f'`{p.get("commit", "?")}`',
      wall,
      f'{p.get("cpu_s", 0):.0f}',
      str(p.get('load_avg', '?')),
      f'`{p.get("command", "")}`',
    )
    lines.append('| ' + ' | '.join(_cell(c) for c in cells) + ' |')
  return lines + ['']


def load_rows(path: pathlib.Path) -> tuple[list[Row], dict]:
  if not path.exists():
    return [], {}
  data = json.loads(path.read_text())
  fields = {f.name for f in dataclasses.fields(Row)}
  rows = [Row(**{k: v for k, v in r.items() if k in fields}) for r in data.get('rows', [])]
  return rows, data.get('runs', {})


def merge(old: Sequence[Row], new: Sequence[Row], complete: set[tuple[str, str]]) -> list[Row]:
  """Old rows updated with the new ones.

  A re-run claim replaces its row; a (suite, paper) in `complete` had all its claims run, so its old
  rows for claims that no longer exist are dropped too. Everything else is kept (other suites, papers
  not selected by --only).
  """
  fresh = {r.key: r for r in new}
  out = [fresh.pop(r.key, r) for r in old if (r.suite, r.paper) not in complete]
  return out + [r for r in new if r.key in fresh]  # in place when re-run alone, else appended


def write_report(
  out: pathlib.Path,
  new: Sequence[Row],
  suite: str,
  run: Mapping[str, Any],
  complete: set[tuple[str, str]] = frozenset(),
) -> None:
  out.mkdir(parents=True, exist_ok=True)
  old, runs = load_rows(out / 'claims.json')
  rows = merge(old, new, set(complete))
  # Per-paper records accumulate across --only runs; the rest describes this invocation.
  papers = {**runs.get(suite, {}).get('papers', {}), **run.get('papers', {})}
  runs = {**runs, suite: {**run, 'papers': papers}}
  data = {'rows': [dataclasses.asdict(r) for r in rows], 'runs': runs}
  _atomic_write(out / 'claims.json', json.dumps(data, indent=1, sort_keys=True) + '\n')
  _atomic_write(out / 'claims.md', render(rows, runs))


def _atomic_write(path: pathlib.Path, text: str) -> None:
  tmp = path.with_suffix(path.suffix + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# Environment.


def git_commit(root: pathlib.Path = ROOT, exclude: str = 'reports') -> str:
  """Short HEAD hash, with '+dirty' when tracked or untracked files (outside reports/) differ."""
  try:
    head = subprocess.run(
      ['git', 'rev-parse', '--short=12', 'HEAD'],
      cwd=root,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
    status = subprocess.run(
      ['git', 'status', '--porcelain', '--', '.', f':!{exclude}'],
      cwd=root,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'
  return head + ('+dirty' if status else '')


def cpu_seconds() -> float:
  """User + system CPU time of this process and its waited-for children."""
  own, children = (
    resource.getrusage(resource.RUSAGE_SELF),
    resource.getrusage(resource.RUSAGE_CHILDREN),
  )
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def default_cache_root() -> pathlib.Path:
  """$MONOREPO_CACHE_DIR, else ${XDG_CACHE_HOME:-~/.cache}/meta-jax-monorepo (as tests/conftest.py)."""
  return pathlib.Path(
    os.environ.get('MONOREPO_CACHE_DIR')
    or pathlib.Path(os.environ.get('XDG_CACHE_HOME', pathlib.Path.home() / '.cache'))
    / 'meta-jax-monorepo'
  )


def setup_jax_environment() -> None:
  """The persistent compilation cache, set before JAX starts (the platform is JAX's choice).

  Claims run their seeds in this process (compiled code is reused in memory) and their subprocesses
  inherit the cache, so a suite compiles each distinct step once per machine, not once per run.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(default_cache_root() / 'jax_cache'))
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')


def paper_workdir(root: pathlib.Path, suite: str, commit: str, paper: str) -> pathlib.Path:
  """smoke: <root>/smoke/<paper>, emptied per run; full: <root>/full/<commit>/<paper>, kept."""
  if suite == 'smoke':
    path = root / 'smoke' / paper
    shutil.rmtree(path, ignore_errors=True)
  else:
    path = root / 'full' / commit.replace('+', '-') / paper
  path.mkdir(parents=True, exist_ok=True)
  return path


# ---------------------------------------------------------------------------------------------------
# Entry point.


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog='python -m experiments.reproduce',
    description='Runs the papers\' registered claims and writes <out>/claims.md.',
  )
  p.add_argument('--suite', required=True, choices=SUITES)
  p.add_argument('--only', default='', help="comma list of 'paper' or 'paper/claim'")
  p.add_argument('--out', default=str(ROOT / 'reports'), help='report directory')
  p.add_argument(
    '--workdir_root',
    default='',
    help='where claims keep their runs (default: the cache dir outside the repo, reproduce/)',
  )
  p.add_argument('--list', action='store_true', help='list the selected claims and exit')
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, papers: Sequence[Paper] | None = None) -> int:
  args = parse_args(argv)
  setup_jax_environment()
  try:
    selected = select(papers if papers is not None else discover(), args.only, args.suite)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.list or not selected:
    for p, claims in selected:
      for c in claims:
        print(f'{p.name}/{c.name} ({c.kind}): {c.paper_figure}')
    if not selected:
      print(f'error: no claims registered for suite {args.suite!r}', file=sys.stderr)
      return 2
    return 0

  out = pathlib.Path(args.out)
  workdir_root = pathlib.Path(args.workdir_root or default_cache_root() / 'reproduce')
  commit = git_commit()
  command = 'python -m experiments.reproduce ' + ' '.join(
    a for a in (f'--suite={args.suite}', f'--only={args.only}' if args.only else '') if a
  )
  rows: list[Row] = []
  over: list[str] = []
  paper_runs: dict[str, dict[str, Any]] = {}
  t_suite, cpu0 = time.perf_counter(), cpu_seconds()
  for paper, claims in selected:
    workdir = paper_workdir(workdir_root, args.suite, commit, paper.name)
    print(f'== {paper.name}: {len(claims)} claim(s), workdirs in {workdir}', flush=True)
    t_paper, cpu_paper = time.perf_counter(), cpu_seconds()
    for claim in claims:
      print(f'-- {paper.name}/{claim.name} ({claim.kind}) ...', flush=True)
      row = run_claim(paper, claim, args.suite, workdir, commit, out / 'plots')
      if row.plot:
        row.plot = os.path.relpath(row.plot, out)
      rows.append(row)
      print(f'   {row.verdict}: {row.reason} | {format_ours(row)} | {row.wall_s:.1f} s', flush=True)
    paper_s = time.perf_counter() - t_paper
    paper_runs[paper.name] = {
      'command': command,
      'commit': commit,
      'date': datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC'),
      'wall_s': round(paper_s, 1),
      'cpu_s': round(cpu_seconds() - cpu_paper, 1),
      'load_avg': round(os.getloadavg()[1], 1),
      'claims': f'{len(claims)} of {sum(args.suite in c.suites for c in paper.claims)}',
    }
    budget = BUDGET_PER_PAPER.get(args.suite)
    if budget and paper_s > budget:
      over.append(f'{paper.name} took {paper_s:.0f} s (budget {budget} s)')
    print(f'== {paper.name}: {paper_s:.1f} s', flush=True)
  wall = time.perf_counter() - t_suite
  budget = BUDGET_TOTAL.get(args.suite)
  if budget and wall > budget:
    over.append(f'the suite took {wall:.0f} s (budget {budget} s)')
  run = {
    'command': command,
    'commit': commit,
    'date': datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC'),
    'wall_s': round(wall, 1),
    'machine': f'{machine.cpu()}, python {platform.python_version()}',
    # Wall time on a shared machine depends on its other load; CPU time and load average say how
    # much of a budget overrun was this suite's own work.
    'cpu_s': round(cpu_seconds() - cpu0, 1),
    'load_avg': round(os.getloadavg()[1], 1),
    'budget_note': 'Over budget: ' + '; '.join(over) if over else '',
    'papers': paper_runs,
  }
  complete = {
    (args.suite, p.name)
    for p, claims in selected
    if len(claims) == sum(args.suite in c.suites for c in p.claims)
  }
  write_report(out, rows, args.suite, run, complete)
  failing = [r for r in rows if r.verdict in FAILING]
  print(f'\nwrote {out / "claims.md"}; {len(rows)} claim(s) in {wall:.1f} s', flush=True)
  for note in over:
    print(f'warning: over budget: {note}', file=sys.stderr)
  for r in failing:
    print(f'FAILED {r.paper}/{r.claim}: {r.verdict}: {r.reason}', file=sys.stderr)
  return 1 if failing else 0


if __name__ == '__main__':
  # Run the importable module, not this __main__ copy: the claims.py files import
  # experiments.reproduce, and their Measurement must be the class main() checks against.
  from experiments import reproduce

  sys.exit(reproduce.main())
