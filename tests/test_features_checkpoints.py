"""The torch-free checkpoint reader against files written by torch itself."""

import os
import pickle

import numpy as np
import pytest

from protorefine_jax.features import checkpoints
from protorefine_jax.io import torch_checkpoint
from protorefine_jax.io.torch_checkpoint import CheckpointError, load_state_dict

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_reads_torch_formats(fmt):
    # Written by tests/fixtures/make_torch_fixtures.py with torch 2.14 (views, offsets, bf16, ...).
    ref = np.load(os.path.join(FIXTURES, "tiny_state_ref.npz"))
    got = load_state_dict(os.path.join(FIXTURES, f"tiny_state_{fmt}.pth"))
    assert list(got) == list(ref.files)
    for key in ref.files:
        assert got[key].dtype == ref[key].dtype, key
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_reads_shipped_legacy_lite0_checkpoint():
    state = load_state_dict(torch_checkpoint.shipped_checkpoint("efficientnet_lite0"))
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert np.isfinite(state["_blocks.15._project_conv.weight"]).all()


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_reads_npz_and_safetensors(tmp_path, suffix):
    state = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2)}
    path = str(tmp_path / f"w{suffix}")
    if suffix == ".npz":
        np.savez(path, **state)
    else:
        from safetensors.numpy import save_file

        save_file(state, path)
    got = load_state_dict(path)
    for key, value in state.items():
        np.testing.assert_array_equal(got[key], value)


def test_missing_file_names_the_file(tmp_path):
    path = str(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not found: .*nope.pth"):
        load_state_dict(path)


def test_refuses_arbitrary_globals(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for obj in (
            torch_checkpoint.LEGACY_MAGIC_NUMBER,
            torch_checkpoint.LEGACY_PROTOCOL_VERSION,
            {},
        ):
            pickle.dump(obj, f, protocol=2)
        pickle.dump({"x": os.getcwd}, f, protocol=2)  # a global the reader must not resolve
    with pytest.raises(CheckpointError, match=r"evil.pth.*not allowed"):
        load_state_dict(path)


def test_truncated_checkpoint_names_the_file(tmp_path):
    data = open(os.path.join(FIXTURES, "tiny_state_legacy.pth"), "rb").read()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(CheckpointError, match="cut.pth.*truncated"):
        load_state_dict(path)


def test_garbage_file_names_the_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_state_dict(path)


def test_check_state_dict_names_first_bad_key():
    expected = {"a": (2,), "b": (3, 3), "c": (1,)}
    with pytest.raises(CheckpointError, match=r"f.pth: missing key 'b'"):
        checkpoints.check_state_dict({"a": np.zeros(2)}, expected, "f.pth")
    with pytest.raises(CheckpointError, match=r"f.pth: key 'b' has shape \(3,\), expected"):
        checkpoints.check_state_dict({"a": np.zeros(2), "b": np.zeros(3)}, expected, "f.pth")


def test_shipped_checkpoint_unknown_name():
    with pytest.raises(CheckpointError, match="no shipped weights for 'wide_resnet50_2'"):
        torch_checkpoint.shipped_checkpoint("wide_resnet50_2")
