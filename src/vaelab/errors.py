"""The one exception type for problems the user can fix.

Raised with a message that names the problem and the fix; the command line prints it
on one line and exits with status 2, without a traceback (unless ``--debug``).
Anything else that escapes is a bug in vaelab and keeps its traceback.
"""


class UserError(Exception):
    """Bad input, a bad option, or a file that is not what it should be."""
