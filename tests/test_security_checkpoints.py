"""Issue 11, items 1, 2, 5 (checkpoints) and 6 (corrupt safetensors): files are data.

Each test builds its crafted file (tests/crafted.py), then checks that no code
ran (the marker file is absent), that memory stayed bounded (the allocation is
refused before it happens: tracemalloc peak far below the claim), and that the
error is a CheckpointError naming the file and the problem.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
from crafted import (
    MAGIC,
    PROTOCOL,
    Evil,
    EvilSystem,
    good_tensors,
    legacy_checkpoint,
    tensor_pickle,
    zip_checkpoint,
)

from protorefine_jax.io import torch_checkpoint
from protorefine_jax.io.errors import CheckpointError
from protorefine_jax.io.safe_pickle import SafeUnpickler
from protorefine_jax.io.torch_checkpoint import load_state_dict

MiB = 1 << 20


def _peak_bytes(fn):
    """Runs ``fn`` under tracemalloc; returns (exception or None, peak bytes)."""
    tracemalloc.start()
    try:
        fn()
        err = None
    except Exception as e:  # noqa: BLE001 - returned to the caller to check
        err = e
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return err, peak


def test_crafted_files_are_valid_when_not_hostile(tmp_path):
    # The builders make files the reader accepts: the hostile variants below
    # differ from a working file only in the crafted part.
    tensors, storages = good_tensors()
    for name, blob in (
        ("ok_legacy.pth", legacy_checkpoint(tensors, storages)),
        ("ok_zip.pth", zip_checkpoint(tensors, storages)),
    ):
        (tmp_path / name).write_bytes(blob)
        got = load_state_dict(tmp_path / name)
        np.testing.assert_array_equal(got["w"], np.arange(12, dtype=np.float32).reshape(3, 4))
        np.testing.assert_array_equal(got["b"], np.arange(8, 12, dtype=np.float32))


@pytest.mark.parametrize("evil_cls", [Evil, EvilSystem])
@pytest.mark.parametrize("where", ["magic", "version", "sys_info", "keys", "object"])
def test_legacy_pickles_cannot_run_code(tmp_path, where, evil_cls):
    marker = tmp_path / "CODE_RAN"
    evil = evil_cls(marker)
    tensors, storages = good_tensors()
    f = io.BytesIO()
    header = {"magic": MAGIC, "version": PROTOCOL, "sys_info": {"little_endian": True}}
    if where in header:
        header[where] = evil if where != "sys_info" else {"little_endian": True, "x": evil}
    for obj in header.values():
        pickle.dump(obj, f, protocol=2)
    if where == "object":
        pickle.dump({"w": evil}, f, protocol=2)
    else:
        f.write(tensor_pickle(tensors, legacy=True))
    pickle.dump(["0", evil] if where == "keys" else ["0"], f, protocol=2)
    f.write(struct.pack("<q", 12) + storages["0"].tobytes())
    path = tmp_path / "evil.pth"
    path.write_bytes(f.getvalue())
    with pytest.raises(CheckpointError, match=r"evil\.pth.*is not allowed"):
        load_state_dict(path)
    assert not marker.exists()


def test_zip_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "CODE_RAN"
    path = tmp_path / "evil.pth"
    path.write_bytes(zip_checkpoint({}, {}, data_pkl=pickle.dumps({"w": Evil(marker)}, 2)))
    with pytest.raises(CheckpointError, match=r"evil\.pth.*global io\.open is not allowed"):
        load_state_dict(path)
    assert not marker.exists()


def test_pickled_state_cannot_overwrite_a_checked_tensor():
    # BUILD after REDUCE would replace the checked size/stride of a tensor.
    tensors, _ = good_tensors()
    pkl = tensor_pickle({"w": tensors["w"]}, legacy=False)
    # ... tR (tensor)  +  state dict {"stride": (-1,)} BUILD, before the SETITEMS.
    hacked = pkl[:-2] + b"}" + b"X\x06\x00\x00\x00stride" + b"(J\xff\xff\xff\xfft" + b"sb" + b"u."
    blob = zip_checkpoint({}, {"0": np.zeros(12, np.float32)}, data_pkl=hacked)
    with pytest.raises(CheckpointError, match="takes no pickled state"):
        load_state_dict_bytes(blob)


def load_state_dict_bytes(blob: bytes, suffix=".pth"):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f" + suffix)
        with open(path, "wb") as f:
            f.write(blob)
        return load_state_dict(path)


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
@pytest.mark.parametrize(
    "offset, size, stride, match",
    [
        (10, (60,), (-1,), "negative"),  # reads memory before the storage
        (0, (4,), (-(2**40),), "negative"),  # segfault in the old reader
        (-5, (4,), (1,), "negative"),
        (0, (13,), (1,), "extends beyond its storage"),
        (0, (2, 2**40), (1, 1), "extends beyond its storage|claim"),
    ],
)
def test_tensor_views_are_checked_against_the_storage(tmp_path, fmt, offset, size, stride, match):
    tensors = {"w": ("0", 12, offset, size, stride)}
    storages = {"0": np.arange(12, dtype=np.float32)}
    build = legacy_checkpoint if fmt == "legacy" else zip_checkpoint
    path = tmp_path / "view.pth"
    path.write_bytes(build(tensors, storages))
    err, peak = _peak_bytes(lambda: load_state_dict(path))
    assert isinstance(err, CheckpointError), err
    assert "view.pth" in str(err) and pytest.importorskip("re").search(match, str(err)), err
    assert peak < 8 * MiB


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_zero_stride_memory_bomb_refused_before_allocating(tmp_path, fmt):
    # A ~600-byte file whose one tensor claims 4 GiB through a zero stride.
    tensors = {"w": ("0", 1, 0, (1 << 30,), (0,))}
    build = legacy_checkpoint if fmt == "legacy" else zip_checkpoint
    path = tmp_path / "bomb.pth"
    path.write_bytes(build(tensors, {"0": np.zeros(1, np.float32)}))
    assert path.stat().st_size < 1000
    err, peak = _peak_bytes(lambda: load_state_dict(path))
    assert isinstance(err, CheckpointError) and "refused before allocating" in str(err), err
    assert "bomb.pth" in str(err)
    assert peak < 8 * MiB


def test_many_views_of_one_storage_count_towards_the_budget(tmp_path):
    storage = np.zeros(1 << 16, np.float32)  # 256 KiB
    tensors = {f"t{i}": ("0", 1 << 16, 0, (1 << 16,), (1,)) for i in range(64)}  # 16 MiB
    path = tmp_path / "views.pth"
    path.write_bytes(zip_checkpoint(tensors, {"0": storage}))
    err, peak = _peak_bytes(lambda: load_state_dict(path))
    assert isinstance(err, CheckpointError) and "claim" in str(err), err
    assert peak < 8 * MiB


def test_legacy_storage_length_claim_checked_against_the_file(tmp_path):
    tensors, storages = good_tensors()
    blob = bytearray(legacy_checkpoint(tensors, storages))
    at = len(blob) - 12 * 4 - 8
    blob[at : at + 8] = struct.pack("<q", 1 << 40)  # 4 TiB claimed by a 1 KB file
    path = tmp_path / "claim.pth"
    path.write_bytes(bytes(blob))
    err, peak = _peak_bytes(lambda: load_state_dict(path))
    assert isinstance(err, CheckpointError), err
    assert "claim.pth" in str(err) and "refused before allocating" in str(err)
    assert peak < 8 * MiB


def test_pickle_length_claim_checked_before_the_unpickler_allocates(tmp_path):
    # BINBYTES8 claiming 64 GiB: the C unpickler would allocate it before reading.
    f = io.BytesIO()
    pickle.dump(MAGIC, f, protocol=2)
    pickle.dump(PROTOCOL, f, protocol=2)
    f.write(b"\x80\x04\x8e" + struct.pack("<Q", 64 << 30) + b"abc")
    path = tmp_path / "bytes8.pth"
    path.write_bytes(f.getvalue())
    err, peak = _peak_bytes(lambda: load_state_dict(path))
    assert isinstance(err, CheckpointError) and "truncated pickle" in str(err), err
    assert peak < 8 * MiB


def test_safe_unpickler_refuses_unchecked_streams(tmp_path):
    with pytest.raises(TypeError, match="BytesIO only"):
        SafeUnpickler(open(__file__, "rb"))  # noqa: SIM115


def test_zip_bomb_refused_before_decompressing(tmp_path):
    storages = {"0": b"\0" * (32 * MiB)}
    tensors = {"w": ("0", 8 * MiB, 0, (8 * MiB,), (1,))}
    path = tmp_path / "zipbomb.pth"
    path.write_bytes(zip_checkpoint(tensors, storages, compress=True))
    assert path.stat().st_size < 200_000
    err, peak = _peak_bytes(lambda: load_state_dict(path))
    assert isinstance(err, CheckpointError), err
    assert "zipbomb.pth" in str(err) and "refused before decompressing" in str(err)
    assert peak < 8 * MiB


def test_npz_bomb_refused_before_decompressing(tmp_path):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, w=np.zeros(16 * MiB, np.uint8))
    assert path.stat().st_size < 100_000
    err, peak = _peak_bytes(lambda: load_state_dict(path))
    assert isinstance(err, CheckpointError) and "refused before decompressing" in str(err), err
    assert peak < 8 * MiB


def test_npz_header_shape_claim_checked_before_allocating(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 34,)}
    )
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("w.npy", header.getvalue() + b"\0" * 64)
    err, peak = _peak_bytes(lambda: load_state_dict(path))
    assert isinstance(err, CheckpointError), err
    assert "liar.npz" in str(err) and "header claims shape" in str(err)
    assert peak < 8 * MiB


def test_npz_object_arrays_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match=r"obj\.npz.*object arrays"):
        load_state_dict(path)


def test_corrupt_safetensors_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 40) + b'{"w": {"dtype": "F32", "shape": [1000')
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*not a valid safetensors"):
        load_state_dict(path)
    lie = tmp_path / "lie.safetensors"
    head = b'{"w":{"dtype":"F32","shape":[1000000],"data_offsets":[0,4000000]}}'
    lie.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"lie\.safetensors.*not a valid safetensors"):
        load_state_dict(lie)


def test_budget_constant_is_what_the_messages_say():
    assert torch_checkpoint.MAX_EXPANSION == 4
