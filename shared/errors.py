"""The one error type a user can fix: bad input, bad configuration, a bad file.

Every error that is the user's (or a site's data's) to fix derives from
:class:`UserError`. The ``medfed`` command line maps it to one line on stderr
and exit code 2 in one place; anything else is a bug and shows a traceback.
Messages say what was expected, what was given and how to fix it, and never
quote a patient id, a DICOM header value or a hospital file path.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input from a user, a configuration or a file: the message says how to fix it."""
