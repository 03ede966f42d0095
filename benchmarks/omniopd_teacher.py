"""OmniOPD's text teacher: a step's audits in one batched call, with and without shared prefills,
vs one call per audit, same run.

    python -m benchmarks.omniopd_teacher [--reps=3] [--ways=per_request,batched,shared]
        [--config=...:smollm2]

An OmniOPD step asks the teacher to continue the student's prefix at every audited position
(smollm2 config: 8 rollouts x 3 audits = 24 requests of teacher.max_new_tokens = 24 tokens).
`projects.omniopd.models.LMTeacher` decodes one request at a time through `continue_text` (the
paper's interface, one API call each) or all of them as one batch of left-padded rows through
`continue_texts`, which `TeacherClient.ask_many` uses when the teacher offers it. On a CPU a
batch-1 decode step reads every weight for one token, so the batch pays for the weights once per
step for all rows.

Batched with shared prefills (`LMTeacher(share_prefixes=True)`, the default): a step's audits come
three to a rollout, one prompt with nested prefixes; the longest request of each prompt is
prefilled once and the others continue from its KV cache, so the prefill (most of a batch's time
at ~100-200-token prompts) covers 8 rows instead of 24.

Requests: one step's real audits. The config's student (SmolLM2-135M-Instruct, as released) rolls
out the first rl.prompts_per_step training prompts with the config's sampling, the audits are its
entropy peaks (omniopd.audits per rollout), and each request is (the prompt's text, the decoded
rollout before the peak), exactly what `train.audit` asks. All ways run interleaved rep by rep in
one process, after one untimed warm-up of each (compilation; the per-request way compiles one
program per prompt-length bucket). Prints the medians and ranges of wall and CPU seconds per
step's worth of requests, the ratios to the batched way, and how many replies are identical to
the batched way's text (greedy everywhere; a difference would be numerics of padding or of the
shared prefill, not a bug, and is printed rather than asserted).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from common import config as config_lib
from projects.omniopd import input_pipeline
from projects.omniopd import train


def requests_of(config) -> list[tuple[str, str]]:
  """One step's (prompt text, prefix) audit requests from a real student rollout (docstring)."""
  import jax  # noqa: PLC0415

  from common import sharding  # noqa: PLC0415
  from common import train_loop  # noqa: PLC0415
  from common.rl import rollout  # noqa: PLC0415
  from projects.omniopd import losses  # noqa: PLC0415
  from projects.omniopd import models  # noqa: PLC0415

  task = input_pipeline.make_task(config)
  mesh = sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])
  rules = sharding.rules_of(config)
  prompts = task.train[: config.rl.prompts_per_step]
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    ro = rollout.rollout(
      models.create_policy(config, mesh, rules)(),
      prompts,
      train_loop.step_key(config.seed, 1, 'rollout'),
      sampling=train.sampling_of(config, task),
      rewards=task.verifier(),
      num_samples=1,
      mesh=mesh,
      rules=rules,
    )
  c = config.omniopd
  peaks = losses.peak_entropy_positions(ro.entropies, ro.lengths, c.audits, c.min_entropy)
  return [
    (task.text(prompts[b]), task.decode(ro.completion[b, :t]))
    for b in range(len(prompts))
    for t in peaks[b]
  ]


def _timed(fn):
  t0, c0 = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='experiments/omniopd/configs/base.py:smollm2')
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument(
    '--ways', default='per_request,batched,shared', help='comma list of per_request|batched|shared'
  )
  args = parser.parse_args()
  config = config_lib.load(args.config)
  t0 = time.perf_counter()
  teacher = train.make_teacher(config, input_pipeline.make_task(config))
  print(
    f'teacher {config.teacher.name or config.teacher.kind} loaded in {time.perf_counter() - t0:.1f} s'
  )
  reqs = requests_of(config)
  print(f'{len(reqs)} requests over {len({p for p, _ in reqs})} prompts')
  plain = copy.copy(teacher)
  plain.share_prefixes = False
  every = {
    'per_request': lambda: [plain.continue_text(p, q) for p, q in reqs],
    'batched': lambda: plain.continue_texts(reqs),
    'shared': lambda: teacher.continue_texts(reqs),
  }
  names = args.ways.split(',')
  if 'batched' not in names or any(w not in every for w in names):
    raise SystemExit(f'--ways: a comma list of {sorted(every)} that includes batched')
  ways = {w: every[w] for w in names}
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
    f'{len(reqs)} requests x {config.teacher.max_new_tokens} new tokens, '
    f'{args.reps} reps (median, range):'
  )
  base_wall, base_cpu = statistics.median(wall['batched']), statistics.median(cpu['batched'])
  for way in ways:
    same = sum(a == b for a, b in zip(replies[way], replies['batched'], strict=True))
    print(
      f'  {way:<12} {statistics.median(wall[way]):7.2f} s wall ({min(wall[way]):.2f}-'
      f'{max(wall[way]):.2f}), {statistics.median(cpu[way]):7.2f} s CPU; '
      f'{statistics.median(wall[way]) / base_wall:.3f}x / {statistics.median(cpu[way]) / base_cpu:.3f}x '
      f'the batched wall / CPU; replies identical to it {same}/{len(reqs)}'
    )


if __name__ == '__main__':
  main()
