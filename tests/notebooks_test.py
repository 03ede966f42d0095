"""Notebooks stay runnable and reviewable: each .ipynb is paired with a .py (jupytext percent format),
the two hold the same cells, the .ipynb is committed without outputs (diffs stay readable and no
stale numbers ship), and the lm_pretrain script runs end to end on the smoke config.

The .py is the source of truth; regenerate the .ipynb with `jupytext --sync notebooks/NAME.py`.
"""

from __future__ import annotations

import pathlib
import re
import shutil

import jupytext
import pytest

from common import testing

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / 'notebooks').glob('*.ipynb'))
SCRIPTS = sorted((ROOT / 'notebooks').glob('*.py'))


def _cells(path: pathlib.Path) -> list[tuple[str, str]]:
  nb = jupytext.read(path)
  return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_every_notebook_is_paired():
  assert NOTEBOOKS, 'no notebooks found'
  assert {p.stem for p in NOTEBOOKS} == {p.stem for p in SCRIPTS}


@pytest.mark.parametrize('ipynb', NOTEBOOKS, ids=lambda p: p.name)
def test_ipynb_and_py_are_in_sync(ipynb):
  script = ipynb.with_suffix('.py')
  assert _cells(ipynb) == _cells(script), (
    f'{ipynb.name} and {script.name} differ: run `jupytext --sync {script.relative_to(ROOT)}`'
  )
  assert jupytext.read(script).metadata['jupytext']['formats'] == 'ipynb,py:percent'


@pytest.mark.parametrize('ipynb', NOTEBOOKS, ids=lambda p: p.name)
def test_ipynb_has_no_outputs(ipynb):
  nb = jupytext.read(ipynb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, f'cell {i} has outputs'


def test_lm_pretrain_notebook_runs_on_the_smoke_config():
  stdout = testing.run_notebook_script('lm_pretrain', timeout=600)
  workdir = pathlib.Path(re.search(r'^workdir: (.+)$', stdout, re.M).group(1))
  try:
    assert (workdir / 'loss.png').is_file()
    assert (workdir / 'results.json').is_file()
    assert 'parameters' in stdout
    assert re.search(r"^'The data set' -> .+ \(mean log p", stdout, re.M), stdout
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
