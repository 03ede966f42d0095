"""Repo-wide rules: every config loads, documented commands resolve, import boundaries hold.

These guard against the failures the architecture doc lists from other codebases: stale commands in
config docstrings (big_vision), projects importing each other (scenic), missing __init__.py files.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob('experiments/*/configs/*.py'))
CONFIGS = [p for p in CONFIGS if p.name != '__init__.py']
COMMAND = re.compile(r'python -m ([\w.]+)((?:\s+\\?\s*--?[\w.]+(?:=\S+)?)*)')


def _module(path: pathlib.Path) -> str:
  return '.'.join(path.relative_to(ROOT).with_suffix('').parts)


def test_there_are_configs():
  assert CONFIGS, 'no experiment configs found'


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_loads_default_and_smoke(path):
  mod = importlib.import_module(_module(path))
  for arg in (None, 'smoke'):
    config = mod.get_config(arg)
    assert config.is_locked, 'configs must be locked (common.config.finalize)'
    with pytest.raises(AttributeError):
      config.no_such_key = 1
  assert mod.__doc__ and 'python -m' in mod.__doc__, 'config docstring must give the command'


def _documented_commands():
  docs = [*CONFIGS, ROOT / 'README.md', ROOT / 'WORKSPACE.md', *ROOT.glob('projects/*/README.md')]
  for path in docs:
    if not path.exists():
      continue
    text = path.read_text().replace('\\\n', ' ')
    for m in COMMAND.finditer(text):
      yield path, m.group(1), m.group(2)


@pytest.mark.parametrize(
  'doc, module, args', list(_documented_commands()), ids=lambda x: str(x)[-60:]
)
def test_documented_command_resolves(doc, module, args):
  if module in ('pytest', 'pip') or module.endswith('.'):  # 'experiments.<p>.main' templates
    return
  spec = importlib.util.find_spec(module)
  assert spec is not None, f'{doc}: module {module} does not exist'
  runnable = (
    spec.submodule_search_locations is not None
    and importlib.util.find_spec(f'{module}.__main__') is not None
  ) or (spec.origin and _has_main_block(pathlib.Path(spec.origin)))
  assert runnable, f'{doc}: `python -m {module}` would do nothing (no __main__)'
  for m in re.finditer(r'--config=([^\s:]+)', args):
    assert (ROOT / m.group(1)).is_file(), f'{doc}: config {m.group(1)} does not exist'


def test_every_package_dir_has_init():
  for top in ('common', 'projects', 'experiments', 'tests'):
    for d in (ROOT / top).rglob('*'):
      if d.is_dir() and d.name != '__pycache__' and any(d.glob('*.py')):
        assert (d / '__init__.py').exists(), f'{d.relative_to(ROOT)} lacks __init__.py'


def _imports(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f'{node.module}.{a.name}' for a in node.names)
  return names


def _violations() -> list[str]:
  bad = []
  for path in ROOT.rglob('*.py'):
    rel = path.relative_to(ROOT)
    top = rel.parts[0]
    if top not in ('common', 'projects', 'experiments', 'benchmarks', 'notebooks'):
      continue
    for name in _imports(path):
      parts = name.split('.')
      if top == 'common' and parts[0] in ('projects', 'experiments'):
        bad.append(f'{rel}: common/ imports {name}')
      if (
        top == 'projects' and parts[0] == 'projects' and len(parts) > 1 and parts[1] != rel.parts[1]
      ):
        bad.append(f'{rel}: imports another project ({name})')
      if top == 'projects' and parts[0] == 'experiments':
        bad.append(f'{rel}: projects/ imports {name}')
      if (
        top == 'experiments'
        and parts[0] == 'projects'
        and len(parts) > 1
        and rel.parts[1] != 'reproduce.py'
        and parts[1] != rel.parts[1]
      ):
        bad.append(f'{rel}: imports another paper ({name})')
      if top in ('benchmarks',) and parts[0] == 'experiments':
        bad.append(f'{rel}: imports {name}')
  return bad


def test_import_boundaries():
  assert _violations() == []


def test_every_experiment_main_imports():
  for main in ROOT.glob('experiments/*/main.py'):
    importlib.import_module(_module(main))


def test_all_modules_import_together():
  """Every module of common/, projects/ and experiments/ imports into ONE process.

  absl flags are process-global: two modules defining the same flag at import time only fail when
  something imports both (a test run, a notebook), as experiments.gem.sweep and experiments.gem.evaluate
  once did over --workdir. A fresh interpreter keeps this independent of which tests ran before.
  """
  modules = [
    _module(p.parent if p.name == '__init__.py' else p)
    for top in ('common', 'projects', 'experiments')
    for p in sorted((ROOT / top).rglob('*.py'))
    if p.name != '__main__.py'
  ]
  code = 'import importlib, sys\nfor m in sys.argv[1:]:\n  importlib.import_module(m)\n'
  run = subprocess.run(
    [sys.executable, '-c', code, *modules], cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  assert run.returncode == 0, run.stderr[-3000:]


def _common_import_graph() -> dict[str, set[str]]:
  """{module: the common/ modules it imports}, over every .py under common/.

  Module-level and function-level imports both count (a function-level import is still a
  dependency: it only runs later). `from common import x` imports common.x when that is a module
  (else the package common), `from common.models import decoder` imports common.models.decoder.
  Importing a submodule also runs its package's __init__, which is not counted as an edge, so a
  package whose __init__ imports its own submodules is not a cycle.
  """
  paths = {}
  for p in sorted((ROOT / 'common').rglob('*.py')):
    paths[_module(p.parent if p.name == '__init__.py' else p)] = p
  modules = set(paths)

  def resolve(name: str) -> str | None:
    parts = name.split('.')
    for n in range(len(parts), 0, -1):
      if '.'.join(parts[:n]) in modules:
        return '.'.join(parts[:n])
    return None

  graph = {}
  for mod, path in paths.items():
    package = mod if path.name == '__init__.py' else mod.rpartition('.')[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          anchor = package.split('.')[: len(package.split('.')) - (node.level - 1)]
          base = '.'.join([*anchor, *([base] if base else [])])
        targets = [f'{base}.{a.name}' for a in node.names]
      else:
        continue
      for t in targets:
        target = resolve(t)
        if target is not None and target != mod:
          edges.add(target)
    graph[mod] = edges
  return graph


def _import_cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
  """[(modules of a strongly connected component of over one module, one cycle through them)]."""
  index, low, stack, on_stack, sccs = {}, {}, [], set(), []

  def visit(v: str) -> None:  # Tarjan
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      scc = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        scc.append(w)
        if w == v:
          break
      if len(scc) > 1:
        sccs.append(sorted(scc))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  out = []
  for scc in sccs:  # a shortest path from the component's first module back to it
    start, members = scc[0], set(scc)
    paths, frontier = {start: [start]}, [start]
    while not any(start in graph[v] for v in frontier):
      nxt = []
      for v in frontier:
        for w in sorted(graph[v] & members):
          if w not in paths:
            paths[w] = [*paths[v], w]
            nxt.append(w)
      frontier = nxt
    last = next(v for v in frontier if start in graph[v])
    out.append((scc, [*paths[last], start]))
  return out


def test_common_has_no_import_cycle():
  found = _import_cycles(_common_import_graph())
  assert found == [], '\n'.join(
    f'{" -> ".join(cycle)} (the cycle among {", ".join(scc)})' for scc, cycle in found
  )


def test_cycle_finder_finds_a_function_level_cycle():
  graph = {'a': {'b'}, 'b': {'c', 'a'}, 'c': {'a'}, 'd': {'a'}}
  assert _import_cycles(graph) == [(['a', 'b', 'c'], ['a', 'b', 'a'])]
  assert _import_cycles({'a': {'b'}, 'b': set()}) == []


def test_library_code_does_not_import_test_helpers():
  """common.testing holds test fixtures only (fake devices, tree comparisons, notebook runs):
  library code, experiments, benchmarks and notebooks never import it."""
  bad = []
  for top in ('common', 'projects', 'experiments', 'benchmarks', 'notebooks'):
    for path in sorted((ROOT / top).rglob('*.py')):
      for name in _imports(path):
        if name == 'common.testing' or name.startswith('common.testing.'):
          bad.append(f'{path.relative_to(ROOT)}: imports {name}')
  assert bad == []


# ---------------------------------------------------------------------------------------------------
# One paper layout: knowing one paper's folder means knowing them all.

PAPER_FILES = ('models.py', 'losses.py', 'input_pipeline.py', 'evaluate.py', 'train.py')
EXPERIMENT_FILES = ('main.py', 'claims.py')


def _papers() -> list[str]:
  return sorted(p.name for p in (ROOT / 'projects').iterdir() if (p / '__init__.py').is_file())


@pytest.mark.parametrize('paper', _papers())
def test_every_paper_has_the_same_rooms(paper):
  project, experiment = ROOT / 'projects' / paper, ROOT / 'experiments' / paper
  missing = [f for f in PAPER_FILES if not (project / f).is_file()]
  missing += [
    f'experiments/{paper}/{f}' for f in EXPERIMENT_FILES if not (experiment / f).is_file()
  ]
  if not (experiment / 'configs').is_dir():
    missing.append(f'experiments/{paper}/configs/')
  if not (project / 'README.md').is_file():
    missing.append('README.md')
  assert not missing, f'projects/{paper} lacks {missing}'
  for name in PAPER_FILES:  # a short file is fine, an empty one says nothing
    assert ast.get_docstring(ast.parse((project / name).read_text())), f'{paper}/{name}: docstring'


def _has_main_block(path: pathlib.Path) -> bool:
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.If) and '__main__' in ast.unparse(node.test):
      return True
  return False


def test_scripts_live_in_experiments_not_projects():
  scripts = [str(p.relative_to(ROOT)) for p in ROOT.glob('projects/**/*.py') if _has_main_block(p)]
  assert not scripts, f'command-line scripts belong in experiments/<p>/: {scripts}'


def test_claims_files_only_declare_claims():
  """Model maths belongs to the paper's package, where it is tested; a claims file declares claims
  and calls project functions."""
  for path in sorted(ROOT.glob('experiments/*/claims.py')):
    tree = ast.parse(path.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {'flax', 'flax.nnx', 'jax.numpy', 'optax'}, f'{path}: {imported}'
    src = path.read_text()
    assert 'jax.jit' not in src and 'nnx.jit' not in src, f'{path} defines jitted functions'


def test_one_helper_for_unsharded_construction_and_rules_read_from_the_run():
  offenders = []
  for path in [*ROOT.glob('projects/**/*.py'), *ROOT.glob('experiments/**/*.py')]:
    src = path.read_text()
    if 'use_eager_sharding(' in src or 'tuple(tuple(r) for r in config.sharding.rules)' in src:
      offenders.append(str(path.relative_to(ROOT)))
  assert not offenders, f'use sharding.unsharded() and run.rules: {offenders}'


@pytest.mark.parametrize('doc', sorted(ROOT.glob('projects/*/README.md')) + [ROOT / 'WORKSPACE.md'])
def test_docs_keep_one_current_table_not_a_diary(doc):
  """At most 8 distinct commit hashes: the current table's; history lives in git and reports/."""
  hashes = {
    h
    for h in re.findall(r'\b[0-9a-f]{7,12}\b', doc.read_text())
    if re.search(r'[a-f]', h) and re.search(r'[0-9]', h)
  }
  assert len(hashes) <= 8, f'{doc.relative_to(ROOT)} names {len(hashes)} commits: {sorted(hashes)}'


def test_docs_link_only_inside_the_repo():
  docs = [ROOT / 'README.md', ROOT / 'WORKSPACE.md', *ROOT.glob('projects/*/README.md')]
  outside = [
    f'{d.relative_to(ROOT)}: {u}' for d in docs for u in re.findall(r'https?://\S+', d.read_text())
  ]
  assert not outside, outside


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # ml_collections' config file loader
def test_every_config_key_can_be_overridden_on_the_command_line(tmp_path, monkeypatch):
  """`--config.KEY=VALUE` works for every key of every config file (smoke variant), keys a config
  derives from another one (PerSRec's arm) included: the launcher accepts a changed value for each
  key (all at once) and config.json shows every one of them; and each key alone, parsed as the
  launcher parses it, gives the config that `file.py:smoke,KEY=VALUE` gives."""
  import json  # noqa: PLC0415
  import os  # noqa: PLC0415

  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  from common import config as config_lib  # noqa: PLC0415

  # The launcher with a run that only prepares the workdir (config.json), as every run does.
  launcher = (
    'from common import launch, train_loop\n'
    'launch.run(lambda config, workdir: train_loop.prepare_workdir(config, workdir))'
  )

  def changed(value):
    if isinstance(value, bool):
      return not value, str(not value).lower()
    if isinstance(value, int):
      return value + 1, str(value + 1)
    if isinstance(value, float):
      return value + 0.5, repr(value + 0.5)
    if isinstance(value, str):
      return value + '_x', value + '_x'
    if isinstance(value, (tuple, list)) and len(value) > 1:
      return tuple(value[:-1]), repr(tuple(value[:-1]))
    if isinstance(value, (tuple, list)) and not value:  # an empty default, e.g. StreamMem's ratios
      return (0.5,), '(0.5,)'
    raise AssertionError(f'no --config override for a {type(value).__name__} value {value!r}')

  def parsed(spec, override):  # the launcher's parser (common.launch._CONFIG), on its own flags
    argv = ['main.py', f'--config={spec}', override]
    monkeypatch.setattr(sys, 'argv', argv)
    values = flags.FlagValues()
    flag = config_flags.DEFINE_config_file('config', None, flag_values=values, lock_config=True)
    values(argv)
    return config_lib.to_dict(flag.value)

  jobs = {}
  for path in CONFIGS:
    spec = f'{path.relative_to(ROOT)}:smoke'
    flat = config_lib.flatten(config_lib.to_dict(config_lib.load(spec)))
    want = {k: changed(v) for k, v in flat.items()}
    workdir = tmp_path / path.parent.parent.name / path.stem
    argv = [f'--config={spec}', f'--workdir={workdir}']
    argv += [f'--config.{k}={text}' for k, (_, text) in want.items()]
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    proc = subprocess.Popen(
      [sys.executable, '-c', launcher, *argv], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    jobs[path] = (proc, workdir, want)
  monkeypatch.chdir(ROOT)
  for path in CONFIGS:
    spec = f'{path.relative_to(ROOT)}:smoke'
    for key, (_, text) in jobs[path][2].items():
      if ',' not in text:  # the config arg splits at commas
        got = parsed(spec, f'--config.{key}={text}')
        assert got == config_lib.to_dict(config_lib.load(f'{spec},{key}={text}')), (path, key)
  for path, (proc, workdir, want) in jobs.items():
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, f'{path}: exit {proc.returncode}\n{stderr[-2000:]}'
    written = config_lib.flatten(json.loads((workdir / 'config.json').read_text()))
    expected = config_lib.flatten(config_lib.to_dict({k: v for k, (v, _) in want.items()}))
    assert sorted(written) == sorted(expected), path
    wrong = {k: (written[k], v) for k, v in expected.items() if written[k] != v}
    assert not wrong, f'{path}: config.json does not show the overrides {wrong}'
