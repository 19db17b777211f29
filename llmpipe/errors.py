"""The one user-error type.

`UserError` is raised for anything a user can fix (a setting, a missing or bad input, a refused
resume); its message says what is wrong, where (file, key, record) and how to fix it, and the CLI
prints it as `Error: <message>` with no traceback. Anything else that escapes is a bug and keeps its
traceback. It subclasses ValueError so `except ValueError` callers keep working.

Standard library only: llmpipe.model and llmpipe.train raise it on a GPU node that has nothing else.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix; the message is shown as is."""


__all__ = ["UserError"]
