"""FusionRoute's SmolLM2 pilot (issue #20 item 4): the expert x domain matrix, then a few router steps.

  python -m experiments.fusionroute.smollm2_pilot --router_steps=4 --test_per_domain=32 \
      --out=reports/fusionroute/smollm2_pilot.json

1. the three experts (projects/fusionroute/smollm2.py): SmolLM2-135M-Instruct (general) and merged
   LoRA fine-tunes on reasoning-gym basic_arithmetic (math) and word_sequence_reversal (string),
   trained on first use and cached (their specs: smollm2.EXPERT_SPECS);
2. the expert x domain matrix: every expert's greedy answers on test_per_domain held-out questions
   of each domain (math, string, logic = syllogism), scored by reasoning-gym's verifier; the
   general expert's row is SmolLM2's starting accuracy;
3. the router (SmolLM2 + a fresh 3-way routing head, the paper's init) trained for router_steps
   steps of stage 1 (projects/fusionroute/losses.sft_loss: L_LM + lambda L_expert on the
   disagreement set; AdamW on the whole router, lr 1e-5) on balanced rows of the three domains'
   train questions, then FusionRoute, routing-only, the router LM alone and oracle routing decoded
   greedily on the same held-out questions (projects/fusionroute/models.generate);
4. per-step and per-evaluation costs, written with the numbers to --out (JSON).

This is a pilot of the smollm2 arm, not the arm: it is not resumable (train.train_and_evaluate
still stops on experts.source=smollm2); the expert adapters are cached, so a re-run repeats only the
evaluation and the router steps.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import numpy as np
import optax

from common import sharding
from common.sampling import sampler
from projects.fusionroute import losses
from projects.fusionroute import models
from projects.fusionroute import smollm2 as sm

FLAGS = flags.FLAGS
flags.DEFINE_integer('test_per_domain', 32, 'held-out questions per domain')
flags.DEFINE_integer('router_steps', 4, 'stage-1 router steps (0: matrix only)')
flags.DEFINE_integer('router_batch', 6, 'router SFT rows per step (a multiple of 3: balanced)')
flags.DEFINE_integer('seq_len', 88, 'router row length')
flags.DEFINE_integer('max_new_tokens', 24, 'greedy answer length')
flags.DEFINE_list(
  'fused_methods',
  ['fusionroute', 'routing_only', 'router_lm', 'oracle'],
  'decodings after the router steps',
)
flags.DEFINE_string('out', 'reports/fusionroute/smollm2_pilot.json', 'where the numbers go')


def _commit() -> str:
  def git(*a):
    return subprocess.run(['git', *a], capture_output=True, text=True, check=False).stdout.strip()

  dirty = git('status', '--porcelain', '--', 'projects/fusionroute', 'experiments/fusionroute')
  return git('rev-parse', '--short', 'HEAD') + ('+dirty' if dirty else '')


def fused_answers(model, tok, examples, mix_fn, batch, max_new_tokens):
  """Greedy answers under a models.Mixing (mix_fn(batch, domains)), scored by the verifier."""
  prompts = sm.prompts_of(tok, examples)
  scores, experts = [], []
  for start in range(0, len(prompts), batch):
    chunk = prompts[start : start + batch]
    real = len(chunk)
    chunk = chunk + [chunk[0]] * (batch - real)
    tokens, mask = sampler.pad_prompts(chunk, side='left', pad_id=sm.PAD)
    doms = np.asarray([sm.DOMAINS.index(_domain_of(e)) for e in examples[start : start + real]])
    doms = np.concatenate([doms, np.full(batch - real, doms[0])])
    with sharding.unsharded():
      gen = models.generate(
        model,
        tokens,
        mix_fn(batch, doms),
        prompt_mask=mask,
        max_new_tokens=max_new_tokens,
        eos_id=tok.eos_id,
        pad_id=sm.PAD,
      )
    t, n = np.asarray(gen.tokens)[:real], np.asarray(gen.lengths)[:real]
    scores.append(sm.score(tok, examples[start : start + real], t, n))
    sel = np.asarray(gen.experts)[:real]
    experts.append(
      [
        (s[s >= 0] == d).mean() if (s >= 0).any() else 0.0
        for s, d in zip(sel, doms[:real], strict=True)
      ]
    )
  return float(np.concatenate(scores).mean()), float(np.mean(np.concatenate(experts)))


_TASK_DOMAIN = {spec.name: dom for dom, spec in sm.task_specs(0, 0).items()}


def _domain_of(example) -> str:
  return _TASK_DOMAIN[example['task']]


def main(argv):
  del argv
  out: dict = {'commit': _commit(), 'device': str(jax.devices()[0]), 'cpus': jax.device_count()}
  t_all = time.perf_counter()
  experts, records = {}, {}
  for dom in ('math', 'string'):
    params, rec = sm.expert(sm.EXPERT_SPECS[dom], log=print)
    experts[dom] = params
    records[dom] = {
      'spec': rec['spec'],
      'final_loss': rec['curve'][-1],
      'median_step_s': float(np.median(rec['step_s'][1:])),
      'train_wall_s': rec['wall_s'],
      'trainable': rec['trainable'],
    }
  out['experts'] = records
  base, tok = sm.pretrained()
  decoders = {
    'math': sm.decoder_from(experts['math']),
    'string': sm.decoder_from(experts['string']),
    'general': base,
  }
  data = sm.load_examples(max(s.train_examples for s in sm.EXPERT_SPECS.values()), 200)
  test = {d: data[d]['test'][: FLAGS.test_per_domain] for d in sm.DOMAINS}
  t0 = time.perf_counter()
  print('expert x domain matrix (greedy, verifier accuracy):', flush=True)
  out['matrix'] = sm.matrix(decoders, tok, test, max_new_tokens=FLAGS.max_new_tokens, log=print)
  out['matrix_wall_s'] = time.perf_counter() - t0
  out['test_per_domain'] = FLAGS.test_per_domain
  _write(out)  # the matrix is kept even if the router part dies (it was OOM-killed once)
  if FLAGS.router_steps > 0:
    out['router'] = router_pilot(decoders, tok, data, test)
  out['total_wall_s'] = time.perf_counter() - t_all
  _write(out)
  print(json.dumps(out, indent=1))


def _write(out: dict) -> None:
  path = pathlib.Path(FLAGS.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=1) + '\n')


def router_pilot(decoders, tok, data, test) -> dict:
  """A few stage-1 steps of the router over the three experts, then the fused evaluations."""
  res = {}
  lm, _ = sm.pretrained()
  with sharding.unsharded():
    router = models.Router(lm, len(sm.EXPERTS), rngs=nnx.Rngs(0))
    model = models.FusionRoute(router, [decoders[e] for e in sm.EXPERTS])
  per = FLAGS.router_batch // len(sm.DOMAINS)
  rows = {
    i: sm.domain_rows(tok, data[d]['train'][-200:], i, FLAGS.seq_len)
    for i, d in enumerate(sm.DOMAINS)
  }
  with sharding.unsharded():
    opt = nnx.Optimizer(model, optax.adamw(1e-5, weight_decay=0.0), wrt=nnx.Param)

  def loss_fn(model, batch):
    return losses.sft_loss(model, batch, lam=1.0 / 3.0, routing=True)

  @nnx.jit
  def step(model, opt, batch):
    (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
    opt.update(model, grads)
    return loss, metrics

  times, curve = [], []
  for s in range(FLAGS.router_steps):
    batch = sm.stack([rows[i][(s * per + k) % len(rows[i])] for i in rows for k in range(per)])
    t0 = time.perf_counter()
    loss, metrics = step(model, opt, batch)
    loss = float(loss)
    times.append(time.perf_counter() - t0)
    curve.append(loss)
    print(f'router step {s + 1}: loss {loss:.4f} ({times[-1]:.1f} s)', flush=True)
  res['steps'] = FLAGS.router_steps
  res['batch_rows'] = per * len(sm.DOMAINS)
  res['seq_len'] = FLAGS.seq_len
  res['loss_curve'] = curve
  res['step_s'] = times
  res['last_metrics'] = {k: float(v) for k, v in metrics.items()}
  del opt  # the router's AdamW moments (1 GB) are not needed to decode
  n = len(sm.EXPERTS)
  mixes = {
    'fusionroute': lambda b, _: models.fusionroute(b, n),
    'routing_only': lambda b, _: models.routing_only(b, n),
    'router_lm': lambda b, _: models.router_lm(b, n),
    'oracle': lambda _, d: models.oracle(d, n),
  }
  for name in FLAGS.fused_methods:
    mix = mixes[name]
    t0 = time.perf_counter()
    per_dom = {}
    for d in sm.DOMAINS:
      per_dom[d], match = fused_answers(model, tok, test[d], mix, 32, FLAGS.max_new_tokens)
      per_dom[f'{d}_domain_match'] = match
    per_dom['mixed'] = float(np.mean([per_dom[d] for d in sm.DOMAINS]))
    per_dom['wall_s'] = time.perf_counter() - t0
    res[name] = per_dom
    print(name, per_dom, flush=True)
  return res


if __name__ == '__main__':
  app.run(main)
