"""Issue 11: fuzz of the checkpoint readers (truncated, bit-flipped, oversized claims).

A few hundred mutated files per run, seeded: every one either loads or raises
`CheckpointError` naming the file; never a crash (the test process would
die), a hang (the whole run is timed) or another exception type.
"""

from __future__ import annotations

import json
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


def _mutate_json(rng: random.Random, node, depth: int = 0):
    """A copy of the JSON value `node` with one random change somewhere inside it."""
    odd = [None, True, -1, 0, 2**63, 1e308, -1e308, "", "../x", [], {}, [1, 2], "a" * 100]
    if isinstance(node, dict) and node and rng.random() < 0.8:
        key = rng.choice(sorted(node))
        out = dict(node)
        kind = rng.random()
        if kind < 0.15:
            del out[key]
        elif kind < 0.25:
            out[f"{key}_extra"] = rng.choice(odd)
        else:
            out[key] = _mutate_json(rng, node[key], depth + 1)
        return out
    if isinstance(node, list) and node and rng.random() < 0.8:
        out = list(node)
        i = rng.randrange(len(out))
        if rng.random() < 0.2:
            del out[i]
        else:
            out[i] = _mutate_json(rng, out[i], depth + 1)
        return out
    if isinstance(node, int | float) and not isinstance(node, bool) and rng.random() < 0.5:
        return rng.choice([node * 10**9, -node, node + 1, 2**31, float("nan"), float("inf")])
    return rng.choice(odd)


def test_fuzzed_model_directories_open_or_raise_the_package_errors(tmp_path):
    """Random changes to a valid model.json: a successful open or the model errors, no other."""
    from protorefine_jax.app import deploy
    from protorefine_jax.data import make_synthetic_dataset
    from protorefine_jax.io.errors import CheckpointError
    from protorefine_jax.io.model_dir import ModelFormatError, ModelMismatchError

    root = make_synthetic_dataset(tmp_path / "d", ["fabric"], 2, 1, 1, image_size=32, seed=0)
    model = tmp_path / "m"
    s = deploy.FitSettings(
        support_dir=str(root / "fabric/train/good"),
        out=str(model),
        method="patchcore",
        image_size=32,
        weights="random",
        batch_size=2,
        progress=False,
    )
    deploy.fit_model(s, log=lambda _: None)
    text = (model / "model.json").read_text()
    manifest = json.loads(text)
    rng = random.Random(12)
    start = time.monotonic()
    outcomes = {"opened": 0, "refused": 0}
    for i in range(100):
        if i % 3 == 0:  # bytes of the text
            blob = _mutate(rng, text.encode())
        else:  # the structure
            blob = json.dumps(_mutate_json(rng, manifest)).encode()
        (model / "model.json").write_bytes(blob)
        t0 = time.monotonic()
        try:
            deploy.open_model(model, runtime="library", log=lambda _: None)
            outcomes["opened"] += 1
        except (ModelFormatError, ModelMismatchError, CheckpointError):
            outcomes["refused"] += 1
        assert time.monotonic() - t0 < 5, f"case {i} took too long"
    assert outcomes["refused"] > 50 and outcomes["opened"] > 0, outcomes
    assert time.monotonic() - start < 60
