"""BlockPruner vs its baselines at equal removed parameters, from run workdirs (a markdown table).

  python -m experiments.blockpruner.compare --blocks=/tmp/bp_smollm2 \
    --baselines=shortgpt=/tmp/bp_shortgpt,layer_ppl=/tmp/bp_layer_ppl

--keys: eval-row keys, or 'train:perplexity' for the search's calibration perplexity.

Each point of a baseline's curve (k layers removed) is paired with the first point of the block
run's curve that removes at least as many parameters (`evaluate.at_equal_params`, the claims'
pairing), for every key in --keys (eval rows of metrics.jsonl; finished or partial runs), and, as
a neutral reading, the block curve interpolated at the baseline's removed parameters
(`evaluate.interpolate`: log-linear for perplexities, linear for accuracies; '-' where the block
curve has no point on both sides). Per baseline and key it also prints the mean over the pairs of
log(block / baseline) for perplexities and block - baseline for accuracies (< 0 / > 0:
BlockPruner better), for both readings.
"""

from __future__ import annotations

import argparse
import math
import pathlib

from common import metrics
from projects.blockpruner import evaluate

KEYS = 'rdocs/perplexity,chatterbot/perplexity,mc/mean'


def _fmt(x: float) -> str:
  return '-' if math.isnan(x) else f'{x:.4g}'


def table(blocks: pathlib.Path, baselines: dict[str, pathlib.Path], keys: list[str]) -> str:
  block_rows = metrics.read_jsonl(blocks / 'metrics.jsonl')
  lines = [
    '| baseline | key | removed (M) | baseline | BlockPruner, next point | its removed (M) '
    '| BlockPruner, interpolated |',
    '|---|---|---|---|---|---|---|',
  ]
  summary = []
  for name, workdir in baselines.items():
    rows = metrics.read_jsonl(workdir / 'metrics.jsonl')
    for key in keys:
      acc = key.startswith('mc/')
      split, _, name_ = key.rpartition(':')
      block_curve = evaluate.curve(block_rows, name_, split or 'eval')
      pairs = evaluate.at_equal_params(block_curve, evaluate.curve(rows, name_, split or 'eval'))
      interp = [evaluate.interpolate(block_curve, budget, log=not acc) for budget, *_ in pairs]
      for (budget, b, a, p), i in zip(pairs, interp, strict=True):
        lines.append(
          f'| {name} | {key} | {budget / 1e6:.2f} | {a:.4g} | {b:.4g} | {p / 1e6:.2f} | {_fmt(i)} |'
        )
      if not pairs:
        continue
      both = [(a, i) for (_, _, a, _), i in zip(pairs, interp, strict=True) if not math.isnan(i)]
      if acc:
        d = sum(b - a for _, b, a, _ in pairs) / len(pairs)
        di = sum(i - a for a, i in both) / len(both) if both else math.nan
        summary.append(
          f'{name} {key}: mean BlockPruner - baseline {d:+.4f} over {len(pairs)} pairs '
          f'(interpolated: {di:+.4f} over {len(both)})'
        )
      else:
        d = evaluate.mean_log_ratio(pairs)
        di = sum(math.log(i / a) for a, i in both) / len(both) if both else math.nan
        summary.append(
          f'{name} {key}: mean log(BlockPruner / baseline) {d:+.4f} (x{math.exp(d):.3f}) over '
          f'{len(pairs)} pairs (interpolated: {di:+.4f}, x{math.exp(di):.3f}, over {len(both)})'
        )
  return '\n'.join(lines + [''] + summary)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--blocks', required=True, help='the BlockPruner run workdir')
  p.add_argument('--baselines', required=True, help='label=workdir pairs, comma separated')
  p.add_argument('--keys', default=KEYS)
  args = p.parse_args(argv)
  try:
    baselines = {
      k: pathlib.Path(v) for k, v in (item.split('=', 1) for item in args.baselines.split(','))
    }
  except ValueError:
    raise SystemExit(f'--baselines={args.baselines!r}: expected label=workdir,...') from None
  for path in [pathlib.Path(args.blocks), *baselines.values()]:
    if not (path / 'metrics.jsonl').is_file():
      raise SystemExit(f'{path}: no metrics.jsonl (not a run workdir)')
  print(table(pathlib.Path(args.blocks), baselines, args.keys.split(',')))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
