"""Errors that mean "the input is wrong": stage CLIs print them without a traceback and exit 1."""


class InputError(ValueError):
    """Bad params, data or files; the message names the key or path and what is allowed."""
