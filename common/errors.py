"""The one exception type for bad input from the person running an experiment.

`common.launch` reports a UserError as a single line (no traceback) and exits non-zero, so every
module that validates user input (configs, meshes, checkpoints, assets) raises a subclass of it with a
message that names the problem and, where there is one, the fix.
"""


class UserError(Exception):
  """Bad input: unknown config key, a mesh that does not fit, a missing asset, a corrupt file."""
