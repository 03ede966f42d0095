"""Starting pass rates of a config's student (and text teacher) on its held-out prompts, measured
before any training claim (the 10-60% window of projects/omniopd/README.md).

    python -m experiments.omniopd.pass_rate \
      --config=experiments/omniopd/configs/base.py:smollm2 --n=40 [--samples=4] [--teacher]

Prints the student's greedy accuracy and its pass@1 at the config's rollout temperature
rl.temperature (mean over --samples samples per prompt), and with --teacher the teacher's greedy
accuracy through its text interface (its continuation of the empty prefix, all prompts in one
batched call, scored by the task's scorer) and what that call cost. The teacher answers within
teacher.max_new_tokens (the smollm2 config's 24 are its chunk comparisons' length, too few to reach
an answer: pass ...,teacher.max_new_tokens=128 for its accuracy).
"""

import time

from absl import app
from absl import flags
import jax
import numpy as np

from common import config as config_lib
from common import sharding
from common.datasets import reasoning_gym as rgd
from common.rl import evaluate as rl_evaluate
from projects.omniopd import evaluate
from projects.omniopd import input_pipeline
from projects.omniopd import models
from projects.omniopd import train

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Registered only when run as a script, so importing this module (tests, the all-modules
  import check) never registers a second --config beside common.launch's."""
  flags.DEFINE_string('config', None, 'config, e.g. experiments/omniopd/configs/base.py:smollm2')
  flags.DEFINE_integer('n', 40, 'held-out prompts')
  flags.DEFINE_integer('samples', 4, 'samples per prompt at rl.temperature (0: greedy only)')
  flags.DEFINE_bool('teacher', False, "also the teacher's greedy accuracy (text interface)")
  flags.DEFINE_integer('show', 0, "print the teacher's first SHOW answers")


def main(argv):
  del argv
  config = config_lib.load(FLAGS.config)
  task = input_pipeline.make_task(config)
  prompts = task.test[: FLAGS.n]
  mesh = sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])
  rules = sharding.rules_of(config)
  student = models.create_policy(config, mesh, rules)()
  sampling = train.sampling_of(config, task)
  batch = min(len(prompts), config.rl.eval_batch)
  with jax.set_mesh(mesh):
    greedy = evaluate.heldout(
      student,
      prompts,
      batch=batch,
      sampling=sampling,
      rewards=task.verifier(),
      mesh=mesh,
      rules=rules,
    )
    print(f'student greedy on {len(prompts)} held-out prompts: {greedy}')
    if FLAGS.samples:
      rates = rl_evaluate.pass_rates(
        student,
        prompts,
        FLAGS.samples,
        batch=batch * FLAGS.samples,
        sampling=sampling,
        rewards=task.verifier(),
        mesh=mesh,
        rules=rules,
        seed=0,
      )
      r = np.asarray([rates[p.uid] for p in prompts])
      print(
        f'student T={config.rl.temperature:g}: pass@1 {r.mean():.3f}, pass@{FLAGS.samples} {(r > 0).mean():.3f}'
      )
  if FLAGS.teacher:
    # Through the training loop's client (batched when the teacher batches), without its timeout.
    client = models.TeacherClient(train.make_teacher(config, task), timeout_s=24 * 3600)
    t0, c0 = time.perf_counter(), time.process_time()
    texts = client.ask_many([(task.text(p), '') for p in prompts])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ok = [
      rgd.score(p.cluster, t or '', p.payload, binary=True)
      for p, t in zip(prompts, texts, strict=True)
    ]
    print(
      f'teacher greedy (text, {config.teacher.max_new_tokens} new tokens) on {len(prompts)} '
      f'held-out prompts: {np.mean(ok):.3f} ({wall:.1f} s wall, {cpu:.1f} s CPU, compile included)'
    )
    if FLAGS.show:
      for p, t in list(zip(prompts, texts, strict=True))[: FLAGS.show]:
        print(f'  {task.text(p)!r} -> {t!r}')


if __name__ == '__main__':
  _define_flags()
  flags.mark_flag_as_required('config')
  app.run(main)
