"""The one error type for problems the user can fix: a bad flag value, a missing file, mismatched files.

``sct.cli.main`` alone reports a ``UserError`` as ``error: <message>`` on stderr with exit status 2;
every other exception is a bug and keeps its traceback. Library code raises a ``UserError`` (or one of
the subclasses below, which are also the built-in error a library caller expects) where the cause is
the user's input; a command handler may turn a library's own exception into one at its boundary with
``as_user_error``, naming the exception types it knows to be the user's doing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A problem the user can fix; its message says what and how, in one line."""


class UserValueError(UserError, ValueError):
    """A value the user gave (a flag, a setting, a file's contents) is not acceptable."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


@contextmanager
def as_user_error(*types: type[BaseException]) -> Iterator[None]:
    """Re-raise the exceptions of ``types`` raised inside as ``UserError`` (same message, chained)."""
    try:
        yield
    except UserError:
        raise
    except types as error:
        raise UserError(str(error)) from error
