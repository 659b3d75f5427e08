"""The one exception type for bad input: the command line prints its message as one line and exits non-zero."""


class VincieError(Exception):
    """A user-facing error: the message names what was wrong and what was expected."""


class ConfigError(VincieError):
    """A config that cannot run: unknown key, wrong type, or values that do not fit together."""
