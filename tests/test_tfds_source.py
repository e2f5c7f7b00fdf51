"""TFDS as a data source: the same files, order, pixels and masks as the folder reader."""

import numpy as np
import pytest

from protorefine_jax.data import load_category, make_synthetic_dataset
from protorefine_jax.data.tfds_source import load_tfds_category


def test_tfds_category_matches_the_folder_reader(tmp_path):
    root = make_synthetic_dataset(tmp_path / "raw", ["fabric"], 3, 2, 4, image_size=32)
    folder = load_category(root, "fabric", 32)
    tf = load_tfds_category("folder", root, "fabric", tmp_path / "tfds", 32)
    assert [folder.name(p) for p in folder.train_good] == [tf.name(p) for p in tf.train_good]
    assert [(folder.name(t.path), t.label, t.defect_type) for t in folder.test] == [
        (tf.name(t.path), t.label, t.defect_type) for t in tf.test
    ]
    np.testing.assert_array_equal(
        folder.load_images(folder.train_good), tf.load_images(tf.train_good)
    )
    a, b = list(folder.test_batches(3)), list(tf.test_batches(3))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_array_equal(x.masks, y.masks)
        np.testing.assert_array_equal(x.labels, y.labels)
    assert tf.defect_types == folder.defect_types
    # A second call reads the prepared files.
    again = load_tfds_category("folder", root, "fabric", tmp_path / "tfds", 32)
    assert len(again.test) == len(tf.test)


def test_tfds_source_errors(tmp_path):
    with pytest.raises(ValueError, match="use --data_source=folder for VisA"):
        load_tfds_category("visa", tmp_path, "candle", tmp_path / "tfds")
    root = make_synthetic_dataset(tmp_path / "raw", ["fabric"], 1, 1, 1, image_size=32)
    tf = load_tfds_category("folder", root, "fabric", tmp_path / "tfds", 32)
    with pytest.raises(FileNotFoundError, match="not in the prepared TFDS data"):
        tf.load_images([tf.root / "train/good/999.png"])
