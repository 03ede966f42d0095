"""FusionRoute's procedural domains, rows, preference pairs and sequence selection."""

from __future__ import annotations

import numpy as np

from experiments.fusionroute.configs import base
from projects.fusionroute import evaluate
from projects.fusionroute import input_pipeline as ip


def test_problems_are_deterministic_correct_and_split_by_content():
  for dom in range(3):
    for i in range(50):
      p = ip.problem(dom, 0, 'train', i)
      assert p == ip.problem(dom, 0, 'train', i)
      assert ip.split_of(p.prompt) == 'train'
      assert ip.split_of(ip.problem(dom, 0, 'eval', i).prompt) == 'eval'
      if dom == ip.MATH:
        a, b = int(p.prompt[:2]), int(p.prompt[3:5])
        assert p.answer == str(a + b)[::-1]  # ones digit first
        assert p.is_flaw_case == ip.carry9(a, b)
        if p.is_flaw_case:
          assert p.flawed == str(a + b - 10)[::-1]
      else:
        word = p.prompt[2:-1]
        assert p.answer == (word[::-1] if dom == ip.CODE else word.upper())


def test_flaw_set_holds_only_flaw_cases_and_rows_mask_the_answer():
  c = base.get_config('smoke,data.flaw_eval=16')
  flaw = ip.flaw_problems(c)
  assert len(flaw) == 16 and all(p.is_flaw_case and p.domain == ip.MATH for p in flaw)
  p = ip.problem(ip.MATH, 0, 'train', 3)
  row = ip.sft_row(p)
  masked = row['targets'][row['loss_mask'] > 0]
  assert list(masked) == ip.answer_ids(p.answer)  # the answer and EOS, not the prompt
  assert ip.decode(ip.encode(p.prompt)) == p.prompt


def test_pairs_reject_the_domain_experts_wrong_answer_first():
  probs = [ip.problem(d, 0, 'train', 7) for d in range(3)]
  answers = [[p.answer for p in probs] for _ in range(3)]
  answers[0][0] = 'x'  # the math expert is wrong on the math prompt
  answers[1][0] = 'y'  # and so is the code expert
  answers[2][2] = 'z'  # the instruct expert on the instruct prompt
  pairs = ip.make_pairs(probs, answers)
  assert list(pairs['domain']) == [ip.MATH, ip.INSTRUCT]  # the code prompt: everyone right
  assert list(pairs['expert']) == [0, 2]


def test_sequence_selection_picks_the_most_likely_answer_per_prompt():
  es = evaluate.EvalSet(
    problems=[ip.problem(0, 0, 'eval', i) for i in range(3)],
    flaw=np.zeros(3, bool),
    tokens=np.zeros((3, ip.PROMPT_LEN), np.int32),
    mask=np.ones((3, ip.PROMPT_LEN), bool),
    domains=np.zeros(3, np.int32),
    batch_size=3,
  )
  a = evaluate.Decoded(['1', '2', '3'], np.array([1, 0, 1], bool), np.array([-1.0, -5.0, -0.1]), 0)
  b = evaluate.Decoded(['4', '5', '6'], np.array([0, 1, 0], bool), np.array([-2.0, -0.5, -3.0]), 0)
  a.experts = np.zeros((3, 2), np.int32)
  b.experts = np.ones((3, 2), np.int32)
  picked = evaluate.sequence_selection([a, b], es)
  assert picked.answers == ['1', '5', '3']
  np.testing.assert_array_equal(picked.correct, [True, True, True])
