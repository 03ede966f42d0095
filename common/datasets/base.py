"""What every TFDS builder here shares: its base class, where builds live, how they are built and read.

`ArrayRecordBuilder` holds the boilerplate of a builder defined in an ordinary module (not a tfds
dataset folder) that writes array_record (no TensorFlow): its `code_path`, the file format and its
`_info` (description, features, homepage, licence). A builder subclasses it and gives `_features`,
`HOMEPAGE`, `LICENSE`, `_split_generators` and `_generate_examples`.

`prepare` builds a data set once (atomically, under a lock) into `data_dir()`, a cache outside the
repo; `tfds_source` reads a split back as a random-access source. Both take a builder, a builder class
or a registered name ('rdatasets_docs/tiny'): importing this module runs the `common.datasets`
package first, which imports (and so registers) every shared builder, so their names always resolve.
common.data re-exports these functions for the input pipelines.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import inspect
import os
import pathlib
import shutil
import sys
import time
from typing import Any

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from common import cache


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A GeneratorBasedBuilder written as array_record, with its DatasetInfo from class attributes.

  `DESCRIPTION` defaults to the first paragraph of the defining module's docstring; `LICENSE` to
  none stated.
  """

  HOMEPAGE: str | None = None
  LICENSE: str | None = None
  DESCRIPTION: str | None = None

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' own lookup for a builder inside a package touches `importlib_resources`, a backport
    # that is not installed on Python >= 3.9; this is the answer its fallback gives.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', 'array_record')  # tfrecord (tfds' default) needs TensorFlow
    super().__init__(**kwargs)

  @abc.abstractmethod
  def _features(self) -> tfds.features.FeaturesDict:
    """The examples' features (every data set defines them)."""

  def _info(self) -> tfds.core.DatasetInfo:
    # A builder in an ordinary module (not a tfds dataset folder) builds its DatasetInfo directly.
    description = self.DESCRIPTION
    if description is None:
      description = sys.modules[type(self).__module__].__doc__.split('\n\n')[0]
    return tfds.core.DatasetInfo(
      builder=self,
      description=description,
      features=self._features(),
      homepage=self.HOMEPAGE,
      license=self.LICENSE,
    )


# ---------------------------------------------------------------------------------------------------
# Build once into a cache outside the repo, read back as random-access sources.


def data_dir() -> pathlib.Path:
  """Where TFDS data sets are built: $MONOREPO_DATA_DIR, else the monorepo cache's tfds/ folder."""
  return _default_data_dir()


def _default_data_dir() -> pathlib.Path:  # (`data_dir` is also the argument name below)
  env = os.environ.get('MONOREPO_DATA_DIR')
  if env:
    path = pathlib.Path(env)
    path.mkdir(parents=True, exist_ok=True)
    return path
  return cache.cache_dir('tfds')


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def builder(builder_or_name: Any, data_dir: str | os.PathLike | None = None):
  """A tfds DatasetBuilder from an instance, a builder class or a registered name ('name/config')."""
  root = os.fspath(data_dir if data_dir is not None else _default_data_dir())
  if isinstance(builder_or_name, tfds.core.DatasetBuilder):
    return builder_or_name
  if isinstance(builder_or_name, type):
    return builder_or_name(data_dir=root, file_format='array_record')
  return tfds.builder(builder_or_name, data_dir=root, file_format='array_record')


def _current(b):
  """`b`, or a new builder of its class and config when `b` was made before the data set existed.

  A builder reads its split info once, when made: an instance made before another process finished
  the build (two papers' runs sharing one data set) keeps empty splits and cannot read a split.
  """
  if b.info.splits:
    return b
  kwargs = {'data_dir': os.fspath(b.data_dir_root), 'file_format': 'array_record'}
  if b.builder_config is not None:
    kwargs['config'] = b.builder_config
  return type(b)(**kwargs)


def _is_built(b) -> bool:
  # The version folder appears only through tfds' final rename, after dataset_info.json is written.
  # (b.is_prepared() says the same but logs a warning for every missing folder.)
  return pathlib.Path(os.fspath(b.data_dir), 'dataset_info.json').is_file()


def prepare(builder_or_name: Any, data_dir: str | os.PathLike | None = None):
  """Builds the data set once and returns its (prepared) builder; later calls only read it.

  tfds writes into an `incomplete.*` directory and renames it to data_dir/name/config/version only
  when every split is written, so a build killed midway is never taken for a finished one: the next
  call removes the leftover and builds again. A file lock serialises concurrent builds of the same
  data set (several processes on one machine starting together).
  """
  b = builder(builder_or_name, data_dir)
  if _is_built(b):
    return _current(b)
  final = pathlib.Path(os.fspath(b.data_dir))  # data_dir/name[/config]/version
  with _file_lock(final.parent / f'.{final.name}.lock'):
    b = builder(builder_or_name, data_dir)  # re-read: another process may have built it meanwhile
    if _is_built(b):
      return _current(b)
    for stale in final.parent.glob(f'incomplete.*_{final.name}'):  # a killed build's leftovers
      shutil.rmtree(stale, ignore_errors=True)
    logging.info('building data set %s (first use; cached in %s)', b.info.full_name, final.parent)
    t0 = time.perf_counter()
    tfds.disable_progress_bar()
    b.download_and_prepare(
      download_dir=os.path.join(os.fspath(b.data_dir_root), 'downloads'),
      file_format='array_record',
    )
    logging.info('built %s in %.1f s into %s', b.info.full_name, time.perf_counter() - t0, final)
  return b


def tfds_source(builder_or_name: Any, split: str, data_dir: str | os.PathLike | None = None):
  """A random-access source (len, [i]) over a TFDS split, building the data set first if needed.

  `split` accepts tfds slicing ('train[:10%]'). Examples are dicts of numpy values; Text features
  come back as UTF-8 bytes (there is no TensorFlow to decode them).
  """
  return prepare(builder_or_name, data_dir).as_data_source(split=split)
