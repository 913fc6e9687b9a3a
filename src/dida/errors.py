"""User-facing errors: the CLI prints their message as one line and exits with a non-zero code."""


class UserError(Exception):
    """A problem with the user's input (file, folder, config key, checkpoint); never a bug."""


class DataError(UserError, ValueError):
    """A dataset folder, image or label file that cannot be used; the message names the file."""


class CheckpointError(UserError, ValueError):
    """A weights or checkpoint file that is missing, unreadable or of another model."""
