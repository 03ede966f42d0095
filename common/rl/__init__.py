"""Shared RL-with-verifiable-rewards machinery: advantage estimators (advantages.py), the clipped
token-level surrogate with KL to a reference (loss.py) and the rollout/update loop (loop.py)."""
