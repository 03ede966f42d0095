"""Preference optimisation: sequence scoring, cached reference log-probs, and pairwise losses.

  pairs = scoring.pad_pairs(prompts, chosen, rejected, pad_id=tok.pad_id)  # numpy, one row a pair
  ref = reference.reference_logps(ref_model, pairs, batch_size=16)         # cached on disk
  chosen, rejected = scoring.score_pairs(policy, batch)                    # inside the jitted loss
  out = losses.dpo(chosen.sum, rejected.sum, batch['ref_chosen_logps'],
                   batch['ref_rejected_logps'], beta=0.1)
  out.loss, out.metrics  # metrics named as TRL logs them: rewards/chosen, rewards/margins, ...

scoring: (prompt, response) pairs -> one forward over the chosen and rejected rows, log-probs of
the response tokens only (prompt and padding masked), reduced to sum, mean and length per sequence.
reference: the frozen reference model's log-probs, computed once and stored on disk under a key
made of the data, the reference weights, the scoring code and the numerics, so a changed input
recomputes and a stale file is never served.
losses: DPO (with label smoothing = conservative DPO), IPO, hinge, SimPO, ORPO, Bradley-Terry for
scalar reward heads, and FusionRoute's CDPO; each jit-able, in float32.
"""
