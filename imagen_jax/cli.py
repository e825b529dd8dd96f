"""What every command line shares: one way to end with an error.

Entry points (train.py, sample.py, `python -m imagen_jax.tools.*`) parse their arguments first, import JAX and
TensorFlow only after that (so `--help` and argument errors answer at once), and run their work inside
`main_guard`, which turns an `ImagenError` into one line on stderr, `PROG: error: MESSAGE`, and an exit status:
2 for a bad argument (`UsageError`, as argparse's own errors), 1 for anything else the user can fix (a
config, a checkpoint, the data, an unwritable output). Nothing here imports JAX.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from imagen_jax.errors import ImagenError, UsageError, first_line


def exit_status(error: ImagenError) -> int:
    return 2 if isinstance(error, UsageError) else 1


def main_guard(prog: str, body: Callable[[], int | None]) -> int:
    """Runs `body()`; returns its status (None -> 0), or prints an ImagenError as one line and returns 1 or 2."""
    try:
        return body() or 0
    except ImagenError as error:
        print(f"{prog}: error: {first_line(error)}", file=sys.stderr, flush=True)
        return exit_status(error)
