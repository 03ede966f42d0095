"""Command line for the asset cache: `python -m common.assets list|fetch|verify|path`.

Errors are single lines on stderr that name the fix, with a non-zero exit and never a traceback, so
the commands can be pasted from an error message and scripted in CI.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import sys

from common.assets import errors
from common.assets import registry
from common.assets import sources
from common.assets import store


class _Parser(argparse.ArgumentParser):
  """argparse with a one-line error instead of usage + message."""

  def error(self, message: str):
    self.exit(2, f'error: {message}; see: python -m common.assets --help\n')


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog='python -m common.assets', description=__doc__)
  sub = parser.add_subparsers(dest='command', required=True)
  sub.add_parser('list', help='show every asset: size, licence, fetched?, description')
  fetch = sub.add_parser('fetch', help='download, verify and cache assets')
  fetch.add_argument('names', nargs='+', metavar='NAME')
  fetch.add_argument('--force', action='store_true', help='fetch again even if cached')
  verify = sub.add_parser('verify', help='re-hash cached files (default: every fetched asset)')
  verify.add_argument('names', nargs='*', metavar='NAME')
  path = sub.add_parser('path', help="print a fetched asset's path")
  path.add_argument('name', metavar='NAME')
  path.add_argument('file', nargs='?', metavar='FILE')
  return parser


def _out(line: str) -> None:
  print(line, flush=True)


def _err(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _list(args: argparse.Namespace) -> int:
  del args
  rows = [('NAME', 'SIZE', 'LICENCE', 'FETCHED', 'DESCRIPTION')]
  for asset in registry.ASSETS.values():
    fetched = 'yes' if store.is_fetched(asset.name) else 'no'
    size = sources.human_size(asset.size)
    rows.append((asset.name, size, asset.licence, fetched, asset.description))
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  for row in rows:
    _out('  '.join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + '  ' + row[4])
  _out(f'cache: {store.cache_root()}')
  return 0


def _fetch(args: argparse.Namespace) -> int:
  for name in args.names:  # reject a typo before downloading anything
    registry.get(name)
  paths = [store.fetch(name, force=args.force, log=_out) for name in args.names]
  for p in paths:
    _out(str(p))
  return 0


def _verify(args: argparse.Namespace) -> int:
  names = args.names
  for name in names:
    registry.get(name)
  if not names:
    names = [n for n in registry.ASSETS if (store.cache_root() / n).is_dir()]
    if not names:
      _out(f'no assets fetched in {store.cache_root()}')
  bad = 0
  for name in names:
    problems = store.verify(name)
    for problem in problems:
      _err(f'error: {problem}')
    bad += bool(problems)
    if not problems:
      _out(f'{name}: ok ({len(registry.get(name).files)} files)')
  return 1 if bad else 0


def _path(args: argparse.Namespace) -> int:
  _out(str(store.path(args.name, args.file)))
  return 0


_COMMANDS = {'list': _list, 'fetch': _fetch, 'verify': _verify, 'path': _path}


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    return _COMMANDS[args.command](args)
  except errors.AssetError as e:
    _err(f'error: {e}')
  except OSError as e:
    _err(f'error: {e}')
  except KeyboardInterrupt:
    _err('error: interrupted; nothing partial was installed (re-run the same command)')
    return 130
  return 1


if __name__ == '__main__':
  sys.exit(main())
