"""OmniOPD's text teacher: one batched call for a step's audits vs one call per audit, same run.

    python -m benchmarks.omniopd_teacher [--requests=24] [--reps=3] [--config=...:smollm2]

An OmniOPD step asks the teacher to continue the student's prefix at every audited position
(smollm2 config: 8 rollouts x 3 audits = 24 requests of teacher.max_new_tokens = 24 tokens).
`projects.omniopd.models.LMTeacher` decodes one request at a time through `continue_text` (the
paper's interface, one API call each) or all of them as one batch of left-padded rows through
`continue_texts`, which `TeacherClient.ask_many` uses when the teacher offers it. On a CPU a
batch-1 decode step reads every weight for one token, so the batch pays for the weights once per
step for all rows.

Requests: the config's held-out prompts in its chat template, each with a prefix cut at a random
character of the task's worked answer ('15 - 43 = -28. The answer is -28.', what the warmed-up
student writes), so prefixes (and the rendered lengths) vary as the audits' do. Both ways run
interleaved rep by rep in one process, after one untimed warm-up of each (compilation; the
per-request way compiles one program per prompt-length bucket). Prints the medians and ranges of
wall and CPU seconds per step's worth of requests, the batched / per-request ratio, and how many
of the replies are identical text (greedy on both ways; a difference would be numerics of the
padded batch, not a bug, and is printed rather than asserted).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from common import config as config_lib
from common.rl import tasks
from projects.omniopd import input_pipeline
from projects.omniopd import train


def requests_of(config, n: int, seed: int = 0) -> list[tuple[str, str]]:
  """n (prompt text, prefix) requests from the config's held-out prompts (see the docstring)."""
  task = input_pipeline.make_task(config)
  examples = tasks.load_examples(config.data.task_set, 'test', config.data.seed)
  rng = np.random.default_rng(seed)
  out = []
  for prompt, example in zip(task.test[:n], examples[:n], strict=True):
    worked = tasks.worked_answer(example)
    out.append((task.text(prompt), worked[: int(rng.integers(0, len(worked)))]))
  return out


def _timed(fn):
  t0, c0 = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='experiments/omniopd/configs/base.py:smollm2')
  parser.add_argument('--requests', type=int, default=24, help="one step's audits")
  parser.add_argument('--reps', type=int, default=3)
  args = parser.parse_args()
  config = config_lib.load(args.config)
  t0 = time.perf_counter()
  teacher = train.make_teacher(config, input_pipeline.make_task(config))
  print(
    f'teacher {config.teacher.name or config.teacher.kind} loaded in {time.perf_counter() - t0:.1f} s'
  )
  reqs = requests_of(config, args.requests)
  ways = {
    'per request': lambda: [teacher.continue_text(p, q) for p, q in reqs],
    'batched': lambda: teacher.continue_texts(reqs),
  }
  replies, wall, cpu = {}, {w: [] for w in ways}, {w: [] for w in ways}
  for way, fn in ways.items():  # warm-up: compilation
    replies[way], w, c = _timed(fn)
    print(f'  warm-up {way}: {w:.1f} s wall, {c:.1f} s CPU (compilation included)')
  for _ in range(args.reps):
    for way, fn in ways.items():
      out, w, c = _timed(fn)
      if out != replies[way]:
        raise SystemExit(f'{way}: greedy replies changed between reps')
      wall[way].append(w)
      cpu[way].append(c)
  print(
    f'{args.requests} requests x {config.teacher.max_new_tokens} new tokens, '
    f'{args.reps} reps (median, range):'
  )
  for way in ways:
    print(
      f'  {way:<12} {statistics.median(wall[way]):7.2f} s wall ({min(wall[way]):.2f}-'
      f'{max(wall[way]):.2f}), {statistics.median(cpu[way]):7.2f} s CPU'
    )
  ratio = statistics.median(wall['batched']) / statistics.median(wall['per request'])
  cpu_ratio = statistics.median(cpu['batched']) / statistics.median(cpu['per request'])
  print(f'  batched / per request: {ratio:.3f}x wall, {cpu_ratio:.3f}x CPU')
  same = sum(a == b for a, b in zip(replies['batched'], replies['per request'], strict=True))
  print(f'  identical replies: {same}/{len(reqs)}')


if __name__ == '__main__':
  main()
