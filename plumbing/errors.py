"""The one error for mistakes a user can make, and how a script's entry point reports it.

Library code raises UserError with a one-line message ("--rank 0: must be at least 1"). It is a ValueError, so a
notebook cell or a sweep loop catches it with `except ValueError` (or `except Exception`) and carries on. Only a
script's main() turns it into `error: ...` on stderr and exit status 1, through `reported()`.
"""

import contextlib

from plumbing import stopping


class UserError(ValueError):
    """A mistake the user can fix (a bad argument, a missing or damaged file); the message says what and how."""


@contextlib.contextmanager
def reported():
    """A script's entry point: a UserError becomes `error: MESSAGE` and exit status 1; Ctrl-C, SIGINT and SIGTERM
    (plumbing/stopping.py) exit status 130; both without a traceback."""
    try:
        with stopping.ctrl_c_on_sigterm():
            yield
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
