"""The package's one unpickler: resolves only the globals it is given.

Every pickle the package reads (torch checkpoints, zip and legacy formats,
including the legacy format's header pickles) goes through
:class:`SafeUnpickler`. A pickle can only run code through the globals it
resolves (``GLOBAL`` / ``STACK_GLOBAL``, then ``REDUCE`` / ``BUILD`` /
``NEWOBJ``); with an allow-list of plain constructors and no persistent ids
unless the caller handles them, reading a file cannot run code.

Memory: the C unpickler allocates a counted string or bytes object at the
size the pickle claims before reading it. :class:`SafeUnpickler` therefore
reads from an in-memory buffer only and first walks the pickle's opcodes
with ``pickletools.genops`` (which reads each counted argument from the
buffer and fails when the buffer is shorter than the claim), so every size
claim is checked against the bytes really present before anything is built.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from collections.abc import Callable, Mapping
from typing import Any

PLAIN_DATA: Mapping[tuple[str, str], Any] = {}
"""No global at all: the pickle may only hold ints, strings, tuples, lists, dicts, ..."""


class SafeUnpickler(pickle.Unpickler):
    """Allow-list unpickler.

    Args:
      file: an in-memory ``io.BytesIO`` positioned at the pickle.
      allowed: ``{(module, name): object}``, the only globals a pickle may
        name (anything else raises ``pickle.UnpicklingError``).
      resolve: optional ``(module, name) -> object | None`` for families of
        allowed globals (e.g. ``torch.FloatStorage``); None means refused.
      persistent_load: handler of persistent ids; None refuses them.
    """

    def __init__(
        self,
        file: io.BufferedIOBase,
        allowed: Mapping[tuple[str, str], Any] = PLAIN_DATA,
        resolve: Callable[[str, str], Any] | None = None,
        persistent_load: Callable[[Any], Any] | None = None,
    ):
        if not isinstance(file, io.BytesIO):
            raise TypeError("SafeUnpickler reads from io.BytesIO only (size claims are checked)")
        super().__init__(file)
        self._file = file
        self._allowed = allowed
        self._resolve = resolve
        self._persistent = persistent_load

    def load(self) -> Any:
        """Checks every opcode and size claim of the next pickle, then unpickles it."""
        start = self._file.tell()
        try:
            for _ in pickletools.genops(self._file):
                pass
        except ValueError as e:  # genops: truncated argument, unknown opcode, no STOP
            raise pickle.UnpicklingError(f"malformed or truncated pickle ({e})") from e
        self._file.seek(start)
        return super().load()

    def find_class(self, module: str, name: str) -> Any:
        """The allowed object named ``module.name``; raises for anything else."""
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if self._resolve is not None:
            found = self._resolve(module, name)
            if found is not None:
                return found
        raise pickle.UnpicklingError(
            f"global {module}.{name} is not allowed here (a data file must not name code)"
        )

    def persistent_load(self, pid: Any) -> Any:
        """Delegates to the caller's handler; refuses persistent ids without one."""
        if self._persistent is None:
            raise pickle.UnpicklingError("persistent ids are not allowed here")
        return self._persistent(pid)


def load_plain(file: io.BufferedIOBase) -> Any:
    """One pickle of plain data (no global, no persistent id) from ``file``."""
    return SafeUnpickler(file).load()


class NoState:
    """Mixin for objects built by allowed globals: refuses pickle ``BUILD``.

    Without it a pickle could overwrite the attributes an object checked at
    construction (``BUILD`` sets ``__dict__`` or slots after ``REDUCE``).
    """

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"{type(self).__name__} takes no pickled state")
