"""The one exception type for problems with what a user gave us (a file, a config, a name)."""


class UserError(ValueError):
    """Bad input from the user: the command line prints the message as one line and exits with status 2.

    The message must name the problem and the thing at fault (a path, a field, a key) and fit on one line.
    """
