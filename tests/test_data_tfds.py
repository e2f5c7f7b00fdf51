"""TFDS builders prepare and read back generated trees, without TensorFlow."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from test_data_folder import write_tree
from test_data_visa import write_visa_tree

from protorefine_jax import data
from protorefine_jax.data import tfds_builders


def test_tensorflow_is_not_installed():
    assert importlib.util.find_spec("tensorflow") is None
    proc = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True)
    assert proc.returncode != 0 and b"No module named 'tensorflow'" in proc.stderr


def _folder_arrays(d: data.CategoryData, split: str) -> dict[str, np.ndarray]:
    """What the folder reader gives, in read_split's layout (sorted by filename)."""
    if split == "train":
        names = [d.name(p) for p in d.train_good]
        images = d.load_images(d.train_good)
        masks = np.zeros((len(names), d.image_size, d.image_size), bool)
        labels, types = [0] * len(names), ["good"] * len(names)
    else:
        names = [d.name(t.path) for t in d.test]
        images, masks = d.load_images([t.path for t in d.test]), d.load_masks(d.test)
        labels, types = [t.label for t in d.test], [t.defect_type for t in d.test]
    order = np.argsort(names)
    return {
        "image": images[order],
        "mask": masks[order],
        "label": np.asarray(labels)[order],
        "defect_type": np.asarray(types)[order],
        "filename": np.asarray(names)[order],
    }


def _assert_same(tfds_split, folder_split):
    assert set(tfds_split) == set(folder_split)
    for key, value in folder_split.items():
        np.testing.assert_array_equal(tfds_split[key], value, err_msg=key)


def test_folder_builder_matches_reader(tmp_path):
    root = write_tree(tmp_path / "ds")
    builder = tfds_builders.prepare_category("folder", root, "widget", tmp_path / "tfds", 16)
    assert builder.info.file_format.value == "array_record"
    assert list((tmp_path / "tfds").rglob("*.array_record*"))
    d = data.load_category(root, "widget", image_size=16)
    for split in ("train", "test"):
        _assert_same(tfds_builders.read_split(builder, split), _folder_arrays(d, split))
    record = builder.as_data_source()["test"][0]
    assert record["image"].shape == (16, 16, 3) and record["image"].dtype == np.uint8
    assert "tensorflow" not in sys.modules


def test_predefined_config_and_visa(tmp_path):
    # A tree whose category is an MPDD name exercises a predefined config.
    root = write_tree(tmp_path / "mpdd")
    (root / "widget").rename(root / "metal_plate")
    builder = tfds_builders.prepare_category("mpdd", root, "metal_plate", tmp_path / "tfds", 240)
    assert builder.builder_config.name == "metal_plate_240"
    test = tfds_builders.read_split(builder, "test")
    assert test["image"].shape == (5, 240, 240, 3) and test["label"].tolist() == [1, 1, 0, 0, 1]

    visa_root = write_visa_tree(tmp_path / "visa")
    builder = tfds_builders.prepare_category("visa", visa_root, "candle", tmp_path / "tfds", 32)
    d = data.load_visa_category(visa_root, "candle", image_size=32)
    for split in ("train", "test"):
        _assert_same(tfds_builders.read_split(builder, split), _folder_arrays(d, split))
    assert "tensorflow" not in sys.modules


def test_builder_errors(tmp_path):
    root = write_tree(tmp_path / "ds", missing_mask=True)
    with pytest.raises(data.MissingMaskError, match="001_mask.png"):
        tfds_builders.prepare_category("folder", root, "widget", tmp_path / "tfds", 16)
    with pytest.raises(data.DatasetNotFoundError, match=r"(?s)does not exist.*manual_dir"):
        tfds_builders.prepare_category("mpdd", tmp_path / "nope", "tubes", tmp_path / "tfds")
    with pytest.raises(ValueError, match="Unknown dataset 'kolektor'"):
        tfds_builders.prepare_category("kolektor", root, "widget", tmp_path / "tfds", 16)
