"""projects.ebpo.report: EBPO's own train metrics drawn by common.runs, one colour per
configuration (estimator, group size) with its seeds as shades, so EBPO and GRPO differ."""

import json
import subprocess
import sys

from projects.ebpo import report


def _runs(root):
  """g{G}_{estimator}_seed{S} workdirs as the claims write them (two seeds each)."""
  for estimator in ('ebpo', 'grpo'):
    for seed in (0, 1):
      path = root / f'g2_{estimator}_seed{seed}'
      path.mkdir(parents=True)
      config = {'seed': seed, 'rl': {'estimator': estimator, 'group_size': 2}}
      (path / 'config.json').write_text(json.dumps(config))
      rows = [
        {'step': s, 'split': 'train', 'time': 100.0 + s, **{k: s * (1 + seed) for k in report.KEYS}}
        for s in (5, 10, 15)
      ]
      (path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))


def test_figure_colours_by_configuration_not_by_seed(tmp_path, saved_figures):
  _runs(tmp_path / 'runs')
  out = report.figure(tmp_path / 'runs', tmp_path / 'curves.png')
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  axes = saved_figures[0].axes
  assert [ax.get_title() for ax in axes] == [f'train/{k}' for k in report.KEYS]
  legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
  assert legend == ['rl.estimator=ebpo (2 seeds)', 'rl.estimator=grpo (2 seeds)']
  for ax in axes:  # per configuration: two seeds and their mean, in one colour of its own
    colours = [line.get_color() for line in ax.lines]
    assert len(colours) == 6 and len(set(colours[:3])) == 1 and len(set(colours[3:])) == 1
    assert colours[0] != colours[3]
    mean = ax.lines[2].get_ydata()
    assert list(mean) == [1.5 * s for s in (5, 10, 15)]


def test_command_line(tmp_path):
  _runs(tmp_path / 'runs')
  out = tmp_path / 'curves.png'
  cmd = [sys.executable, '-m', 'experiments.ebpo.report', str(tmp_path / 'runs'), str(out)]
  p = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
  assert p.returncode == 0 and p.stdout.strip() == str(out), p.stderr[-2000:]
  p = subprocess.run(cmd[:3], capture_output=True, text=True, check=False, timeout=300)
  assert p.returncode == 2 and 'usage:' in p.stderr
  cmd[3] = str(tmp_path / 'nothing')
  p = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
  assert p.returncode == 2 and p.stderr.startswith('error: '), p.stderr
