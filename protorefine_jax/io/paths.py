r"""Paths that come from untrusted text, and names written to disk.

A path read from a file's contents (a shard name in a safetensors index, a
``vocab_file`` entry, a VisA CSV row) or from a flag that names a category is
joined to its folder only after :func:`safe_child` checks that it cannot leave
it: no absolute path, no drive, no ``..`` component. The check is lexical, on
purpose: a folder that is itself a symlink (Hugging Face caches, datasets
linked from elsewhere) keeps working, while the text of the file cannot point
outside it.

Output folders (``--workdir`` of eval, ``--out`` of fit / predict) are
checked by :func:`open_output_dir` before any expensive work: it refuses a
non-empty folder without ``--overwrite``, creates the folder and writes (and
removes) a probe file there, so that a read-only path fails in the first
second with :class:`UnwritableDirError` rather than after feature
extraction. With ``--overwrite``, :func:`clear_outputs` removes exactly the
files an earlier run of the same tool wrote (so stale heatmaps, overlays or
score lines cannot mix with new ones) and keeps, and reports, anything else.

Names written to disk go through :func:`safe_filename` (one component, no
separators or control characters), and names written into JSON through
:func:`json_safe_text` (file names that are not valid UTF-8 keep their bytes
as ``\xNN`` escapes instead of lone surrogates, which strict JSON readers
reject).
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import os
import re
from collections.abc import Sequence
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


class UnwritableDirError(PermissionError):
    """An output folder cannot be created or written (read-only path, permissions)."""


@dataclasses.dataclass(frozen=True)
class OutputDir:
    """An output folder checked by :func:`open_output_dir`.

    Attributes:
      path: the folder (exists, writable).
      created: the topmost folder that `open_output_dir` created (the folder
        itself or a missing parent), None when it existed.
    """

    path: Path
    created: Path | None

    def discard_if_unused(self) -> bool:
        """Removes the folders `open_output_dir` created if nothing was written.

        A refused run then leaves no empty output folder behind.

        Returns:
          Whether the folders were removed.
        """
        if self.created is None or any(self.path.iterdir()):
            return False
        folder = self.path
        while True:
            folder.rmdir()
            if folder == self.created:
                return True
            folder = folder.parent


def _write_probe(folder: Path) -> None:
    """Creates and removes one file in `folder` (raises OSError where it cannot)."""
    probe = folder / f".protorefine-write-test-{os.getpid()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    os.unlink(probe)


def open_output_dir(
    path: str | os.PathLike, flag: str, overwrite: bool, what: str = "results"
) -> OutputDir:
    """Checks an output folder and creates it, before any expensive work.

    Args:
      path: the folder (new, empty, or with `overwrite` non-empty).
      flag: its flag, for messages (``"--workdir"``, ``"--out"``).
      overwrite: allow a non-empty folder (the caller then removes its own
        earlier outputs with :func:`clear_outputs`).
      what: what the folder holds, for messages (``"results"``).

    Returns:
      The :class:`OutputDir`.

    Raises:
      FileExistsError: `path` is a file, or a non-empty folder without
        `overwrite`.
      UnwritableDirError: the folder cannot be created, or no file can be
        written in it (read-only file system, permissions); the message names
        the path and the fix.
    """
    out = check_output_dir(path, flag)
    try:
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{flag} {out} exists and is not empty; {what} are never overwritten silently. "
                f"Pick a new {flag}, or pass --overwrite (which replaces the files of an "
                "earlier run and keeps any other file)."
            )
        created = None
        if not out.exists():
            created = out
            while not created.parent.exists():
                created = created.parent
        out.mkdir(parents=True, exist_ok=True)
        _write_probe(out)
    except FileExistsError:
        raise
    except OSError as e:
        reason = "read-only file system" if e.errno == errno.EROFS else e.strerror or str(e)
        raise UnwritableDirError(
            f"{flag} {out} cannot be written ({reason}: {e.filename or out}); nothing was "
            f"computed. Fix: pass a {flag} in a folder you may write to (e.g. under your home "
            f"or the working directory), or make {out} (or its parent) writable."
        ) from e
    return OutputDir(out, created)


def _owned(rel: str, outputs: Sequence[str]) -> bool:
    """Whether the relative POSIX name `rel` matches one of `outputs` part by part."""
    parts = rel.split("/")
    for pattern in outputs:
        pats = pattern.split("/")
        if len(pats) == len(parts) and all(
            fnmatch.fnmatchcase(part, pat) for part, pat in zip(parts, pats, strict=True)
        ):
            return True
    return False


def clear_outputs(folder: str | os.PathLike, outputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Removes the files an earlier run of the same tool wrote into `folder`.

    Args:
      folder: the output folder.
      outputs: the tool's own outputs, as POSIX names or patterns relative to
        `folder` (``"scores.jsonl"``, ``"heatmaps/*.png"``); a ``*`` matches
        within one path component.

    Returns:
      `(removed, kept)`: relative names of the files removed, and of the
      other files left in place (never deleted: they are not this tool's).
      The tool's sub-folders (``heatmaps/``) are removed when left empty.
    """
    root = Path(folder)
    removed, kept = [], []
    for dirpath, _, filenames in os.walk(root):
        here = Path(dirpath)
        for name in sorted(filenames):
            rel = (here / name).relative_to(root).as_posix()
            if _owned(rel, outputs):
                (here / name).unlink()
                removed.append(rel)
            else:
                kept.append(rel)
    own_dirs = {o.rsplit("/", 1)[0] for o in outputs if "/" in o}
    for rel in sorted(own_dirs, key=len, reverse=True):
        sub = root / rel
        if sub.is_dir() and not sub.is_symlink() and not any(sub.iterdir()):
            sub.rmdir()
    return sorted(removed), sorted(kept)
