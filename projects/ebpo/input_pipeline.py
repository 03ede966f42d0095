"""EBPO's data: the shared RL task sets and renderings (common.rl.tasks), with a verifier.

EBPO trains on the reasoning-gym tasks every RL paper here shares: the smoke's set (where the tiny
policy's warm-up leaves a 10-60% pass rate) and SmolLM2's; the renderings, prompt uids and verifier
live in common.rl.tasks so the papers train and are scored on the same data.
"""

from common.rl.tasks import CHAT_INSTRUCTION
from common.rl.tasks import SMOKE_TASKS
from common.rl.tasks import SMOLLM2_TASKS
from common.rl.tasks import TASK_SETS
from common.rl.tasks import TEST_UID_OFFSET
from common.rl.tasks import CharTokenizer
from common.rl.tasks import chat_prompt_tokens
from common.rl.tasks import expression_prompt
from common.rl.tasks import load_examples
from common.rl.tasks import make_verifier
from common.rl.tasks import policy_text
from common.rl.tasks import prompts

__all__ = [
  'CHAT_INSTRUCTION',
  'SMOKE_TASKS',
  'SMOLLM2_TASKS',
  'TASK_SETS',
  'TEST_UID_OFFSET',
  'CharTokenizer',
  'chat_prompt_tokens',
  'expression_prompt',
  'load_examples',
  'make_verifier',
  'policy_text',
  'prompts',
]
