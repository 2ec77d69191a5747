"""The one exception type for mistakes a user can fix (bad input, missing data, incompatible files).

The CLI prints its message as a single sentence and exits with status 2; library callers can catch it.
"""


class FastddError(Exception):
    """A user-fixable problem. The message is one sentence that says what is wrong and what to do."""
