"""Argument parsing shared by the command-line tools with their own flag registries.

`fit`, `predict` and `demo_images` keep their flags in a private
`absl.flags.FlagValues` (their names clash with eval's, and tests import them
together); `parse` gives them one behaviour for help, flag errors and stray
arguments, and `report_errors` one error path: an error of bad input (the
package's error classes) is one `error: ...` line and exit status 2, never a
traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags

from protorefine_jax.data.errors import DatasetError
from protorefine_jax.io.errors import CheckpointError

# Bad input of every kind: flags, files, folders, model directories (ModelFormatError and
# ModelMismatchError are ValueErrors; UnsafePathError too), checkpoints, datasets.
INPUT_ERRORS = (ValueError, OSError, DatasetError, CheckpointError)


def report_errors(fn: Callable[[], object]) -> int:
    """Runs `fn`; returns 0, or 2 after printing `error: <message>` for bad input."""
    try:
        fn()
    except INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def parse(flag_values: flags.FlagValues, argv: list[str], doc: str) -> int | None:
    """Parses `argv` into `flag_values`.

    Args:
      flag_values: the tool's flag registry.
      argv: `sys.argv`-style list (program name first).
      doc: the tool's module docstring, printed above the flags for `--help`.

    Returns:
      None when the tool should run; else its exit status (0 after printing
      help, 2 after printing a flag error or unexpected arguments).
    """
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(doc + "\n" + flag_values.get_help())
        return 0
    try:
        rest = flag_values(argv)
    except flags.Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if len(rest) > 1:
        print(f"error: unexpected arguments: {rest[1:]}", file=sys.stderr)
        return 2
    return None
