"""Tests of the claims framework (experiments/reproduce.py) with tiny fake claims: no training.

The suite's contract is what makes its table trustworthy: verdict rules are applied as declared, a
crash becomes an 'error' row without stopping the other claims, invariant failures and crashes (and
only those) give a non-zero exit, and reports merge rather than overwrite other papers' rows.
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest

from experiments import reproduce

# ---------------------------------------------------------------------------------------------------
# Verdict rules.


def test_summary_is_mean_and_95_t_interval():
  s = reproduce.summarize([1.0, 2.0, 3.0])
  assert s.n == 3 and s.mean == 2.0 and (s.low, s.high) == (1.0, 3.0)
  assert s.spread == pytest.approx(4.303 * 1.0 / math.sqrt(3))
  assert math.isnan(reproduce.summarize([5.0]).spread)


def test_t_quantiles():
  assert reproduce.t_quantile_975(2) == 4.303
  assert reproduce.t_quantile_975(12) == 2.228  # between tabulated values: the wider one
  assert reproduce.t_quantile_975(100) == 1.96
  with pytest.raises(ValueError):
    reproduce.t_quantile_975(0)


@pytest.mark.parametrize(
  'values, label',
  [
    ([-0.30, -0.29, -0.31], reproduce.SUPPORTED),  # interval wholly below 0
    ([0.30, 0.29, 0.31], reproduce.NOT_SUPPORTED),  # wholly above
    ([-0.5, 0.1, -0.2], reproduce.INCONCLUSIVE),  # contains 0
    ([-1.0], reproduce.INCONCLUSIVE),  # one seed: no interval
    ([], reproduce.INCONCLUSIVE),
    ([float('nan'), -1.0, -1.0], reproduce.INCONCLUSIVE),
  ],
)
def test_mean_below(values, label):
  assert reproduce.MeanBelow(0.0).verdict(values).label == label


def test_mean_above_mirrors_mean_below():
  rule = reproduce.MeanAbove(1.0)
  assert rule.verdict([2.0, 2.1, 1.9]).label == reproduce.SUPPORTED
  assert rule.verdict([0.0, 0.1, -0.1]).label == reproduce.NOT_SUPPORTED
  assert rule.verdict([0.0, 2.0, 1.0]).label == reproduce.INCONCLUSIVE
  assert '>' in rule.describe() and '<' in reproduce.MeanBelow(1.0).describe()


def test_all_within():
  exact = reproduce.AllWithin(0.0)
  assert exact.verdict([0.0, 0.0]).label == reproduce.HOLDS
  assert exact.verdict([0.0, 1e-12]).label == reproduce.VIOLATED
  assert exact.verdict([]).label == reproduce.VIOLATED
  tol = reproduce.AllWithin(1e-3)
  assert tol.verdict([5e-4, -1e-3]).label == reproduce.HOLDS
  assert tol.verdict([float('nan')]).label == reproduce.VIOLATED


def _m(*values, **kw):
  return lambda suite, root: reproduce.Measurement(
    {f'seed={i}': v for i, v in enumerate(values)}, **kw
  )


def test_claim_kind_must_match_its_rule():
  with pytest.raises(ValueError, match='needs a invariant rule'):
    reproduce.Claim('x', reproduce.INVARIANT, 'p', _m(0.0), reproduce.MeanBelow(0.0))
  with pytest.raises(ValueError, match='needs a empirical rule'):
    reproduce.Claim('x', reproduce.EMPIRICAL, 'p', _m(0.0), reproduce.AllWithin())
  with pytest.raises(ValueError, match='bad claim name'):
    reproduce.Claim('a/b', reproduce.INVARIANT, 'p', _m(0.0), reproduce.AllWithin())


# ---------------------------------------------------------------------------------------------------
# Running fake papers end to end.


def _crash(suite, root):
  raise RuntimeError('boom: the run diverged\nsecond line of detail')


CALLS: list[tuple[str, pathlib.Path]] = []


def _recording(suite, root):
  CALLS.append((suite, root))
  (root / 'marker').write_text('x')
  return reproduce.Measurement(
    {'seed=0': 0.0},
    'compared 3 values',
    reproduce.Plot('t', 'step', 'loss', {'a': ([1, 2], [3.0, 2.0])}, {'base': 2.5}),
  )


def _paper(name, *claims):
  return reproduce.Paper(name, name.upper(), tuple(claims))


GOOD = _paper(
  'alpha',
  reproduce.Claim('exact', reproduce.INVARIANT, 'fig 1', _recording, reproduce.AllWithin()),
  reproduce.Claim(
    'better', reproduce.EMPIRICAL, 'Table 2: +3', _m(-0.3, -0.29, -0.31), reproduce.MeanBelow(0.0)
  ),
  reproduce.Claim(
    'worse', reproduce.EMPIRICAL, 'Table 3', _m(0.3, 0.29, 0.31), reproduce.MeanBelow(0.0)
  ),
)
BROKEN = _paper(
  'beta',
  reproduce.Claim('crashes', reproduce.EMPIRICAL, 'fig 2', _crash, reproduce.MeanBelow(0.0)),
  reproduce.Claim('after', reproduce.INVARIANT, 'fig 3', _m(0.0), reproduce.AllWithin()),
)
VIOLATED = _paper(
  'gamma',
  reproduce.Claim('off', reproduce.INVARIANT, 'fig 4', _m(0.0, 2e-3), reproduce.AllWithin(1e-3)),
)


def _run(tmp_path, papers, *args, suite='smoke'):
  out = tmp_path / 'reports'
  argv = [f'--suite={suite}', f'--out={out}', f'--workdir_root={tmp_path / "work"}', *args]
  return reproduce.main(argv, papers=papers), out


def _rows(out) -> dict[str, dict]:
  data = json.loads((out / 'claims.json').read_text())
  return {f'{r["paper"]}/{r["claim"]}': r for r in data['rows']}


def test_empirical_verdicts_never_fail_the_suite(tmp_path):
  rc, out = _run(tmp_path, [GOOD])
  assert rc == 0
  rows = _rows(out)
  assert rows['alpha/better']['verdict'] == reproduce.SUPPORTED
  assert rows['alpha/worse']['verdict'] == reproduce.NOT_SUPPORTED
  assert rows['alpha/exact']['verdict'] == reproduce.HOLDS
  md = (out / 'claims.md').read_text()
  assert (
    '| alpha | better | empirical | Table 2: +3 | -0.3 ± 0.02484 (n=3, range -0.31..-0.29)' in md
  )
  assert '| alpha | exact | invariant | fig 1 | 0 |' in md
  plot = out / rows['alpha/exact']['plot']
  assert plot.is_file() and plot.read_bytes()[:4] == b'\x89PNG'
  assert f']({rows["alpha/exact"]["plot"]})' in md  # linked relative to the report


def test_a_crash_is_an_error_row_and_the_rest_still_run(tmp_path, capsys):
  rc, out = _run(tmp_path, [BROKEN, GOOD])
  assert rc == 1
  rows = _rows(out)
  err = rows['beta/crashes']
  assert err['verdict'] == reproduce.ERROR
  assert err['reason'] == 'RuntimeError: boom: the run diverged'  # one line
  assert rows['beta/after']['verdict'] == reproduce.HOLDS
  assert rows['alpha/better']['verdict'] == reproduce.SUPPORTED
  md = (out / 'claims.md').read_text()
  assert '**error**: RuntimeError: boom: the run diverged' in md
  assert 'FAILED beta/crashes' in capsys.readouterr().err


def test_a_violated_invariant_fails_the_suite(tmp_path):
  rc, out = _run(tmp_path, [VIOLATED])
  assert rc == 1
  row = _rows(out)['gamma/off']
  assert row['verdict'] == reproduce.VIOLATED and '1 of 2 values outside' in row['reason']
  assert '| **violated** |' in (out / 'claims.md').read_text()


def test_rows_record_command_commit_and_wall_time(tmp_path):
  _, out = _run(tmp_path, [GOOD])
  row = _rows(out)['alpha/better']
  assert row['command'] == 'python -m experiments.reproduce --suite=smoke --only=alpha/better'
  assert row['commit'] and row['commit'] == reproduce.git_commit()
  assert row['wall_s'] >= 0
  data = json.loads((out / 'claims.json').read_text())
  assert data['runs']['smoke']['command'] == 'python -m experiments.reproduce --suite=smoke'


def test_only_selects_papers_and_claims_and_merges_reports(tmp_path):
  rc, out = _run(tmp_path, [GOOD, BROKEN])
  assert rc == 1
  # Re-running one claim replaces only its row; the other paper's rows stay.
  rc, out = _run(tmp_path, [GOOD, BROKEN], '--only=alpha/better')
  assert rc == 0
  rows = _rows(out)
  assert list(rows) == ['alpha/exact', 'alpha/better', 'alpha/worse', 'beta/crashes', 'beta/after']
  # A paper re-run in full drops rows of claims it no longer has.
  smaller = _paper('alpha', GOOD.claims[1])
  rc, out = _run(tmp_path, [smaller, BROKEN], '--only=alpha')
  assert set(_rows(out)) == {'alpha/better', 'beta/crashes', 'beta/after'}
  # Another suite's rows live in their own section.
  _run(tmp_path, [VIOLATED], suite='full')
  md = (out / 'claims.md').read_text()
  assert md.index('## Suite `smoke`') > md.index('## Suite `full`')
  assert '| gamma | off |' in md and '| beta | after |' in md


@pytest.mark.parametrize('only', ['nope', 'alpha/nope'])
def test_unknown_only_is_a_usage_error(tmp_path, only, capsys):
  rc, out = _run(tmp_path, [GOOD], f'--only={only}')
  assert rc == 2
  assert capsys.readouterr().err.startswith('error: --only')
  assert not (out / 'claims.md').exists()


def test_workdirs_smoke_fresh_full_persistent(tmp_path):
  CALLS.clear()
  _run(tmp_path, [GOOD], '--only=alpha/exact')
  _run(tmp_path, [GOOD], '--only=alpha/exact')
  smoke_root = CALLS[-1][1]
  assert smoke_root == tmp_path / 'work' / 'smoke' / 'alpha'
  _run(tmp_path, [GOOD], '--only=alpha/exact', suite='full')
  full_root = CALLS[-1][1]
  assert full_root.parent.parent == tmp_path / 'work' / 'full'  # .../full/<commit>/alpha
  (full_root / 'partial').write_text('a run in progress')
  (smoke_root / 'partial').write_text('stale')
  _run(tmp_path, [GOOD], '--only=alpha/exact', suite='full')
  _run(tmp_path, [GOOD], '--only=alpha/exact')
  assert (full_root / 'partial').exists()  # kept: an interrupted full run resumes
  assert not (smoke_root / 'partial').exists()  # smoke starts afresh


def test_format_ours():
  row = reproduce.Row(
    **{f: '' for f in ('suite', 'paper', 'paper_title', 'claim', 'paper_figure', 'rule')},
    **{f: '' for f in ('reason', 'detail', 'command', 'commit', 'date')},
    kind=reproduce.INVARIANT,
    values={'seed=0': 3e-7},
    verdict=reproduce.HOLDS,
    unit='rel',
    wall_s=1.0,
  )
  assert reproduce.format_ours(row) == '3e-07 rel'
  row.values = {'seed=0': 1.0, 'seed=1': 2.0}
  assert reproduce.format_ours(row) == 'seed=0: 1, seed=1: 2 rel'
  row.kind, row.values = reproduce.EMPIRICAL, {'seed=0': 1.5}
  assert reproduce.format_ours(row) == '1.5 rel (n=1)'
  row.verdict, row.values = reproduce.ERROR, {}
  assert reproduce.format_ours(row) == '-'


def test_lm_pretrain_registers_its_claims():
  papers = {p.name: p for p in reproduce.discover()}
  claims = {c.name: c for c in papers['lm_pretrain'].claims}
  assert claims['eval_beats_unigram'].kind == reproduce.EMPIRICAL
  for name in ('resume_bitwise', 'sharded_first_steps', 'sharded_final_loss'):
    assert claims[name].kind == reproduce.INVARIANT


def test_a_plot_that_fails_to_draw_keeps_the_verdict(tmp_path):
  def measure(suite, root):
    bad = reproduce.Plot('t', 'x', 'y', {'mismatched': ([1, 2, 3], [1.0])})
    return reproduce.Measurement({'seed=0': 0.0}, 'ok', bad)

  paper = _paper(
    'delta', reproduce.Claim('p', reproduce.INVARIANT, 'f', measure, reproduce.AllWithin())
  )
  rc, out = _run(tmp_path, [paper])
  row = _rows(out)['delta/p']
  assert rc == 0 and row['verdict'] == reproduce.HOLDS
  assert row['plot'] == '' and 'plot failed: ValueError' in row['detail']


def test_per_paper_run_records_survive_only_reruns(tmp_path):
  """The 'Last run' line is the latest invocation; each paper's own line says where its rows came from."""
  _run(tmp_path, [GOOD, BROKEN])
  first = json.loads((tmp_path / 'reports' / 'claims.json').read_text())['runs']['smoke']
  assert set(first['papers']) == {'alpha', 'beta'}
  assert first['papers']['alpha']['claims'] == '3 of 3'
  _, out = _run(tmp_path, [GOOD, BROKEN], '--only=alpha/better')
  runs = json.loads((out / 'claims.json').read_text())['runs']['smoke']
  assert runs['command'].endswith('--only=alpha/better')
  assert runs['papers']['beta'] == first['papers']['beta']  # untouched by the re-run
  assert runs['papers']['alpha']['claims'] == '1 of 3'
  assert runs['papers']['alpha']['command'].endswith('--only=alpha/better')
  md = (out / 'claims.md').read_text()
  assert '| paper | claims run | last run | commit |' in md
  assert '| beta | 2 of 2 |' in md and '| alpha | 1 of 3 |' in md


def _needs(name, assets_by_suite):
  return _paper(
    name,
    reproduce.Claim(
      'uses',
      reproduce.INVARIANT,
      'fig',
      _m(0.0),
      reproduce.AllWithin(),
      assets=assets_by_suite,
    ),
  )


def test_a_claims_assets_are_fetched_before_it_runs(tmp_path, monkeypatch, capsys):
  calls: list[str] = []
  monkeypatch.setattr(reproduce.assets, 'is_fetched', lambda name: name in calls)
  monkeypatch.setattr(reproduce.assets, 'fetch', lambda name, log=None: calls.append(name))
  rc, out = _run(tmp_path, [_needs('alpha', {'smoke': ('ml100k',)})])
  assert rc == 0 and calls == ['ml100k']
  assert 'fetching asset ml100k (2.1 MB)' in capsys.readouterr().out
  _run(tmp_path, [_needs('alpha', {'smoke': ('ml100k',)})])
  assert calls == ['ml100k']  # cached: not fetched again


def test_the_smoke_suite_refuses_model_weights(tmp_path, monkeypatch):
  monkeypatch.setattr(reproduce.assets, 'is_fetched', lambda name: True)
  rc, out = _run(tmp_path, [_needs('alpha', {'smoke': ('smollm2',)})])
  assert rc == 1
  row = _rows(out)['alpha/uses']
  assert row['verdict'] == reproduce.ERROR
  assert 'smoke suite fetches no asset over 10 MB; smollm2 is 98.4 MB' in row['reason']
  rc, out = _run(tmp_path, [_needs('alpha', {'full': ('smollm2',)})], suite='full')
  assert rc == 0  # the full suite may use weights


def test_unknown_assets_and_suites_are_errors(tmp_path):
  rc, out = _run(tmp_path, [_needs('alpha', {'smoke': ('nope',)})])
  assert "unknown asset 'nope'" in _rows(out)['alpha/uses']['reason']
  with pytest.raises(ValueError, match='assets for suites it is not in'):
    reproduce.Claim(
      'x',
      reproduce.INVARIANT,
      'f',
      _m(0.0),
      reproduce.AllWithin(),
      suites=('smoke',),
      assets={'full': ('ml100k',)},
    )


def test_registered_claims_need_no_large_asset_in_the_smoke_suite():
  """The README's first command must work on a fresh machine without fetching model weights."""
  for paper in reproduce.discover():
    for claim in paper.claims:
      for name in claim.assets.get('smoke', ()):
        assert reproduce.assets.ASSETS[name].size <= reproduce.SMOKE_ASSET_LIMIT, (paper, name)
