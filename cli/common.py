"""Shared CLI plumbing: user errors become one clear line, not a traceback."""

from __future__ import annotations

import functools
import os

import click

# Errors whose message already says what is wrong and how to fix it.
USER_ERRORS = (FileNotFoundError, ValueError, PermissionError, KeyError, RuntimeError)


def fail_on_errors(fn):
    """Turn expected exceptions into `Error: <message>` and exit status 1 (set
    LIBRA_DEBUG=1 to see the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            if os.environ.get("LIBRA_DEBUG"):
                raise
            message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            raise click.ClickException(message) from exc

    return wrapper
