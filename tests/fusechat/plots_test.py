"""projects/fusechat/plots.py and its command: model order, the per-skill figure, bad runs."""

import json

import pytest

from experiments.fusechat import plots as plots_cli
from experiments.fusechat.configs import base
from projects.fusechat import evaluate
from projects.fusechat import plots
from projects.fusechat import train

CONFIG = base.get_config('smoke')
MODELS = tuple(train.model_names(CONFIG))


def _metrics() -> dict[str, float]:
  out = {'fused_coder/aligned_frac': 0.7}  # a per-target statistic a run logs beside the rows
  for i, name in enumerate(MODELS):
    for skill in evaluate.SKILLS:
      out[f'{name}/{skill}/acc'] = 0.1 * i
      out[f'{name}/{skill}/nll_byte'] = 1.0 + 0.1 * i
    out[f'{name}/acc'] = 0.1 * i
  return out


def test_models_read_pivot_targets_merges_then_sources():
  assert list(MODELS) == [
    'pivot',
    'fused_coder',
    'fused_general',
    *CONFIG.merge.methods,
    'source_coder',
    'source_general',
  ]


def test_figure_draws_two_bars_per_model_and_panel(tmp_path):
  fig = plots.figure(_metrics(), MODELS, 'title')
  acc, nll = fig.axes
  assert len(acc.patches) == len(nll.patches) == 2 * len(MODELS)
  assert sorted(round(b.get_height(), 6) for b in acc.patches)[-1] == pytest.approx(
    0.1 * (len(MODELS) - 1)
  )
  fig.savefig(tmp_path / 'f.png')
  assert (tmp_path / 'f.png').stat().st_size > 1000
  with pytest.raises(ValueError, match='no per-skill accuracy'):
    plots.figure({'pivot/acc': 0.5}, ['pivot'])


def test_command_draws_a_finished_run_and_refuses_others(tmp_path, capsys):
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text(CONFIG.to_json())
  with pytest.raises(SystemExit) as unfinished:
    plots_cli.main([f'--run={run}', f'--out={tmp_path / "f.png"}'])
  assert unfinished.value.code == 2
  assert 'has not finished' in capsys.readouterr().err
  (run / 'results.json').write_text(json.dumps({'step': 60, 'eval': _metrics()}))
  assert plots_cli.main([f'--run={run}', f'--out={tmp_path / "f.png"}']) == 0
  assert (tmp_path / 'f.png').stat().st_size > 1000
  with pytest.raises(SystemExit) as not_a_run:
    plots_cli.main([f'--run={tmp_path}', f'--out={tmp_path / "g.png"}'])
  assert not_a_run.value.code == 2
