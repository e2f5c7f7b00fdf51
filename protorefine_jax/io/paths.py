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

import contextlib
import csv
import dataclasses
import errno
import fnmatch
import io
import json
import math
import os
import re
import tempfile
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


# --------------------------------------------------------------------------- listing


class TooManyFilesError(ValueError):
    """A folder or glob lists more paths than the listing bound."""


MAX_LISTED_PATHS = 1_000_000


def _glob_regex(pattern: str) -> re.Pattern:
    """A regex of a POSIX glob pattern relative to its folder (``**`` spans folders)."""
    out = []
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:.*/)?")
            continue
        # fnmatch.translate ends with \Z and wraps in (?s:...); '*' must not cross '/'.
        body = fnmatch.translate(part)[4:-3].replace(".*", "[^/]*")
        out.append(body + ("" if last else "/"))
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def list_files(spec: str | os.PathLike, limit: int | None = None) -> tuple[Path, list[Path]]:
    """``(root, files)`` of a folder (recursively) or a glob pattern, sorted.

    Symlinked folders are not descended into (a link loop such as ``a -> .``
    cannot make the listing endless), and at most ``limit`` paths
    (``MAX_LISTED_PATHS``) are looked at.

    Args:
      spec: a directory, or a glob pattern (``*``, ``?``, ``[..]``, ``**``).
      limit: the bound on paths looked at.

    Returns:
      The folder the names are relative to (the directory, or the glob's fixed
      prefix) and the regular files (symlinks to files included) that match.

    Raises:
      TooManyFilesError: more than ``limit`` paths (the message says how to narrow it).
    """
    limit = MAX_LISTED_PATHS if limit is None else limit
    spec = os.fspath(spec)
    depth = None  # how deep the pattern reaches (None: any depth)
    if Path(spec).is_dir():
        root, regex = Path(spec), None
    else:
        head = re.split(r"[*?\[]", spec, maxsplit=1)[0]
        if head == spec:  # no wildcard: one file
            return Path(spec).parent, [Path(spec)] if Path(spec).is_file() else []
        cut = len(head) - len(head.rsplit(os.sep, 1)[-1])
        root, rest = Path(head[:cut] or "."), spec[cut:].replace(os.sep, "/")
        regex = _glob_regex(rest)
        depth = None if "**" in rest else rest.count("/")
    files, seen = [], 0
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False
        seen += len(dirnames) + len(filenames)
        if seen > limit:
            raise TooManyFilesError(
                f"{spec!r} lists more than {limit} paths; refusing to go on. Fix: pass a "
                "narrower folder or glob pattern."
            )
        here = Path(dirpath)
        if depth is not None and len(here.relative_to(root).parts) >= depth:
            dirnames.clear()
        for name in filenames:
            path = here / name
            rel = path.relative_to(root).as_posix()
            if (regex is None or regex.match(rel)) and path.is_file():
                files.append(path)
    return root, sorted(files)


# --------------------------------------------------------------------------- writing


def safe_text(value: object, null_nonfinite: bool = False) -> object:
    """``value`` with every string (also dict keys) made valid UTF-8 by :func:`json_safe_text`.

    With ``null_nonfinite``, NaN and infinite floats become None.
    """
    if isinstance(value, str):
        return json_safe_text(value)
    if isinstance(value, float) and null_nonfinite and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {safe_text(k): safe_text(v, null_nonfinite) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [safe_text(v, null_nonfinite) for v in value]
    return value


def json_text(obj: object, null_nonfinite: bool = False, **kwargs) -> str:
    """Strict JSON of ``obj``: valid UTF-8 strings; NaN / infinity refused (ValueError) or null."""
    return json.dumps(safe_text(obj, null_nonfinite), allow_nan=False, **kwargs)


FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_text(fieldnames: Sequence[str], rows: Sequence[dict]) -> str:
    """CSV of ``rows``; a cell a spreadsheet would run as a formula gets a leading ``'``."""

    def cell(v: object) -> object:
        if isinstance(v, str):
            v = json_safe_text(v)
            return "'" + v if v.startswith(FORMULA_PREFIXES) else v
        return v

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames))
    writer.writeheader()
    writer.writerows({k: cell(v) for k, v in row.items()} for row in rows)
    return buf.getvalue()


class UnsafeOutputError(ValueError):
    """An output file would be written through a symlink (outside its output folder)."""


def output_path(root: str | os.PathLike, name: str) -> Path:
    """``root / name`` checked for writing; its missing sub-folders are created.

    ``name`` is relative and stays inside ``root``; no component below
    ``root`` (sub-folder or the file itself) may be a symlink, so that nothing
    is written outside the output folder. ``root`` itself may be a link.

    Raises:
      UnsafePathError: ``name`` leaves ``root``.
      UnsafeOutputError: a component is a symlink or a sub-folder is a file.
    """
    check_relative(name, "output file")
    path = Path(root)
    parts = PurePosixPath(name).parts
    for i, part in enumerate(parts):
        path = path / part
        if path.is_symlink():
            raise UnsafeOutputError(
                f"{path} is a symlink; outputs are never written through links (they could "
                f"point outside {root}). Fix: remove the link, or pick a new output folder."
            )
        if i < len(parts) - 1:
            if path.exists() and not path.is_dir():
                raise UnsafeOutputError(f"{path} should be a folder of outputs but is a file.")
            path.mkdir(exist_ok=True)
    return path


def write_output(root: str | os.PathLike, name: str, data: bytes | str) -> Path:
    """Writes ``data`` to ``root / name`` atomically (temporary file, then rename).

    The path is checked by :func:`output_path`; text is written as UTF-8
    after :func:`json_safe_text`. A write that fails leaves no partial file.

    Returns:
      The path written.
    """
    path = output_path(root, name)
    if isinstance(data, str):
        data = json_safe_text(data).encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def open_output(root: str | os.PathLike, name: str):
    """``root / name`` opened for writing text as it goes, after :func:`output_path`."""
    path = output_path(root, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace")
