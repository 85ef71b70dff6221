"""Errors a user can act on.

Anything raised as a `CoditError` is printed by the command-line apps as a
single paragraph, without a Python traceback: the message itself must say what
went wrong, where (file, tensor, field or line) and what to do about it.
"""


class CoditError(Exception):
  """A problem with the user's input or environment, not a bug."""


class CheckpointError(CoditError):
  """A checkpoint folder, Hub id, config or tensor that cannot be used."""
