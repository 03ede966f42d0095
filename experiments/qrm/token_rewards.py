"""A trained token-level reward model read token by token on correct answers.

    python -m experiments.qrm.token_rewards --config=experiments/qrm/configs/base.py:smollm2 \
      --rm_workdir=/tmp/qrm_smollm2/rm_qrm [--n=3] [--kind=qrm]

For the first --n held-out questions of the config's task set, the reference reply (the task's
worked answer, '26 - 28 = -2. The answer is -2.', and the chat's end-of-turn token: the traces the
corrupted pairs are built from, `input_pipeline.make_text(...).answer`) is scored by the reward
model of --rm_workdir as the RL loop would score it (`projects.qrm.train.pair_scores`: beta log phi
for Q-RM, the scaled log-ratio for DPO), and beside each token the starting policy's log-probability
and both networks' preferred next token. Every token of these replies is correct, so a strongly
negative reward on one of them is a reward the policy will be pushed away from though it should not
be: what to look at before believing an RL arm driven by these rewards. Prints one line per token
and, per reply, the sum of its rewards.
"""

from __future__ import annotations

import argparse
import types

import jax
import numpy as np

from common import config as config_lib
from common import sharding
from common.rl import rollout
from common.sampling import sampler as sampler_lib
from projects.qrm import input_pipeline
from projects.qrm import train


def reference_batch(config, n: int):
  """(prompts, rollout batch of their worked answers + stop token, the text helpers)."""
  text = input_pipeline.make_text(config)
  examples = input_pipeline.load_examples(config.data.task_set, 'test', config.data.seed)[:n]
  prompts = input_pipeline.prompts(examples, 'test', text.render)
  replies = [list(text.answer(e)) for e in examples]  # the pairs' reference traces
  completion, real = sampler_lib.pad_prompts(replies, side='right', pad_id=text.pad)
  toks, mask = rollout.pad_prompts(prompts, config.rl.prompt_len, text.pad)
  batch = rollout.build_batch(toks, mask, completion, real.sum(axis=1))
  return prompts, batch, text


def _top(model, batch) -> np.ndarray:
  """Each completion position's most likely next token under `model` [B, N]."""
  n = batch['targets'].shape[1]
  h = model.hidden_states(
    batch['inputs'], positions=batch['positions'], segment_ids=batch['segment_ids']
  )
  return np.asarray(jax.numpy.argmax(model.logits_from_hidden(h[:, -n:]), -1))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--rm_workdir', required=True, help='a finished reward-model run')
  parser.add_argument('--kind', default='qrm', choices=('qrm', 'dpo'))
  parser.add_argument('--n', type=int, default=3, help='held-out questions')
  args = parser.parse_args()
  config = config_lib.load(args.config)
  mesh = sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])
  rules = sharding.rules_of(config)
  rm = train.load_reward_model(config, args.rm_workdir)
  start = train.starting_network(config)  # the DPO reference and the policy
  prompts, batch, text = reference_batch(config, args.n)
  rows = types.SimpleNamespace(rows=batch)  # pair_scores reads only .rows
  with jax.set_mesh(mesh):
    reward, _ = train.pair_scores(args.kind, rm, start, rows, config.rm, mesh, rules)
    policy = train.rm_score(start, batch, mesh, rules)
  rm_top, policy_top = _top(rm, batch), _top(start, batch)
  word = lambda t: repr(text.tok.decode([int(t)]))  # noqa: E731
  for i, prompt in enumerate(prompts):
    print(f'\n{text.tok.decode(list(prompt.tokens))!r}')
    print(
      f'  {"token":>10} {"reward":>8} {"policy logp":>12} {"rm prefers":>12} {"policy prefers":>15}'
    )
    length = int(batch['completion_mask'][i].sum())
    for t in range(length):
      tok = batch['targets'][i, t]
      print(
        f'  {word(tok):>10} {reward[i, t]:8.3f} {policy[i, t]:12.3f} {word(rm_top[i, t]):>12} '
        f'{word(policy_top[i, t]):>15}'
      )
    print(f'  sum of rewards {reward[i, :length].sum():.3f} over {length} tokens')


if __name__ == '__main__':
  main()
