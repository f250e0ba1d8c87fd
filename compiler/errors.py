"""The one error the command line reports as a line of text: a problem with the user's input."""


class UsageError(Exception):
    """Bad input (a missing file or factory, a factory raising, a model that cannot be traced, an
    out-of-range option): ``python -m smoothce`` prints it as one line on stderr and exits 2."""
