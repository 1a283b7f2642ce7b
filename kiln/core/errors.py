"""Errors that mean "the input is wrong": stage CLIs print them without a traceback and exit 1."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class InputError(ValueError):
    """Bad params, data or files; the message names the key or path and what is allowed."""


class CorruptFile(InputError):
    """A file exists but cannot be read (truncated, overwritten, half-written); the message names it and the command
    that makes it again."""


@contextmanager
def reading(path: Path | str, remedy: str) -> Iterator[None]:
    """Parse `path` inside this block: any failure other than a missing file or an InputError becomes CorruptFile
    naming the file, what went wrong and `remedy` (what to run to get a good copy)."""
    try:
        yield
    except (FileNotFoundError, InputError):
        raise
    except pickle.UnpicklingError as error:  # torch.load(weights_only=True) met a pickled object, not a tensor
        raise CorruptFile(f"{path}: refused, it holds pickled code, not only tensors ({str(error).splitlines()[-1]}); "
                          f"{remedy}") from None
    except Exception as error:  # whatever a parser raises on bad bytes, the file is the problem
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise CorruptFile(f"{path}: corrupt or truncated ({reason}); {remedy}") from None
