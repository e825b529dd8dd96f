"""One error type for everything a user can get wrong, so every command line catches one type and prints one line.

`ImagenError` is what the entry points (train.py, sample.py, the tools) catch: its message names the file, key
or value at fault and what to do. The subclasses say which part of the system refused; they also derive from
the built-in type the same situation raised before (ValueError, FileNotFoundError), so library callers that
catch those keep working. Anything that is not an ImagenError is a bug and keeps its traceback.
"""

from __future__ import annotations


class ImagenError(Exception):
    """A user-facing error; `str(error)` is meant to be shown as one line."""


class UsageError(ImagenError, ValueError):
    """A command-line argument is wrong (exit status 2, as argparse's own errors)."""


class ConfigError(ImagenError, ValueError):
    """A config file, key or value is wrong; the message names it."""


class StageError(ImagenError, ValueError):
    """A stage folder (training workdir or export) cannot be used as the command asks."""


class WeightsError(ImagenError, ValueError):
    """A model folder from outside (a T5 checkpoint) lacks a key or tensor, or holds one that does not fit."""


class MissingError(ImagenError, FileNotFoundError):
    """A file or folder the command needs does not exist."""


class CheckpointError(ImagenError):
    """A checkpoint directory or step cannot be used; the message names it and says why."""


class DataError(ImagenError, ValueError):
    """The training data cannot be used as configured: shard patterns, shard files, precomputed-text metadata,
    a stream that delivers no example."""


class MetricsError(ImagenError, ValueError):
    """Features or reference statistics cannot be compared: sizes differ, too few samples, or a reference file
    was made with another resize method or other Inception weights."""


class TrainingDiverged(ImagenError):
    """Too many consecutive non-finite steps; the message says where the last good state is."""


class OutputError(ImagenError, OSError):
    """Results (samples, exports) cannot be written where the command was told to write them."""


def first_line(error: BaseException) -> str:
    """The message of `error` as one line: its lines joined with '; ' (a KeyError's quotes removed); the
    type name when the message is empty. What every entry point prints."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__
