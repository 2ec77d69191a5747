"""How every command reports what a user can fix: one sentence on stderr, exit status 2, no traceback."""

from __future__ import annotations

import errno
import functools
import os
import sys
import warnings
from typing import Any, Callable

import typer

from fastdd.errors import FastddError, FastddWarning, Interrupted

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# OSErrors a user causes and can fix (full disk, read-only or forbidden folder): one sentence, not a traceback.
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    """Print ``error: MESSAGE.`` on stderr (prefixed by the rank in a distributed run) and exit with ``code``."""
    message = message.strip()
    if not message.endswith((".", "?", "!")):
        message += "."
    rank = os.environ.get("RANK", "0")
    if rank != "0" and os.environ.get("WORLD_SIZE", "1") != "1":
        message = f"rank {rank}: {message}"  # one process of a distributed run
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _one_line_warnings(previous: Callable) -> Callable:
    """A ``warnings.showwarning`` that prints FastddWarning as one line ``warning: ...`` on stderr and passes other
    warnings to ``previous``."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, FastddWarning):
            typer.echo(f"warning: {message}", err=True)
        else:
            previous(message, category, filename, lineno, file, line)

    return show


def user_errors(command: Callable) -> Callable:
    """Turn a FastddError (or a full disk / permission OSError) into one sentence on stderr and exit status 2 (no
    traceback); print FastddWarnings as one line each."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("always", FastddWarning)
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            try:
                return command(*args, **kwargs)
            except FastddError as exc:
                fail(str(exc))
            except Interrupted as exc:
                fail(str(exc), EXIT_INTERRUPTED)
            except KeyboardInterrupt:
                fail("interrupted; outputs written so far are kept (continue a distillation with --resume)",
                     EXIT_INTERRUPTED)
            except OSError as exc:
                if exc.errno not in _USER_OS_ERRORS:
                    raise
                where = f" {exc.filename}" if exc.filename else ""
                fail(f"could not write or read{where} ({exc.strerror or exc}); free some space or fix the "
                     "permissions, then run the command again")

    return wrapper


def exit_status_of(job: Callable[..., Any], *args: Any) -> None:
    """Run ``job(*args)`` in a process started by ``--nproc``, reporting user errors as the command would and
    exiting with the command's status (the launcher stops the other processes)."""
    try:
        user_errors(job)(*args)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
