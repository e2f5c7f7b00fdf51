"""Builders of crafted (hostile or corrupt) files for the security tests.

Everything is built at test time from these functions: no binary file is
committed. Torch pickles are assembled opcode by opcode, so torch is not needed.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile

import numpy as np

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL = 1001


class Evil:
    """Unpickling it calls ``open(marker, "w")``: creates the marker file (code ran)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class EvilSystem:
    """Unpickling it runs ``os.system("touch marker")`` (the issue's example)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch '{self.marker}'",))


def _u(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _tuple(items) -> bytes:
    return b"(" + b"".join(items) + b"t"


def tensor_pickle(
    tensors: dict,
    *,
    legacy: bool,
    storage="FloatStorage",
) -> bytes:
    """Pickle of ``{name: tensor}``; each value is ``(key, numel, offset, size, stride)``."""
    out = [b"\x80\x02", b"ccollections\nOrderedDict\n)R", b"("]
    for name, (key, numel, offset, size, stride) in tensors.items():
        pid = [_u("storage"), f"ctorch\n{storage}\n".encode(), _u(key), _u("cpu"), _int(numel)]
        if legacy:
            pid.append(b"N")
        out += [
            _u(name),
            b"ctorch._utils\n_rebuild_tensor_v2\n",
            b"(",
            _tuple(pid),
            b"Q",
            _int(offset),
            _tuple(_int(s) for s in size),
            _tuple(_int(s) for s in stride),
            b"\x89",
            b"ccollections\nOrderedDict\n)R",
            b"tR",
        ]
    out += [b"u."]
    return b"".join(out)


def legacy_checkpoint(tensors: dict, storages: dict, sys_info=None, keys=None) -> bytes:
    """Legacy torch file: header pickles, object pickle, key list, raw storages.

    ``storages``: ``{key: float32 array}`` written as int64 count + bytes.
    """
    f = io.BytesIO()
    for obj in (MAGIC, PROTOCOL, sys_info if sys_info is not None else {"little_endian": True}):
        pickle.dump(obj, f, protocol=2)
    f.write(tensor_pickle(tensors, legacy=True))
    pickle.dump(list(storages) if keys is None else keys, f, protocol=2)
    for arr in storages.values():
        arr = np.asarray(arr, np.float32)
        f.write(struct.pack("<q", arr.size) + arr.tobytes())
    return f.getvalue()


def zip_checkpoint(tensors: dict, storages: dict, *, data_pkl=None, compress=False) -> bytes:
    """Torch zip file ``archive/data.pkl`` + ``archive/data/<key>``."""
    f = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(f, "w", method) as z:
        pkl = data_pkl if data_pkl is not None else tensor_pickle(tensors, legacy=False)
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, arr in storages.items():
            raw = arr if isinstance(arr, bytes) else np.asarray(arr, np.float32).tobytes()
            z.writestr(f"archive/data/{key}", raw)
    return f.getvalue()


def good_tensors():
    """A small valid state dict: two tensors over one storage (a view with an offset)."""
    storage = np.arange(12, dtype=np.float32)
    tensors = {"w": ("0", 12, 0, (3, 4), (4, 1)), "b": ("0", 12, 8, (4,), (1,))}
    return tensors, {"0": storage}
