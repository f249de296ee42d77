"""The base of every error a user can fix: printed as one line, without a traceback."""


class UserError(ValueError):
    """Bad input (config, data, checkpoint, launch shape), with a message naming the fix."""
