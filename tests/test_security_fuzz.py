"""Issue 11: fuzz of the checkpoint readers (truncated, bit-flipped, oversized claims).

A few hundred mutated files per run, seeded: every one either loads or raises
`CheckpointError` naming the file; never a crash (the test process would
die), a hang (the whole run is timed) or another exception type.
"""

from __future__ import annotations

import random
import struct
import time

import numpy as np
from crafted import good_tensors, legacy_checkpoint, zip_checkpoint

from protorefine_jax.io.errors import CheckpointError
from protorefine_jax.io.torch_checkpoint import load_state_dict


def _seeds():
    tensors, storages = good_tensors()
    import io

    npz = io.BytesIO()
    np.savez(npz, w=np.arange(12, dtype=np.float32).reshape(3, 4), b=np.ones(3))
    from safetensors.numpy import save

    return {
        "legacy.pth": legacy_checkpoint(tensors, storages),
        "zip.pth": zip_checkpoint(tensors, storages),
        "w.npz": npz.getvalue(),
        "w.safetensors": save({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}),
    }


def _mutate(rng: random.Random, blob: bytes) -> bytes:
    b = bytearray(blob)
    kind = rng.choice(["truncate", "flip", "flip", "claim", "splice"])
    if kind == "truncate":
        return bytes(b[: rng.randrange(len(b))])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == "claim":  # an oversized 4- or 8-byte length / count somewhere
        i = rng.randrange(len(b) - 8)
        big = rng.choice([2**31 - 1, 2**32 - 1, 2**40, 2**62, 2**63 - 1])
        b[i : i + 8] = struct.pack("<Q", big)
        return bytes(b)
    i, j = sorted(rng.randrange(len(b)) for _ in range(2))  # duplicate a chunk
    return bytes(b[:j] + b[i:j] + b[j:])


def test_fuzzed_checkpoints_load_or_raise_checkpoint_error(tmp_path):
    rng = random.Random(11)
    seeds = _seeds()
    start = time.monotonic()
    outcomes = {"loaded": 0, "refused": 0}
    cases = 0
    for name, blob in seeds.items():
        for i in range(100):
            path = tmp_path / f"{i}_{name}"
            path.write_bytes(_mutate(rng, blob))
            t0 = time.monotonic()
            try:
                state = load_state_dict(path)
                assert all(isinstance(v, np.ndarray) for v in state.values())
                outcomes["loaded"] += 1
            except CheckpointError as e:
                assert str(path) in str(e), e
                outcomes["refused"] += 1
            assert time.monotonic() - t0 < 5, f"{path} took too long"
            path.unlink()
            cases += 1
    assert cases == 400
    assert outcomes["refused"] > 100  # the mutations really corrupt files
    assert time.monotonic() - start < 60
