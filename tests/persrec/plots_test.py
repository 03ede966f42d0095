"""The README figure's data (projects/persrec/plots.py) and its command line (experiments/persrec/
plots.py) on a fake sweep: points per arm and window, seed means and ranges, a written PNG."""

from __future__ import annotations

import json

from experiments.persrec import plots as plots_cli
from projects.persrec import plots


def _fake_runs(root):
  runs = [
    ('full', 8, 0, 0.30),
    ('full', 8, 1, 0.40),
    ('persrec', 8, 0, 0.35),
    ('recent', 0, 0, 0.2),
  ]
  for arm, p, seed, recall in runs:
    d = root / f'{arm}_P{p}_seed{seed}'
    d.mkdir(parents=True)
    config = {
      'data': {'source': 'synthetic'},
      'arm': arm,
      'model': {'old_len': p, 'recent_len': 16},
    }
    (d / 'config.json').write_text(json.dumps(config))
    (d / 'results.json').write_text(json.dumps({'eval': {'test/recall_10': recall}}))
  other = root / 'ml'
  other.mkdir()
  (other / 'config.json').write_text(json.dumps({'data': {'source': 'ml100k'}, 'arm': 'full'}))
  (other / 'results.json').write_text('{}')
  return root


def test_run_points_and_seed_summaries(tmp_path):
  points = plots.run_points(_fake_runs(tmp_path))
  assert points == {
    'full': [(24, 0.30), (24, 0.40)],
    'persrec': [(24, 0.35)],
    'recent': [(16, 0.2)],
  }
  ((window, mean, low, high, n),) = plots.by_window(points['full'])
  assert (window, low, high, n) == (24, 0.30, 0.40, 2) and abs(mean - 0.35) < 1e-12


def test_cli_writes_the_figure(tmp_path):
  serving = [
    {'arm': arm, 'old_len': p, 'times': [0.01, 0.02, 0.03]}
    for arm, p in [('recent', 0), ('full', 256), ('full', 512), ('persrec', 256), ('persrec', 512)]
  ]
  (tmp_path / 'serving.json').write_text(json.dumps(serving))
  out = tmp_path / 'fig.png'
  args = [f'--runs={_fake_runs(tmp_path / "runs")}', f'--serving={tmp_path / "serving.json"}']
  assert plots_cli.main([*args, f'--out={out}']) == 0
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
