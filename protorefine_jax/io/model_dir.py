"""Model directories: a fitted detector's state, settings and threshold on disk.

Layout of a model directory (`save_model` writes it, `load_model` reads it):

  model.json            manifest: format, package version, creation time, the
                        caller's metadata (detector, resolved configuration,
                        backbone and weights identity with the file's SHA-256,
                        image size, ...), the threshold, the structure of the
                        state pytree and the SHA-256 of every other file
  state.safetensors     every array of the state pytree (safetensors: a plain
                        header plus raw buffers, no code on load)
  <extra files>         e.g. the `jax.export` artifact, each hashed in the manifest

The state pytree's structure is stored as JSON: dicts, lists, tuples, None,
Python scalars, arrays, and NamedTuple / dataclass nodes whose class is
re-imported by name on load only from an explicit list of named classes
(`ALLOWED_CLASSES`), so a model directory handed over by someone else cannot
make the loader import or run anything else. `model.json` is read as strict
JSON (no NaN / Infinity, bounded size and nesting) and every file it lists
must be a plain name inside the directory; files are written atomically and
never through a symlink (`paths.write_output`).

`check_matches(manifest, expected)` compares what a caller is about to run
with (configuration, backbone, weights hash, image size) against what the
model was fitted with, and raises `ModelMismatchError` naming every
difference.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from protorefine_jax.io.paths import json_text, write_output

FORMAT = "protorefine_jax.model/1"
MANIFEST = "model.json"
ARRAYS = "state.safetensors"
MAX_MANIFEST_BYTES = 16 << 20
MAX_STATE_DEPTH = 64
# The classes a state may name: those of the library detectors' states.
ALLOWED_CLASSES = (
    "protorefine_jax.detectors.base:DetectorState",
    "protorefine_jax.bank:MemoryBank",
    "protorefine_jax.calibration:ScoreCalibration",
    "protorefine_jax.calibration:SupportScores",
    "protorefine_jax.calibration:RefinementCheck",
    "protorefine_jax.config:RefineConfig",
    "protorefine_jax.clip.winclip:WinClipConfig",
    "protorefine_jax.clip.winclip:WinClipBanks",
    # The CLIP architecture a WinCLIP state's config (`calibrated_under`) names.
    "protorefine_jax.clip.spec:ClipSpec",
)
# A file name in a model directory: no folders, no hidden files.
_SAFE_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class ModelFormatError(ValueError):
    """A model directory is missing, incomplete, corrupt or of another format."""


class ModelMismatchError(ValueError):
    """A model was fitted with other settings than the ones asked for."""


class LoadedModel(NamedTuple):
    """What `load_model` returns.

    Attributes:
      state: the state pytree, arrays as numpy.
      manifest: the parsed `model.json`.
      path: the model directory.
      version_note: a line when the package version differs from the one
        that wrote the model (None otherwise).
    """

    state: Any
    manifest: dict[str, Any]
    path: Path
    version_note: str | None


def package_version() -> str:
    """The installed protorefine_jax version ("unknown" from a bare source tree)."""
    try:
        return importlib.metadata.version("protorefine_jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def encode_tree(tree: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Splits a pytree into a JSON structure and a flat dict of arrays.

    Args:
      tree: nested dicts (str keys), lists, tuples, NamedTuples, dataclasses
        (e.g. `flax.struct`), None, Python scalars and arrays (numpy or jax).

    Returns:
      `(structure, arrays)`: `structure` is JSON-serialisable; `arrays` maps
      the keys it references to numpy arrays.

    Raises:
      TypeError: a node of another kind (the message names its path).
    """
    arrays: dict[str, np.ndarray] = {}

    def enc(x: Any, where: str) -> dict[str, Any]:
        if x is None:
            return {"type": "none"}
        if isinstance(x, bool | int | float | str) and not isinstance(x, np.generic):
            return {"type": "scalar", "value": x}
        if _is_namedtuple(x):
            fields = {f: enc(getattr(x, f), f"{where}.{f}") for f in x._fields}
            return {"type": "namedtuple", "class": _class_name(type(x)), "fields": fields}
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            fields = {
                f.name: enc(getattr(x, f.name), f"{where}.{f.name}") for f in dataclasses.fields(x)
            }
            return {"type": "dataclass", "class": _class_name(type(x)), "fields": fields}
        if isinstance(x, dict):
            if not all(isinstance(k, str) for k in x):
                raise TypeError(f"{where}: dict keys must be strings to be saved.")
            return {"type": "dict", "items": {k: enc(v, f"{where}[{k!r}]") for k, v in x.items()}}
        if isinstance(x, list | tuple):
            kind = "list" if isinstance(x, list) else "tuple"
            return {"type": kind, "items": [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]}
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            key = f"a{len(arrays)}"
            # np.array, not np.ascontiguousarray: that one turns a 0-d array
            # (a calibration statistic) into shape [1].
            arr = np.array(x, order="C", copy=True)
            arrays[key] = arr
            return {"type": "array", "key": key, "dtype": str(arr.dtype), "shape": list(arr.shape)}
        raise TypeError(f"{where}: cannot save a {type(x).__name__} in a model directory.")

    return enc(tree, "state"), arrays


def _resolve_class(name: Any, allowed: tuple[str, ...]) -> type:
    if not isinstance(name, str) or name not in allowed:
        raise ModelFormatError(
            f"the model's state names class {str(name)[:200]!r}, outside the allowed classes "
            f"{list(allowed)}; refusing to import it. Fit the model with this package, or pass "
            "the class in allowed_classes if you trust the directory."
        )
    module, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ModelFormatError(
            f"the model's state needs class {name!r}, which this version of the package does "
            f"not have ({e}). Refit the model with the installed version."
        ) from e
    if not isinstance(obj, type):
        raise ModelFormatError(f"{name!r} in the model's state is not a class.")
    return obj


def decode_tree(
    structure: dict[str, Any],
    arrays: dict[str, np.ndarray],
    allowed_classes: tuple[str, ...] = ALLOWED_CLASSES,
) -> Any:
    """Inverse of `encode_tree`; classes only from `allowed_classes`."""

    def get(node: dict, key: str, kind: type, where: str) -> Any:
        value = node.get(key)
        if not isinstance(value, kind):
            raise ModelFormatError(f"{where}: malformed state structure in {MANIFEST} ({key!r}).")
        return value

    def dec(node: Any, where: str, depth: int = 0) -> Any:
        if not isinstance(node, dict) or "type" not in node or depth > MAX_STATE_DEPTH:
            raise ModelFormatError(f"{where}: malformed state structure in {MANIFEST}.")
        kind = node["type"]
        if kind == "none":
            return None
        if kind == "scalar":
            value = node.get("value")
            if not isinstance(value, bool | int | float | str):
                raise ModelFormatError(f"{where}: malformed scalar in {MANIFEST}.")
            return value
        if kind == "array":
            key = node.get("key")
            if not isinstance(key, str) or key not in arrays:
                raise ModelFormatError(f"{where}: array {key!r} is missing from {ARRAYS}.")
            arr = arrays[key]
            if str(arr.dtype) != node.get("dtype") or list(arr.shape) != node.get("shape"):
                raise ModelFormatError(
                    f"{where}: {ARRAYS} holds {arr.dtype}{list(arr.shape)} but the manifest says "
                    f"{node.get('dtype')}{node.get('shape')}; the directory is corrupt."
                )
            return arr
        if kind in ("list", "tuple"):
            items = [
                dec(v, f"{where}[{i}]", depth + 1)
                for i, v in enumerate(get(node, "items", list, where))
            ]
            return items if kind == "list" else tuple(items)
        if kind == "dict":
            items = get(node, "items", dict, where)
            return {k: dec(v, f"{where}[{k!r}]", depth + 1) for k, v in items.items()}
        if kind in ("namedtuple", "dataclass"):
            cls = _resolve_class(node.get("class"), allowed_classes)
            ok = hasattr(cls, "_fields") if kind == "namedtuple" else dataclasses.is_dataclass(cls)
            if not ok:
                raise ModelFormatError(f"{where}: {node['class']} is not a {kind}.")
            fields = get(node, "fields", dict, where)
            fields = {k: dec(v, f"{where}.{k}", depth + 1) for k, v in fields.items()}
            try:
                return cls(**fields)
            except TypeError as e:
                raise ModelFormatError(
                    f"{where}: cannot rebuild {node['class']} ({e}); the model was written by "
                    "another version of the package. Refit it."
                ) from e
        raise ModelFormatError(f"{where}: unknown node type {str(kind)[:40]!r} in {MANIFEST}.")

    return dec(structure, "state")


def _check_file_name(name: str) -> None:
    if (
        not name
        or name.startswith(".")
        or not set(name) <= _SAFE_NAME_CHARS
        or name in (MANIFEST, ARRAYS)
    ):
        raise ValueError(
            f"extra file name {name!r} must be a plain name (letters, digits, '.', '_', '-'), "
            f"not hidden and not {MANIFEST} / {ARRAYS}."
        )


def save_model(
    path: str | os.PathLike,
    state: Any,
    metadata: dict[str, Any],
    *,
    extra_files: dict[str, bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a model directory.

    Args:
      path: the directory (created; a non-empty one needs `overwrite`).
      state: the detector's state pytree (see `encode_tree`).
      metadata: JSON-serialisable description (detector, config, backbone,
        weights identity, image size, threshold, ...), stored as is under
        `"metadata"`.
      extra_files: name -> bytes, written beside (e.g. the exported program).
      overwrite: allow replacing the files of an existing model directory.

    Returns:
      The directory.

    Raises:
      FileExistsError: `path` is a non-empty directory and not `overwrite`.
      ValueError: a bad extra file name.
      TypeError: a state node that cannot be saved.
    """
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not an empty directory; a model is never overwritten "
            "silently. Pick a new --out, or pass --overwrite."
        )
    extra_files = dict(extra_files or {})
    for name in extra_files:
        _check_file_name(name)
    structure, arrays = encode_tree(state)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, blob in {ARRAYS: save(arrays), **extra_files}.items():
        write_output(out, name, blob)
        files[name] = hashlib.sha256(blob).hexdigest()
    manifest = {
        "format": FORMAT,
        "package_version": package_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "metadata": metadata,
        "state": structure,
        "files": files,
    }
    write_output(out, MANIFEST, json_text(manifest, indent=1) + "\n")
    return out


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed, format-checked `model.json` of a model directory."""
    root = Path(path)
    man = root / MANIFEST
    if not root.is_dir():
        raise ModelFormatError(
            f"model directory {root} does not exist; make one with "
            "`python -m experiments.fit --support_dir=... --out=...`."
        )
    if man.is_symlink() or not man.is_file():
        raise ModelFormatError(f"{root} has no {MANIFEST}: it is not a model directory.")
    size = man.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ModelFormatError(f"{man} is {size} bytes (limit {MAX_MANIFEST_BYTES}); not a model.")
    try:
        manifest = json.loads(man.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{man} is not valid JSON ({e}); the directory is corrupt.") from e
    except RecursionError as e:
        raise ModelFormatError(f"{man} is nested too deeply; the directory is corrupt.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ModelFormatError(
            f"{man} has format {got!r}; this version reads {FORMAT!r}. Refit the model."
        )
    for key, kind in (("metadata", dict), ("state", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ModelFormatError(f"{man} lacks the object {key!r}; the directory is corrupt.")
    for name, digest in manifest["files"].items():
        try:
            if name != ARRAYS:
                _check_file_name(name)
        except ValueError as e:
            raise ModelFormatError(f"{man}: {e}") from e
        if not isinstance(digest, str) or len(digest) != 64:
            raise ModelFormatError(f"{man}: the SHA-256 of {name!r} is malformed.")
    for key in ("package_version", "created"):
        if not isinstance(manifest.get(key, ""), str):
            raise ModelFormatError(f"{man}: {key!r} is not text; the directory is corrupt.")
    return manifest


def _no_constant(name: str) -> None:
    raise ModelFormatError(
        f"{MANIFEST} holds {name}; a model never records a non-finite number. The file was "
        "changed or written by another tool: refit the model."
    )


def _verified_path(root: Path, manifest: dict[str, Any], name: str) -> Path:
    """`root / name` after checking it is listed, plain and unchanged (SHA-256)."""
    files = manifest["files"]
    if name not in files:
        raise ModelFormatError(f"{root} has no {name!r} (the model was saved without it).")
    if name != ARRAYS:
        _check_file_name(name)
    file = root / name
    if file.is_symlink() or not file.is_file():
        raise ModelFormatError(
            f"{file} is listed in {MANIFEST} but missing or not a plain file (a symlink could "
            "point outside the model directory); the directory is corrupt."
        )
    digest = file_sha256(file)
    if digest != files[name]:
        raise ModelFormatError(
            f"{file} does not match the SHA-256 in {MANIFEST} ({digest[:12]}... vs "
            f"{str(files[name])[:12]}...): the file was changed or truncated. Refit the model."
        )
    return file


def read_file(path: str | os.PathLike, name: str) -> bytes:
    """An extra file of a model directory, after its SHA-256 check."""
    root = Path(path)
    return _verified_path(root, read_manifest(root), name).read_bytes()


def load_model(
    path: str | os.PathLike, allowed_classes: tuple[str, ...] = ALLOWED_CLASSES
) -> LoadedModel:
    """Reads a model directory written by `save_model`.

    Args:
      path: the directory.
      allowed_classes: `"module:QualName"` of the classes the state may name.

    Returns:
      The `LoadedModel`.

    Raises:
      ModelFormatError: missing or corrupt files, another format, a class
        outside `allowed_classes`.
    """
    root = Path(path)
    manifest = read_manifest(root)
    file = _verified_path(root, manifest, ARRAYS)
    try:
        with safe_open(str(file), framework="numpy") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # safetensors raises its own error types
        raise ModelFormatError(f"cannot read {file}: {e}") from e
    state = decode_tree(manifest["state"], arrays, allowed_classes)
    version = package_version()
    note = None
    if manifest.get("package_version") != version:
        note = (
            f"model written by protorefine_jax {manifest.get('package_version')}, running {version}"
        )
    return LoadedModel(state=state, manifest=manifest, path=root, version_note=note)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: list(d) if isinstance(d, tuple) else d}


def differences(fitted: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Lines `key: model has X, requested Y` for every leaf of `requested` that differs."""
    have = _flatten(json.loads(json.dumps(fitted, default=str)))
    want = _flatten(json.loads(json.dumps(requested, default=str)))
    lines = []
    for key, value in want.items():
        if key not in have:
            lines.append(f"{key}: the model does not record it, requested {value!r}")
        elif have[key] != value:
            lines.append(f"{key}: model has {have[key]!r}, requested {value!r}")
    return lines


def check_matches(manifest: dict[str, Any], requested: dict[str, Any]) -> None:
    """Raises `ModelMismatchError` unless `manifest["metadata"]` agrees with `requested`.

    Args:
      manifest: from `read_manifest` / `load_model`.
      requested: nested dict of the settings about to be used (only its
        leaves are compared; e.g. `{"backbone": {"weights_sha256": ...}}`).
    """
    lines = differences(manifest["metadata"], requested)
    if lines:
        raise ModelMismatchError(
            "the model was fitted with other settings than requested:\n  "
            + "\n  ".join(lines)
            + "\nFit a new model with these settings, or drop the differing flags to use the "
            "model's own."
        )
