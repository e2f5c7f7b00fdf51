r"""Paths that come from untrusted text, and names written to disk.

A path read from a file's contents (a shard name in a safetensors index, a
``vocab_file`` entry, a VisA CSV row) or from a flag that names a category is
joined to its folder only after :func:`safe_child` checks that it cannot leave
it: no absolute path, no drive, no ``..`` component. The check is lexical, on
purpose: a folder that is itself a symlink (Hugging Face caches, datasets
linked from elsewhere) keeps working, while the text of the file cannot point
outside it.

Names written to disk go through :func:`safe_filename` (one component, no
separators or control characters), and names written into JSON through
:func:`json_safe_text` (file names that are not valid UTF-8 keep their bytes
as ``\xNN`` escapes instead of lone surrogates, which strict JSON readers
reject).
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath


class UnsafePathError(ValueError):
    """A name from a file or a flag would leave its folder or is not a valid name."""


def check_relative(name: str, what: str, *, single: bool = False) -> str:
    """Returns ``name`` if it is a relative path that stays inside its folder.

    Args:
      name: the untrusted text.
      what: what the name is, for the message (e.g. ``"shard name in
        model.safetensors.index.json"``).
      single: require one path component (a folder or file name, no ``/``).

    Raises:
      UnsafePathError: empty, absolute, with a drive, a ``..`` or (``single``)
        a separator, or holding a NUL / control character.
    """
    if not isinstance(name, str) or not name or name in (".",):
        raise UnsafePathError(f"{what} {name!r} is not a file or folder name.")
    if re.search(r"[\x00-\x1f]", name):
        raise UnsafePathError(f"{what} {name!r} holds control characters.")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if (
        posix.is_absolute()
        or windows.is_absolute()
        or windows.drive
        or name.startswith(("/", "\\"))
    ):
        raise UnsafePathError(
            f"{what} {name!r} is an absolute path; only names inside the folder are allowed."
        )
    if ".." in posix.parts or ".." in windows.parts:
        raise UnsafePathError(
            f"{what} {name!r} contains '..'; it would leave its folder, which is refused."
        )
    if single and (len(posix.parts) != 1 or len(windows.parts) != 1):
        raise UnsafePathError(
            f"{what} {name!r} is not a single folder name (it contains a path separator)."
        )
    return name


def safe_child(root: str | os.PathLike, name: str, what: str, *, single: bool = False) -> Path:
    """``root / name`` after :func:`check_relative`; the result stays under ``root``."""
    return Path(root) / check_relative(name, what, single=single)


def json_safe_text(name: str) -> str:
    r"""``name`` as valid UTF-8 text: undecodable bytes (lone surrogates) become ``\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def safe_filename(name: str, max_len: int = 200) -> str:
    """A single, valid UTF-8 file name derived from ``name``.

    Separators, control characters and characters Windows forbids become
    ``_``; leading dots are dropped (no hidden files, no ``..``); the result is
    at most ``max_len`` characters and never empty.
    """
    text = json_safe_text(str(name))
    text = re.sub(r'[\x00-\x1f/\\:*?"<>|]', "_", text).lstrip(".")
    return text[:max_len] or "_"


def check_output_dir(path: str | os.PathLike, flag: str = "--workdir") -> Path:
    """Raises unless ``path`` is a directory or does not exist yet.

    Raises:
      FileExistsError: ``path`` names a file (the message names the flag).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(
            f"{flag} {path} is an existing file, not a folder. Fix: pass a new folder name."
        )
    return path
