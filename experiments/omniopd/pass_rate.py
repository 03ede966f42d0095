"""Starting pass rates of a config's student (and text teacher) on its held-out prompts, measured
before any training claim (the 10-60% window of projects/omniopd/README.md).

    python -m experiments.omniopd.pass_rate \
      --config=experiments/omniopd/configs/base.py:smollm2 --n=40 [--samples=4] [--teacher]

Prints the student's greedy accuracy and its pass@1 at the config's rollout temperature
rl.temperature (mean over --samples samples per prompt), and with --teacher the teacher's greedy accuracy through its text interface (its
continuation of the empty prefix, scored by the task's scorer).
"""

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
    teacher = train.make_teacher(config, task)
    ok = []
    for p in prompts:
      text = teacher.continue_text(task.text(p), '') or ''
      ok.append(rgd.score(p.cluster, text, p.payload, binary=True))
    print(f'teacher greedy (text) on {len(prompts)} held-out prompts: {np.mean(ok):.3f}')


if __name__ == '__main__':
  _define_flags()
  flags.mark_flag_as_required('config')
  app.run(main)
