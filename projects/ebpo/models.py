"""EBPO's policies: the shared RL policies (common.rl.policies).

EBPO changes the advantage each response gets (projects/ebpo/losses.py), not the model: the policy is the shared decoder, either the smoke's warmed-up tiny
character LM (trained once per machine and cached, the same one every RL paper starts from) or a
pretrained decoder, by config.model.kind.
"""

from common.rl.policies import WarmupConfig
from common.rl.policies import create_policy
from common.rl.policies import decoder_config
from common.rl.policies import description
from common.rl.policies import sft_examples
from common.rl.policies import warm_policy

__all__ = [
  'WarmupConfig',
  'create_policy',
  'decoder_config',
  'description',
  'sft_examples',
  'warm_policy',
]
