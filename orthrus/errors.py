"""User-facing errors.

Everything a user can get wrong (a model name, a file, a flag value) raises :class:`OrthrusError`
with a message that says what was wrong and what is allowed. The CLI prints that one line and
exits with status 2; the server turns it into a 4xx JSON error. Internal invariants use ``assert``.
"""

from __future__ import annotations


class OrthrusError(ValueError):
    """A clear, one-line error about bad input (model, file, option, prompt)."""


class ContextLengthError(OrthrusError):
    """The prompt plus the requested new tokens do not fit the model's context."""
