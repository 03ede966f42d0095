"""experiments/fusionroute/seeds_table.py: seed means, spreads and paired differences of real
workdir layouts (results.json per stage, baselines.json), and unfinished seeds left out."""

import json

import numpy as np

from experiments.fusionroute import seeds_table
from projects.fusionroute import evaluate
from projects.fusionroute import train

METHODS = ('fusionroute', 'routing_only', 'router_lm', 'deferral')


def _flat(summary: dict[str, dict[str, float]]) -> dict[str, float]:
  """The names evaluate.flat_metrics writes: '<method>/<metric>'."""
  return {f'{m}/{k}': v for m, d in summary.items() for k, v in d.items()}


def _write(path, summary: dict[str, dict[str, float]]) -> None:
  path.mkdir(parents=True, exist_ok=True)
  flat = _flat(summary)
  (path / 'results.json').write_text(json.dumps({'step': 1, 'eval': flat}))
  (path / 'config.json').write_text(json.dumps({'experts': {'source': 'smollm2'}}))


def _acc(mixed: float) -> dict[str, float]:
  return {'math': mixed, 'string': mixed / 2, 'logic': 0.0, 'mixed': mixed, 'domain_match': 0.5}


def test_method_metrics_inverts_the_flat_names_without_prefix_leaks():
  summary = {m: _acc(0.1 * i) for i, m in enumerate(METHODS)}
  flat = _flat(summary)
  for m in METHODS:
    assert evaluate.method_metrics(flat, m) == summary[m]
  assert evaluate.method_metrics(flat, 'router') == {}  # a prefix of router_lm, not a method
  assert evaluate.method_metrics(flat, 'fusion') == {}


def test_table_pairs_each_method_with_fusionroute_per_seed(tmp_path):
  fr_mixed, ft_mixed = {0: 0.6, 1: 0.5, 2: 0.7}, {0: 0.4, 1: 0.45}  # finetuned seed 2 not run
  for s, m in fr_mixed.items():
    run = tmp_path / f'fusionroute_seed{s}'
    _write(run, {k: _acc(m - 0.1 * i) for i, k in enumerate(METHODS)})
    _write(run / train.STAGE1_DIR, {k: _acc(m - 0.2) for k in METHODS})
  for s, m in ft_mixed.items():
    _write(tmp_path / f'finetuned_seed{s}', {'router_lm': _acc(m)})
    _write(tmp_path / f'finetuned_seed{s}' / train.STAGE1_DIR, {'router_lm': _acc(m)})
  (tmp_path / 'baselines').mkdir()
  (tmp_path / 'baselines' / train.BASELINES_FILE).write_text(json.dumps({'oracle': _acc(0.3)}))
  _write(tmp_path / 'fusionroute_seed3', {})  # started, never finished: no results.json
  (tmp_path / 'fusionroute_seed3' / 'results.json').unlink()

  done, table = seeds_table.rows(tmp_path, [0, 1, 2, 3])
  assert done == [0, 1, 2]
  assert table['fine-tuned (method=finetuned)'][2] is None
  lines = {
    line.split(' | ')[0][2:]: line.split(' | ')
    for line in seeds_table.markdown(done, table, ('math', 'string', 'logic')).splitlines()
  }
  fr = lines['FusionRoute']
  assert fr[1:4] == ['0.600', '0.300', '0.000']  # per-domain seed means
  assert fr[4:7] == ['0.600', '0.500', '0.700']
  assert fr[7] == f'0.600 ± {np.std([0.6, 0.5, 0.7], ddof=1):.3f}'
  ft = lines['fine-tuned (method=finetuned)']
  assert ft[4:7] == ['0.400', '0.450', '']  # the missing seed is blank, not averaged as 0
  assert ft[8].rstrip(' |') == f'{np.mean([0.2, 0.05]):.3f} ± {np.std([0.2, 0.05], ddof=1):.3f}'
  assert lines['oracle domain routing'][8].startswith('0.300 ± 0.100')  # seed-free, paired
  assert lines['routing-only'][8].startswith('0.100 ± 0.000')


def test_experts_alone_come_best_first_and_the_flaw_set_gets_a_column(tmp_path):
  run = tmp_path / 'fusionroute_seed0'
  _write(run, {m: {**_acc(0.9), 'flaw': 0.8} for m in METHODS})
  fixed = {'expert_code': _acc(0.2), 'expert_math': _acc(0.4), 'uniform': _acc(0.5)}
  (tmp_path / 'baselines').mkdir()
  (tmp_path / 'baselines' / train.BASELINES_FILE).write_text(json.dumps(fixed))

  done, table = seeds_table.rows(tmp_path, [0])
  assert list(table)[:3] == ['math expert alone', 'code expert alone', 'uniform logit averaging']
  head, _, *body = seeds_table.markdown(done, table, ('math', 'string', 'logic')).splitlines()
  assert head.split(' | ')[1:5] == ['math', 'string', 'logic', 'flaw']
  fr = next(line for line in body if line.startswith('| FusionRoute |'))
  assert fr.split(' | ')[4] == '0.800'


def test_intervals_are_paired_differences_with_a_t_half_width(tmp_path):
  fr, ro = {0: 0.6, 1: 0.5, 2: 0.7}, {0: 0.55, 1: 0.49, 2: 0.6}
  for s in fr:
    summary = {m: _acc(fr[s]) for m in METHODS} | {'routing_only': _acc(ro[s])}
    _write(tmp_path / f'fusionroute_seed{s}', summary)
  done, table = seeds_table.rows(tmp_path, [0, 1, 2])
  line = next(
    x for x in seeds_table.intervals(table) if x.startswith('FusionRoute - routing-only:')
  )
  d = np.array([fr[s] - ro[s] for s in (0, 1, 2)])
  half = 4.303 * d.std(ddof=1) / np.sqrt(3)  # t(0.975, df=2)
  assert f'{d.mean():+.3f} ± {half:.3f} (per seed +0.050 / +0.010 / +0.100)' in line
  assert not any(x.startswith('FusionRoute - FusionRoute') for x in seeds_table.intervals(table))
