"""The errors that mean "the user's input is wrong", as opposed to a bug.

The CLI prints these as one `error:` line and exits 2 (`-v` keeps the traceback), and the runner
stops the suite on them instead of recording a failed stage and carrying on: a bad checkpoint, an
unknown name or a missing GPU would fail every later benchmark the same way.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the files, names or options the user gave; the message says what to change."""


def user_errors() -> tuple[type[Exception], ...]:
    """UserError and the data readers' errors (imported here, not at module level: they pull in torch)."""
    from densecl_bench.data.base import BadImageError, DataLayoutError

    return (UserError, BadImageError, DataLayoutError)


def hint(err: BaseException) -> str:
    """What to do about a user error, appended to its one-line message ("" when the message says it all)."""
    from densecl_bench.data.base import BadImageError

    if isinstance(err, BadImageError):
        return " (--skip-bad-images leaves unreadable images out and records how many in the results)"
    return ""
