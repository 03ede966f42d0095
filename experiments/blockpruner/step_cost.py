"""Measured cost of BlockPruner's search on a model: CPU seconds per calibration forward and per
scored candidate, and the estimate for a whole search from them (before committing hours to one).

  python -m experiments.blockpruner.step_cost --variants=smollm2,gemma3,qwen2_5 \
    --overrides=calib.num_samples=8,calib.batch_size=8,calib.seq_len=128

Per variant (experiments/blockpruner/configs/base.py): loads the model, builds the calibration set
and `losses.CalibrationScorer` as a run does, compiles, then times (process CPU time, all threads)
two full forwards and the scoring of 6 candidates (MHA and MLP of the first, middle and last layer;
with the prefix cache this includes one residual-stream pass). A greedy search over B blocks
scores B + (B - 1) + ... candidates for its steps; the estimate multiplies by the mean candidate
cost and leaves out the evaluations after each step.
"""

from __future__ import annotations

import argparse
import resource
import time

from experiments.blockpruner.configs import base
from projects.blockpruner import input_pipeline
from projects.blockpruner import losses
from projects.blockpruner import models


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def measure(variant: str, overrides: str = '') -> dict[str, float]:
  config = base.get_config(','.join(x for x in (variant, overrides) if x))
  model, tok = models.load(config)
  scorer = losses.CalibrationScorer(
    model,
    input_pipeline.calibration(config, tok),
    batch_size=config.calib.batch_size,
    prefix_cache=config.prune.prefix_cache,
  )
  num_layers = model.cfg.num_layers
  dense = models.mask_of([], num_layers)
  scorer.loss(dense)  # compile
  scorer.candidate_losses(dense, [[(0, 'mha')]])
  c = cpu_seconds()
  for _ in range(2):
    scorer.loss(dense)
  forward = (cpu_seconds() - c) / 2
  candidates = [[(i, k)] for k in models.KINDS for i in (0, num_layers // 2, num_layers - 1)]
  c = cpu_seconds()
  scorer.candidate_losses(dense, candidates)
  per_candidate = (cpu_seconds() - c) / len(candidates)
  blocks = len(models.all_blocks(num_layers, config.prune.block_type))
  steps = config.train.num_steps
  scored = sum(blocks - s for s in range(steps))
  return {
    'num_layers': num_layers,
    'forward_cpu_s': forward,
    'candidate_cpu_s': per_candidate,
    'steps': steps,
    'candidates': scored,
    'search_cpu_min': scored * per_candidate / 60,
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--variants', default='smollm2,gemma3,qwen2_5')
  p.add_argument('--overrides', default='calib.num_samples=8,calib.batch_size=8,calib.seq_len=128')
  args = p.parse_args(argv)
  for variant in args.variants.split(','):
    t = time.perf_counter()
    m = measure(variant, args.overrides)
    print(
      f'{variant}: {m["num_layers"]} layers; full calibration forward {m["forward_cpu_s"]:.2f} '
      f'CPU s; per candidate {m["candidate_cpu_s"]:.2f} CPU s; {m["steps"]} steps = '
      f'{m["candidates"]} candidates ~ {m["search_cpu_min"]:.0f} CPU min of search (evaluations '
      f'not included); measured in {time.perf_counter() - t:.0f} s wall',
      flush=True,
    )
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
