"""The one exception type for mistakes a user can fix (bad input, missing data, incompatible files).

The CLI prints its message as a single sentence and exits with status 2; library callers can catch it.
"""


class FastddError(Exception):
    """A user-fixable problem. The message is one sentence that says what is wrong and what to do."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during work that knows what it kept: the message says so and how to continue. Still a
    KeyboardInterrupt (code that stops on Ctrl-C keeps doing so); the CLI prints the message and exits 130."""


class UnsafeFileError(FastddError):
    """A file holds pickled Python objects other than tensors and plain values; fastdd refuses to unpickle it."""


class FastddWarning(UserWarning):
    """Something the user should know that does not stop the work (e.g. a damaged checkpoint was skipped).

    The CLI prints its message as one line ``warning: ...`` on stderr.
    """
