"""Model directories: round trip, integrity checks, class allow-list, mismatch errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from protorefine_jax import RefineConfig, build_bank
from protorefine_jax.io import model_dir
from protorefine_jax.io.model_dir import (
    ModelFormatError,
    ModelMismatchError,
    check_matches,
    load_model,
    read_file,
    save_model,
)

META = {
    "detector": "patchcore+",
    "config": {"lam": 0.3, "num_iters": 3, "grid_shape": [4, 4]},
    "backbone": {"name": "efficientnet_lite0", "weights_sha256": "ab" * 32},
    "image_size": [64, 64],
    "threshold": {"value": 1.5, "kind": "normal_only"},
}


def _state(rng):
    feats = jnp.asarray(rng.standard_normal((2, 16, 8)), jnp.float32)
    return {
        "bank": build_bank(feats, 0.25),
        "config": RefineConfig(grid_shape=(4, 4), image_size=(16, 16)),
        "extras": [np.arange(3, dtype=np.int32), None, (True, 2.5, "txt")],
        "empty": np.zeros((0, 4), np.float32),
        "scalar": jnp.float32(0.5),  # 0-d (calibration statistics): keeps its shape
    }


def test_round_trip_keeps_every_array_and_node(rng, tmp_path):
    state = _state(rng)
    out = save_model(tmp_path / "m", state, META, extra_files={"detector.jaxexport": b"xyz"})
    loaded = load_model(out)
    got = loaded.state
    assert type(got["bank"]).__name__ == "MemoryBank"
    np.testing.assert_array_equal(got["bank"].prototypes, np.asarray(state["bank"].prototypes))
    np.testing.assert_array_equal(got["bank"].indices, np.asarray(state["bank"].indices))
    assert got["bank"].bank_rank == state["bank"].bank_rank
    assert got["bank"].degenerate is bool(state["bank"].degenerate)
    assert isinstance(got["config"], RefineConfig) and got["config"].grid_shape == (4, 4)
    assert got["config"].lam == pytest.approx(float(state["config"].lam))
    np.testing.assert_array_equal(got["extras"][0], np.arange(3))
    assert got["extras"][1] is None and got["extras"][2] == (True, 2.5, "txt")
    assert got["empty"].shape == (0, 4)
    assert got["scalar"].shape == () and got["scalar"].dtype == np.float32
    assert float(got["scalar"]) == 0.5
    assert loaded.manifest["metadata"] == META
    assert loaded.manifest["package_version"] == model_dir.package_version()
    assert loaded.version_note is None
    assert read_file(out, "detector.jaxexport") == b"xyz"


def test_existing_directory_is_not_overwritten(rng, tmp_path):
    save_model(tmp_path / "m", _state(rng), META)
    with pytest.raises(FileExistsError, match="never overwritten silently"):
        save_model(tmp_path / "m", _state(rng), META)
    save_model(tmp_path / "m", _state(rng), META, overwrite=True)


def test_bad_extra_file_names_are_refused(rng, tmp_path):
    for name in ("../x", "a/b", ".hidden", "model.json", ""):
        with pytest.raises(ValueError, match="plain name"):
            save_model(tmp_path / "m", _state(rng), META, extra_files={name: b""})


def test_tampered_arrays_fail_the_hash_check(rng, tmp_path):
    out = save_model(tmp_path / "m", _state(rng), META)
    data = bytearray((out / "state.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "state.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="does not match the SHA-256"):
        load_model(out)


def test_manifest_errors(rng, tmp_path):
    with pytest.raises(ModelFormatError, match="does not exist"):
        load_model(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="not a model directory"):
        load_model(tmp_path / "empty")
    out = save_model(tmp_path / "m", _state(rng), META)
    manifest = json.loads((out / "model.json").read_text())
    (out / "model.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_model(out)
    (out / "model.json").write_text(json.dumps({**manifest, "format": "other/9"}))
    with pytest.raises(ModelFormatError, match="has format 'other/9'"):
        load_model(out)
    (out / "model.json").write_text(json.dumps({**manifest, "package_version": "0.0.1"}))
    assert "0.0.1" in load_model(out).version_note
    with pytest.raises(ModelFormatError, match="has no 'detector.jaxexport'"):
        read_file(out, "detector.jaxexport")


def test_classes_outside_the_allow_list_are_never_imported(rng, tmp_path):
    out = save_model(tmp_path / "m", _state(rng), META)
    manifest = json.loads((out / "model.json").read_text())
    manifest["state"]["items"]["bank"]["class"] = "os:system"
    (out / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="outside the allowed classes"):
        load_model(out)
    # Only named classes: not any class of a module under protorefine_jax.
    for name in ("protorefine_jax.bank:NoSuchClass", "protorefine_jax.threshold:Threshold"):
        manifest["state"]["items"]["bank"]["class"] = name
        (out / "model.json").write_text(json.dumps(manifest))
        with pytest.raises(ModelFormatError, match="outside the allowed classes"):
            load_model(out)


def test_shape_mismatch_between_manifest_and_arrays(rng, tmp_path):
    out = save_model(tmp_path / "m", _state(rng), META)
    manifest = json.loads((out / "model.json").read_text())
    manifest["state"]["items"]["empty"]["shape"] = [1, 4]
    (out / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="the directory is corrupt"):
        load_model(out)


def test_unsavable_nodes_are_named(tmp_path):
    with pytest.raises(TypeError, match=r"state\['f'\]: cannot save a function"):
        save_model(tmp_path / "m", {"f": lambda: 0}, META)
    with pytest.raises(TypeError, match="dict keys must be strings"):
        save_model(tmp_path / "m", {1: 2}, META)


def test_check_matches_names_every_difference(rng, tmp_path):
    out = save_model(tmp_path / "m", _state(rng), META)
    manifest = load_model(out).manifest
    check_matches(manifest, {"config": {"lam": 0.3}, "image_size": (64, 64)})
    with pytest.raises(ModelMismatchError) as err:
        check_matches(
            manifest,
            {
                "config": {"lam": 0.5, "num_iters": 3},
                "backbone": {"weights_sha256": "cd" * 32},
                "image_size": [128, 128],
                "new_field": 1,
            },
        )
    msg = str(err.value)
    assert "config.lam: model has 0.3, requested 0.5" in msg
    assert "backbone.weights_sha256: model has 'abab" in msg
    assert "image_size: model has [64, 64], requested [128, 128]" in msg
    assert "new_field: the model does not record it" in msg
    assert "num_iters" not in msg
