"""User-facing errors: raised for bad input, printed by the CLI as one clear message (no stack trace)."""

from __future__ import annotations


class MarlinError(Exception):
    """A problem the user can fix. ``str(err)`` says what was wrong and what to do about it."""
