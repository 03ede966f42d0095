"""Shared RL-with-verifiable-rewards machinery: advantage estimators (advantages.py), reward shaping
(rewards.py: DAPO's soft overlong punishment), the clipped token-level surrogate with KL to a
reference (loss.py), curricula (curriculum.py) and the rollout/update loop (loop.py)."""
