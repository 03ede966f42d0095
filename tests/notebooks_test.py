"""Notebooks stay runnable, reviewable, and runnable on a fresh runtime (Colab):

- each .ipynb is paired with a .py (jupytext percent format) and the two hold the same cells; the .py
  is the source of truth (`jupytext --sync notebooks/NAME.py` regenerates the .ipynb, keeping the
  outputs of unchanged cells);
- every notebook starts with the same setup cell: nothing when `common` is importable, else
  `pip install -e` of the enclosing clone, else `pip install git+$MONOREPO_GIT_URL`, else one line
  saying to set MONOREPO_GIT_URL (tested below as the notebooks hold it, run from a directory
  outside the repository against a local `git clone`, installing into a throw-away venv; pip
  fetches only the build backend, as in tests/packaging_test.py);
- no notebook forces the CPU, and each prints `jax.devices()`;
- committed outputs: every notebook but persrec carries the outputs of one top-to-bottom run
  (`PYTHONPATH=$PWD jupytext --to ipynb --execute notebooks/NAME.py`, with
  requirements-notebooks.txt installed), small and without errors;
  persrec carries none (the MovieLens terms forbid redistributing the data);
- the lm_pretrain script runs end to end on the smoke config, with its progress lines in the output.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import venv

import jupytext
import pytest

from common import testing

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / 'notebooks').glob('*.ipynb'))
SCRIPTS = sorted((ROOT / 'notebooks').glob('*.py'))
# Data whose licence forbids redistribution: their notebooks are committed without outputs.
NO_OUTPUTS = {'persrec'}
MAX_IPYNB_BYTES = 300_000
MISSING_URL_MESSAGE = (
  'meta-ai-papers-jax is not installed and this notebook is not in a clone of it: set the '
  "environment variable MONOREPO_GIT_URL to the repository's git URL (in a cell above: "
  "os.environ['MONOREPO_GIT_URL'] = 'https://...'), or run the notebook inside a clone"
)


def _cells(path: pathlib.Path) -> list[tuple[str, str]]:
  nb = jupytext.read(path)
  return [(c.cell_type, c.source.strip()) for c in nb.cells]


def _setup_cell(path: pathlib.Path) -> str:
  """The notebook's first code cell, as the notebook holds it (so the tests cannot drift)."""
  return next(source for kind, source in _cells(path) if kind == 'code')


SETUP = _setup_cell(ROOT / 'notebooks' / 'lm_pretrain.py')


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


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_every_notebook_opens_with_the_colab_notes_and_the_setup_cell(script):
  cells = _cells(script)
  assert cells[0][0] == 'markdown'
  for words in ('Colab', 'File -> Upload notebook', 'MONOREPO_GIT_URL'):
    assert words in cells[0][1], f'{script.name}: the first markdown cell does not mention {words}'
  assert _setup_cell(script) == SETUP, (
    f'{script.name}: the first code cell differs from the setup cell of lm_pretrain.py'
  )


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_no_notebook_forces_the_cpu_and_each_prints_its_devices(script):
  code = '\n'.join(source for kind, source in _cells(script) if kind == 'code')
  assert 'JAX_PLATFORMS' not in code, f'{script.name} sets JAX_PLATFORMS: leave it to the user'
  assert re.search(r'^print\(.*jax\.devices\(\)\)$', code, re.M), f'{script.name}: no devices line'


@pytest.mark.parametrize('ipynb', NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs(ipynb):
  """persrec: no outputs. The others: the outputs of one top-to-bottom run (every code cell ran,
  in order; a cell edited and synced since has none), no error, PNG figures, a small file."""
  nb = jupytext.read(ipynb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  execute = f'PYTHONPATH=$PWD jupytext --to ipynb --execute notebooks/{ipynb.stem}.py'
  if ipynb.stem in NO_OUTPUTS:
    for i, cell in enumerate(code):
      assert cell.outputs == [] and cell.execution_count is None, (
        f'{ipynb.name}: code cell {i} has outputs; the data may not be redistributed: '
        f'jupyter nbconvert --clear-output --inplace notebooks/{ipynb.name}'
      )
    return
  counts = [c.execution_count for c in code]
  assert counts == list(range(1, len(code) + 1)), (
    f'{ipynb.name}: the outputs are not those of one top-to-bottom run (execution counts '
    f'{counts}); re-run it: {execute}'
  )
  for i, cell in enumerate(code):
    for out in cell.outputs:
      assert out.output_type != 'error', f'{ipynb.name}: code cell {i} failed; re-run: {execute}'
      images = [k for k in out.get('data', {}) if k.startswith('image/')]
      assert set(images) <= {'image/png'}, f'{ipynb.name}: code cell {i} has {images}'
  size = ipynb.stat().st_size
  assert size <= MAX_IPYNB_BYTES, f'{ipynb.name} is {size} bytes: shrink its figures or logs'


def _env(**extra: str) -> dict[str, str]:
  """The environment of a setup-cell subprocess: no repository on PYTHONPATH, no URL unless given."""
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'MONOREPO_GIT_URL')}
  return {**env, 'PIP_DISABLE_PIP_VERSION_CHECK': '1', 'PIP_NO_INPUT': '1', **extra}


def test_setup_cell_outside_a_clone_without_the_url_fails_with_one_line(tmp_path):
  # -S -E: no site-packages and no PYTHONPATH, so `common` is not importable even where the
  # repository is installed; the cell must stop before pip with the one-line message.
  p = subprocess.run(
    [sys.executable, '-S', '-E', '-c', SETUP],
    cwd=tmp_path,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )
  assert p.returncode == 1, p.stderr
  assert p.stdout == ''
  assert p.stderr == MISSING_URL_MESSAGE + '\n'


@pytest.fixture(scope='module')
def clone(tmp_path_factory) -> pathlib.Path:
  """A local `git clone` of the repository (its committed HEAD)."""
  dst = tmp_path_factory.mktemp('clone') / 'meta-ai-papers-jax'
  subprocess.run(['git', 'clone', '--quiet', str(ROOT), str(dst)], check=True, timeout=300)
  return dst


def _venv_python(directory: pathlib.Path) -> pathlib.Path:
  """A throw-away venv that sees the installed stack (--system-site-packages) but installs into
  itself, so the real environment never changes. Without its own pip: `python -m pip` there runs
  the stack's pip, which installs into the venv (its sys.prefix)."""
  venv.create(directory, system_site_packages=True, with_pip=False)
  return directory / 'bin' / 'python'


def _run_setup_then_import(python: pathlib.Path, cwd: pathlib.Path, env: dict[str, str]) -> str:
  code = SETUP + '\nimport common, projects, experiments\nprint("common:", common.__file__)\n'
  p = subprocess.run(
    [str(python), '-c', code],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
  return p.stdout


def test_setup_cell_installs_from_monorepo_git_url_outside_the_repo(tmp_path, clone):
  python = _venv_python(tmp_path / 'venv')
  work = tmp_path / 'work'  # a directory outside any clone, as Colab's /content
  work.mkdir()
  stdout = _run_setup_then_import(python, work, _env(MONOREPO_GIT_URL=clone.as_uri()))
  assert f'pip install git+{clone.as_uri()}' in stdout
  installed = pathlib.Path(re.search(r'^common: (.+)$', stdout, re.M).group(1))
  assert (tmp_path / 'venv') in installed.parents, installed  # into the venv, not the clone


def test_setup_cell_installs_the_enclosing_clone_in_editable_mode(tmp_path, clone):
  python = _venv_python(tmp_path / 'venv')
  stdout = _run_setup_then_import(python, clone / 'notebooks', _env())
  assert f'pip install -e {clone}' in stdout
  installed = pathlib.Path(re.search(r'^common: (.+)$', stdout, re.M).group(1))
  assert installed == clone / 'common' / '__init__.py'


def test_lm_pretrain_notebook_runs_on_the_smoke_config(monkeypatch):
  # The repository on PYTHONPATH: `common` is importable, so the setup cell installs nothing.
  monkeypatch.setenv('PYTHONPATH', str(ROOT))
  stdout = testing.run_notebook_script('lm_pretrain', timeout=600)
  workdir = pathlib.Path(re.search(r'^workdir: (.+)$', stdout, re.M).group(1))
  try:
    assert re.search(r'^JAX devices: \[', stdout, re.M), stdout
    assert re.search(r'^step 60/60 .*loss=', stdout, re.M), stdout  # the run's progress lines
    assert (workdir / 'loss.png').is_file()
    assert (workdir / 'results.json').is_file()
    assert 'parameters' in stdout
    assert re.search(r"^'The data set' -> .+ \(mean log p", stdout, re.M), stdout
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
