"""The single exception type of `common.assets`, in its own module so every part can raise it.

An `AssetError` message is one line that names the fix (the command to run); the CLI prints it as is,
without a traceback, so the message itself is the user interface. It is a `common.errors.UserError`,
so an experiment that needs a missing asset also ends with that one line.
"""

from common import errors


class AssetError(errors.UserError):
  """A one-line, user-facing failure to find, fetch or verify an asset."""
