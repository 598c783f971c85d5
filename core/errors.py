"""The base class of the mistakes a user can fix, and how every script reports them: one line naming the file or
flag and the fix, exit status 1, the traceback only in debug.log. A leaf module: it imports nothing of the project."""

import sys


class UserError(Exception):
    """A mistake of the user (a flag, a dataset, an image, a checkpoint, a full disk...): the message says what
    was wrong and what to do. Anything else is a bug of ours and keeps its traceback."""


def user_error_message(exception):
    """The one-line message of a user error, None for anything else. An exception raised in a DataLoader worker
    comes back with the worker's traceback in its message, ending with "module.Class: original message": only
    the message is kept."""
    if not isinstance(exception, UserError):
        return None
    message = str(exception)
    if "\nOriginal Traceback" in message:
        message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return message


def exit_on_user_error(main, *args, **kwargs):
    """Runs main; a UserError ends the program with exit status 1 and its one-line message: through the exception
    hook of core.logs.setup_logging once a run logs (the traceback goes to its debug.log), else on stderr."""
    try:
        return main(*args, **kwargs)
    except UserError as error:
        if sys.excepthook is not sys.__excepthook__:
            sys.excepthook(type(error), error, error.__traceback__)
        else:
            print(f"ERROR: {user_error_message(error)}", file=sys.stderr)
        sys.exit(1)
