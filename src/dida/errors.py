"""User-facing errors: the CLI prints their message as one line and exits with a non-zero code."""


class UserError(Exception):
    """A problem with the user's input (file, folder, config key, checkpoint); never a bug."""


class DataError(UserError, ValueError):
    """A dataset folder, image or label file that cannot be used; the message names the file."""


class CheckpointError(UserError, ValueError):
    """A weights or checkpoint file that is missing, unreadable or of another model."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a command cleanly (state saved); the CLI prints the message, exits 130."""


def one_line(err: BaseException) -> str:
    """The message of `err` as one line.

    An error raised in a DataLoader worker arrives as "Caught DataError in DataLoader worker
    process 0. Original Traceback ...": its cause, the traceback's last line, is returned without
    the exception's type name.
    """
    text = str(err).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in text:
        last = lines[-1].strip()
        name = type(err).__name__
        for prefix in (f"{type(err).__module__}.{name}: ", f"{name}: "):
            if last.startswith(prefix):
                return last[len(prefix) :]
        return last
    return lines[0] if lines else type(err).__name__
