"""Errors a user can fix. The command line prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input from the user: a missing path, an invalid option, an unusable file.

    Library code raises it with a message that says what is wrong and how to fix it; `lvdflow.cli`
    turns it into `lvdflow: error: <message>` and exit status 2 instead of a traceback.
    """
