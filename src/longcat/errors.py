"""The error type every command raises for a mistake the user can fix.

It lives below every package (nothing here imports the rest of longcat) so that any layer can raise
it without importing the command line; `longcat.cli` prints it as one line, without a traceback.
"""


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""
