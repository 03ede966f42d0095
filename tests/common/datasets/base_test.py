"""Tests for common.datasets.base: the builder base class every shared TFDS builder uses."""

import inspect

import numpy as np
import tensorflow_datasets as tfds

from common import data
from common import datasets
from common.datasets import base


class Squares(base.ArrayRecordBuilder, skip_registration=True):
  """Squares of 0..4 (a builder defined in a test module)."""

  VERSION = tfds.core.Version('1.0.0')
  HOMEPAGE = 'https://example.org/'

  def _features(self):
    return tfds.features.FeaturesDict({'x': np.int64, 'y': np.int64})

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(5):
      yield i, {'x': i, 'y': i * i}


def test_a_subclass_builds_array_record_and_reads_back(tmp_path):
  source = data.tfds_source(Squares, 'train', tmp_path)
  rows = sorted((int(source[i]['x']), int(source[i]['y'])) for i in range(len(source)))
  assert rows == [(i, i * i) for i in range(5)]
  b = Squares(data_dir=str(tmp_path))
  assert b.info.file_format.value == 'array_record'
  assert b.info.homepage == 'https://example.org/'
  assert b.info.description == __doc__.split('\n\n')[0]  # this module's docstring
  assert b.name == 'squares'
  assert str(b.code_path) == inspect.getfile(Squares)


def test_a_builder_made_before_another_process_built_the_data_set_reads_it(tmp_path):
  early = Squares(data_dir=str(tmp_path))  # made first: its split info is empty
  assert not early.info.splits
  data.prepare(Squares(data_dir=str(tmp_path)))  # another builder (another process) builds it
  source = data.tfds_source(early, 'train', tmp_path)
  assert sorted(int(source[i]['x']) for i in range(len(source))) == list(range(5))


def test_every_shared_builder_uses_the_base_and_the_base_is_not_a_data_set():
  for name, cls in datasets.BUILDERS.items():
    assert issubclass(cls, base.ArrayRecordBuilder), name
    assert cls.name == name
    assert str(cls.code_path) == inspect.getfile(cls)
  assert 'array_record_builder' not in tfds.list_builders(with_community_datasets=False)
