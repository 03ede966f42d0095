"""The repository installs as a package (`pip install <clone or path>`), so notebooks (Colab) and
other projects import `common`, `projects` and `experiments` without a clone-relative path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from common import testing


def test_pip_install_then_import_from_outside_the_repo(tmp_path):
  # Install from a copy of the tracked files, so the build leaves nothing in the working tree.
  files = subprocess.run(
    ['git', 'ls-files', '-z'], cwd=testing.REPO_ROOT, capture_output=True, check=True
  ).stdout.split(b'\0')
  src = tmp_path / 'src'
  for name in filter(None, (f.decode() for f in files)):
    if (testing.REPO_ROOT / name).is_file():
      (src / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(testing.REPO_ROOT / name, src / name)
  target = tmp_path / 'site'
  p = subprocess.run(
    [sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', str(target), str(src)],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  installed = sorted(x.name for x in target.iterdir() if not x.name.endswith('-info'))
  assert installed == ['common', 'experiments', 'projects']  # not tests/, notebooks/, reports/
  code = (
    'import common, projects, experiments, common.train_loop, experiments.reproduce; '
    'from experiments.lm_pretrain.configs import base; base.get_config("smoke"); '
    'print(common.__file__)'
  )
  env = {**os.environ, 'PYTHONPATH': str(target), 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == str(target / 'common' / '__init__.py')


def test_every_requirements_file_resolves_with_the_pinned_stack():
  """`pip install -r requirements.txt -r <file>` must be installable as documented; the reference
  and notebook files are resolved together with the stack (the reference stack once pinned
  transformers 5.23.0, which needs safetensors >= 0.8, against 0.7.0). The peers
  and llama.cpp files are installed beside the stack with --no-deps (their own bounds would move
  jax), so for them the check is that they pin nothing the stack pins differently."""
  root = testing.REPO_ROOT
  p = subprocess.run(
    [
      sys.executable,
      '-m',
      'pip',
      'install',
      '--dry-run',
      '-q',
      '-r',
      str(root / 'requirements.txt'),
      '-r',
      str(root / 'requirements-reference.txt'),
      '-r',
      str(root / 'requirements-notebooks.txt'),
    ],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert p.returncode == 0, p.stderr[-3000:]

  def pins(name):
    out = {}
    for line in (root / name).read_text().splitlines():
      line = line.split('#', 1)[0].strip()
      if '==' in line:
        pkg, version = line.split('==', 1)
        out[pkg.strip().lower().replace('_', '-')] = version.strip()
    return out

  stack = pins('requirements.txt')
  for beside in ('requirements-peers.txt', 'requirements-llama-cpp.txt'):
    clashes = {k: (stack[k], v) for k, v in pins(beside).items() if k in stack and stack[k] != v}
    assert not clashes, (beside, clashes)
