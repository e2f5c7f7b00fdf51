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

Shape: the same walk follows the pickle machine's stack and memo, so an
object nested more than ``MAX_DEPTH`` levels deep, or one that expands (as a
tree, counting each shared reference again) to more than ``NODES_PER_BYTE``
nodes per byte of the stream, is refused before it is built; after loading,
the object itself is measured once more (a list filled after it was shared is
only visible then). A reader may therefore walk, hash, compare or print what
:class:`SafeUnpickler` returns as a tree, recursively: a few hundred bytes of
``L = [L, L]`` nested 40 times cannot become 2**40 visits, and a million
nested tuples cannot overflow the C stack.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from collections.abc import Callable, Mapping
from typing import Any

PLAIN_DATA: Mapping[tuple[str, str], Any] = {}
"""No global at all: the pickle may only hold ints, strings, tuples, lists, dicts, ..."""

MAX_DEPTH = 100
"""Deepest nesting of containers a pickle may hold."""
NODES_PER_BYTE = 4
"""A pickle of ``n`` bytes may expand to ``NODES_PER_BYTE * n + MIN_NODES`` tree nodes."""
MIN_NODES = 10_000

_IN_PLACE = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


class _Shape:
    """What the opcode walk knows of a value: nesting depth and size as a tree."""

    __slots__ = ("depth", "nodes")

    def __init__(self, depth: int = 0, nodes: int = 1):
        self.depth = depth
        self.nodes = nodes


_MARK = object()


class _ShapeCheck:
    """Follows stack and memo of a pickle's opcodes; refuses deep or exploding objects."""

    def __init__(self, max_nodes: int):
        self.max_nodes = max_nodes
        self.stack: list[Any] = []
        self.memo: dict[Any, _Shape] = {}

    def _pop(self) -> Any:
        if not self.stack:
            raise pickle.UnpicklingError("malformed pickle (pops from an empty stack)")
        return self.stack.pop()

    def _pop_mark(self) -> list[_Shape]:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is _MARK:
                items = self.stack[i + 1 :]
                del self.stack[i:]
                return items
        raise pickle.UnpicklingError("malformed pickle (no mark on the stack)")

    def _check(self, shape: _Shape) -> _Shape:
        if shape.depth > MAX_DEPTH:
            raise pickle.UnpicklingError(
                f"the pickle nests objects more than {MAX_DEPTH} levels deep"
            )
        if shape.nodes > self.max_nodes:
            raise pickle.UnpicklingError(
                f"the pickle expands to more than {self.max_nodes} objects (shared references "
                "repeated over and over; its size allows at most that many)"
            )
        return shape

    def step(self, op: pickletools.OpcodeInfo, arg: Any) -> None:
        name = op.name
        if name == "MARK":
            self.stack.append(_MARK)
        elif name in _GET:
            if arg not in self.memo:
                raise pickle.UnpicklingError(f"malformed pickle (memo key {arg} unset)")
            self.stack.append(self.memo[arg])
        elif name in _PUT or name == "MEMOIZE":
            if not self.stack or self.stack[-1] is _MARK:
                raise pickle.UnpicklingError("malformed pickle (memoises no object)")
            self.memo[len(self.memo) if name == "MEMOIZE" else arg] = self.stack[-1]
        elif name == "DUP":
            top = self._pop()
            self.stack += [top, top]
        else:
            before = op.stack_before
            if pickletools.markobject in before:
                inputs = self._pop_mark()
                inputs = [self._pop() for _ in range(before.index(pickletools.markobject))][
                    ::-1
                ] + inputs
            else:
                inputs = [self._pop() for _ in before][::-1]
            if any(x is _MARK for x in inputs):
                raise pickle.UnpicklingError(f"malformed pickle ({name} takes a mark)")
            if not op.stack_after:
                return
            if name in _IN_PLACE:
                target, items = inputs[0], inputs[1:]
            else:
                target, items = _Shape(0, 1), inputs
            if items:
                target.depth = max(target.depth, 1 + max(x.depth for x in items))
                target.nodes += sum(x.nodes for x in items)
            self.stack.append(self._check(target))


def check_shape(obj: Any, max_nodes: int) -> None:
    """Refuses `obj` if it is cyclic, deeper than `MAX_DEPTH`, or more than `max_nodes` as a tree.

    Iterative, each container visited once (by id): linear in the distinct objects.

    Raises:
      pickle.UnpicklingError: with the reason.
    """
    shapes: dict[int, tuple[int, int]] = {}  # id -> (depth, tree nodes); also keeps ids alive
    keep: list[Any] = []
    stack: list[tuple[Any, bool]] = [(obj, False)]
    open_ids: set[int] = set()
    while stack:
        o, done = stack.pop()
        kids = _children(o)
        if kids is None:
            continue
        key = id(o)
        if done:
            sub = [shapes.get(id(k), (0, 1)) for k in kids]
            depth = 1 + max((d for d, _ in sub), default=0)
            nodes = 1 + sum(n for _, n in sub)
            open_ids.discard(key)
            shapes[key] = (depth, nodes)
            if depth > MAX_DEPTH:
                raise pickle.UnpicklingError(
                    f"the pickle nests objects more than {MAX_DEPTH} levels deep"
                )
            if nodes > max_nodes:
                raise pickle.UnpicklingError(
                    f"the pickle expands to more than {max_nodes} objects (shared references "
                    "repeated over and over; its size allows at most that many)"
                )
            continue
        if key in shapes:
            continue
        if key in open_ids:
            raise pickle.UnpicklingError("the pickle holds an object that contains itself")
        open_ids.add(key)
        keep.append(o)
        stack.append((o, True))
        stack += [(k, False) for k in kids if id(k) not in shapes]


def _children(o: Any) -> list | None:
    if isinstance(o, Mapping):
        return [*o.keys(), *o.values()]
    if isinstance(o, (list, tuple, set, frozenset)):
        return list(o)
    return None


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
        max_nodes = NODES_PER_BYTE * (len(self._file.getbuffer()) - start) + MIN_NODES
        shape = _ShapeCheck(max_nodes)
        try:
            for op, arg, _ in pickletools.genops(self._file):
                shape.step(op, arg)
        except ValueError as e:  # genops: truncated argument, unknown opcode, no STOP
            raise pickle.UnpicklingError(f"malformed or truncated pickle ({e})") from e
        self._file.seek(start)
        obj = super().load()
        check_shape(obj, max_nodes)
        return obj

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
