"""Errors a user can act on. The CLI maps `InputError` to exit code 2 and prints no traceback."""


class InputError(ValueError):
    """Bad input or bad usage: the message names the file, CSV line or field and the reason."""


class DecodeError(ValueError):
    """One input file could not be decoded; the caller records it as a skipped item."""
