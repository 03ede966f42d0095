"""Reward models on the shared decoder: scalar sequence and token-level heads, Bradley-Terry
training and pairwise metrics.

  batch = heads.pair_batch(pairs)                  # PAIR_KEYS pairs -> 2B full sequences
  out = heads.RewardModel(backbone, rngs=...)(batch)  # rewards [2B], features [2B, d], tokens [2B, N]
  loss, metrics = training.bradley_terry_loss(model, batch)
  metrics.pairwise_accuracy(chosen, rejected); metrics.calibration(chosen, rejected)

heads: `RewardModel`, a linear head on the final-normed hidden states of any
`common.models.decoder.Decoder` (a from-scratch tiny one or SmolLM2 / Gemma-3 / Qwen2.5 through
`common.models.loader`; frozen, fully trained or LoRA-adapted through `common.adapters`), read at the
last response token (the sequence reward r(x, y)) and at every response token (token rewards
r(s_t, a_t), the state after a_t). The batch layout keeps the whole response (the LM layout of
`common.rl.rollout.build_batch` drops the last token, which a reward model must read).
training: the Bradley-Terry loss (`common.preference.losses.bradley_terry`) on either head.
metrics: pairwise accuracy, calibration of P(y_w > y_l) = sigmoid(r_w - r_l) (expected calibration
error, Brier score, log loss), Spearman rank correlation.
The RL loop reads per-token rewards through `common.rl` (Rewards.token / token_mask,
rollout.OutcomeAsTokenRewards); a token head's `token_rewards` are in that layout (0 on padding).
"""
