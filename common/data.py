"""Input pipelines: deterministic, per-process, checkpointable grain iterators of global batches.

The contract every paper relies on:
  * global batch k holds the examples with global indices [k*B, (k+1)*B) of an index stream
    (optionally a per-epoch permutation of a finite source); process p of P reads the contiguous
    slice [k*B + p*B/P, k*B + (p+1)*B/P), so the set of examples per step, and so every result, does
    not depend on how many processes share the work;
  * any randomness inside an example comes from (seed, global index), never from iterator state;
  * the iterator is a grain DatasetIterator whose state (the next batch index) is saved in checkpoints
    by common.checkpoint, so a resumed run reads exactly the next batch.

Real data sets are TFDS builders written with `file_format='array_record'` (no TensorFlow), built
once into `data_dir()` (outside the repo) by `prepare` and read through `tfds_source`, a random-access
source for `batch_iterator`; the shared builders and this plumbing live in `common.datasets`.

`MarkovLanguage` is a procedural language (a seeded second-order Markov chain over a small vocabulary)
whose exact entropy rate is known, so a model's loss can be compared with the best achievable.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import functools
import os
import pathlib
from typing import Any
from typing import Protocol

import grain
import jax
import numpy as np


class RandomAccessSource(Protocol):
  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Any: ...


def _stack(examples: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *xs: np.stack(xs), *examples)


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, epoch: int, n: int) -> grain.MapDataset:
  """A lazy random-access permutation of range(n) for one epoch (grain's index shuffle: O(1)
  memory, so sources of 2**40 examples shuffle as cheaply as small ones)."""
  epoch_seed = int(np.random.default_rng([seed, epoch, 0x5EED]).integers(0, 2**31 - 1))
  return grain.MapDataset.range(n).shuffle(seed=epoch_seed)


def batch_iterator(
  source: RandomAccessSource,
  *,
  global_batch_size: int,
  shuffle_seed: int | None = None,
  num_epochs: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  transform: Callable[[Any], Any] | None = None,
  prefetch: int = 2,
) -> grain.DatasetIterator:
  """Process-local batches (pytrees of stacked numpy arrays) from a random-access source.

  Examples are indexed globally: with `shuffle_seed`, epoch e reads a permutation drawn from
  (seed, e); `num_epochs=None` repeats forever. `transform(example)` runs per example (grain map).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count})')
  if global_batch_size % process_count:
    raise ValueError(
      f'global batch size {global_batch_size} is not divisible by {process_count} processes'
    )
  local = global_batch_size // process_count
  n = len(source)
  if n == 0:
    raise ValueError('data source is empty')
  total = n * num_epochs if num_epochs is not None else None

  def example_at(g: int) -> Any:
    epoch, pos = divmod(g, n)
    if shuffle_seed is not None:
      pos = int(_epoch_permutation(shuffle_seed, epoch, n)[pos])
    ex = source[pos]
    return transform(ex) if transform is not None else ex

  def batch_at(k: int) -> Any:
    first = k * global_batch_size + process_index * local
    return _stack([example_at(g) for g in range(first, first + local)])

  num_batches = total // global_batch_size if total is not None else None
  ds = grain.MapDataset.range(num_batches if num_batches is not None else 2**62).map(batch_at)
  read = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=max(prefetch, 1))
  return iter(ds.to_iter_dataset(read_options=read))


# ---------------------------------------------------------------------------------------------------
# TFDS builders (array_record, no TensorFlow): build once into a cache outside the repo, read back as
# random-access sources. The plumbing lives with the builders (common.datasets.base); these are its
# entry points for input pipelines, imported on first use (tfds and the builders load only then).


def data_dir() -> pathlib.Path:
  """Where TFDS data sets are built: $MONOREPO_DATA_DIR, else the monorepo cache's tfds/ folder."""
  from common.datasets import base  # noqa: PLC0415

  return base.data_dir()


def builder(builder_or_name: Any, data_dir: str | os.PathLike | None = None):
  """A tfds DatasetBuilder from an instance, a builder class or a registered name ('name/config').

  Names of the shared builders in `common.datasets` resolve without importing them first.
  """
  from common.datasets import base  # noqa: PLC0415

  return base.builder(builder_or_name, data_dir)


def prepare(builder_or_name: Any, data_dir: str | os.PathLike | None = None):
  """Builds the data set once and returns its (prepared) builder; later calls only read it.

  Atomic and serialised by a file lock: see common.datasets.base.prepare.
  """
  from common.datasets import base  # noqa: PLC0415

  return base.prepare(builder_or_name, data_dir)


def tfds_source(
  builder_or_name: Any, split: str, data_dir: str | os.PathLike | None = None
) -> RandomAccessSource:
  """A random-access source (len, [i]) over a TFDS split, building the data set first if needed.

  `split` accepts tfds slicing ('train[:10%]'). Examples are dicts of numpy values; Text features
  come back as UTF-8 bytes (there is no TensorFlow to decode them).
  """
  from common.datasets import base  # noqa: PLC0415

  return base.tfds_source(builder_or_name, split, data_dir)


# ---------------------------------------------------------------------------------------------------
# A procedural language with a known entropy rate.


class MarkovLanguage:
  """A seeded second-order Markov chain over `vocab_size` tokens, id 0 reserved for BOS.

  Each context (a, b) allows `branching` next tokens with Dirichlet(alpha) probabilities, so the
  language has real structure for a model to learn and an exact entropy rate (nats/token) to compare
  the model's loss with. Example i = sequence drawn with the key (seed, i): random access, no disk.
  """

  def __init__(
    self,
    vocab_size: int = 64,
    seq_len: int = 128,
    *,
    seed: int = 0,
    branching: int = 4,
    alpha: float = 0.5,
    num_examples: int = 1 << 30,
  ):
    if vocab_size < 3 or branching < 1 or branching > vocab_size - 1:
      raise ValueError(f'bad MarkovLanguage sizes: vocab {vocab_size}, branching {branching}')
    self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
    self.num_examples = num_examples
    rng = np.random.default_rng([seed, 0xC0DE])
    v = vocab_size - 1  # real tokens are 1..v
    self.next_tokens = np.stack(
      [rng.choice(v, size=branching, replace=False) + 1 for _ in range((v + 1) * (v + 1))]
    ).reshape(v + 1, v + 1, branching)
    self.next_probs = rng.dirichlet([alpha] * branching, size=(v + 1, v + 1))
    self._cdf = np.cumsum(self.next_probs, axis=-1)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, int(index)])
    u = rng.random(self.seq_len)
    out = np.zeros(self.seq_len + 1, np.int32)  # out[0] = BOS
    a, b = 0, 0
    for t in range(self.seq_len):
      choice = min(int(np.searchsorted(self._cdf[a, b], u[t])), self._cdf.shape[-1] - 1)
      tok = int(self.next_tokens[a, b, choice])
      out[t + 1] = tok
      a, b = b, tok
    return {'tokens': out}

  def optimal_loss(self) -> float:
    """The lowest achievable next-token loss (nats/token, averaged over the seq_len positions).

    Exact: propagates the distribution over contexts (a, b) from the BOS context (0, 0) and averages
    the conditional entropy of the next token; a model's cross-entropy can only approach it.
    """
    v1 = self.vocab_size
    b_index = np.broadcast_to(np.arange(v1)[None, :], (v1, v1))
    h = -(self.next_probs * np.log(np.maximum(self.next_probs, 1e-300))).sum(-1)
    pair = np.zeros((v1, v1))
    pair[0, 0] = 1.0
    total = 0.0
    for _ in range(self.seq_len):
      total += float((pair * h).sum())
      new = np.zeros_like(pair)
      for k in range(self.next_tokens.shape[-1]):
        np.add.at(new, (b_index, self.next_tokens[..., k]), pair * self.next_probs[..., k])
      pair = new
    return total / self.seq_len
