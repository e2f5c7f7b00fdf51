"""MVTec-layout folder reader and the named-dataset registry, on a generated tree."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protorefine_jax import data

SIZE = 32  # native size of the generated images


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _block_mask(y: int, x: int, value: int = 255) -> np.ndarray:
    """A 2x2-block-aligned square, so a 2x NEAREST downsample is exact."""
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[y : y + 8, x : x + 8] = value
    return m


def write_tree(root: Path, corrupt: bool = False, missing_mask: bool = False) -> Path:
    """Writes a small MVTec-layout dataset with two categories.

    `widget` has RGB, grayscale (L) and RGBA training images, a palette test
    image, masks in several encodings and a stray text file; `corrupt` adds an
    undecodable test image, `missing_mask` a defective image without a mask.
    """
    cat = root / "widget"
    for sub in ("train/good", "test/good", "test/crack", "test/stain"):
        (cat / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("ground_truth/crack", "ground_truth/stain"):
        (cat / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rgb(0)).save(cat / "train/good/000.png")
    Image.fromarray(_rgb(1)[..., 0]).save(cat / "train/good/001.png")  # grayscale L
    rgba = np.concatenate([_rgb(2), np.full((SIZE, SIZE, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(cat / "train/good/002.png")  # RGBA, alpha dropped
    Image.fromarray(_rgb(3)).save(cat / "train/good/003.png")
    (cat / "train/good/notes.txt").write_text("not an image")
    Image.fromarray(_rgb(4)).save(cat / "test/good/000.png")
    Image.fromarray(_rgb(5)).convert("P").save(cat / "test/good/001.png")  # palette
    Image.fromarray(_rgb(6)).save(cat / "test/crack/000.png")
    Image.fromarray(_block_mask(0, 0)).save(cat / "ground_truth/crack/000_mask.png")
    Image.fromarray(_rgb(7)).save(cat / "test/crack/001.png")
    Image.fromarray(_block_mask(8, 16)).convert("1").save(cat / "ground_truth/crack/001_mask.png")
    Image.fromarray(_rgb(8)).save(cat / "test/stain/000.png")
    # Grey levels on both sides of the >127 threshold (as after antialiasing).
    stain = np.maximum(_block_mask(16, 0, 200), _block_mask(16, 16, 100))
    Image.fromarray(stain).save(cat / "ground_truth/stain/000_mask.png")
    if corrupt:
        (cat / "test/good/002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    if missing_mask:
        Image.fromarray(_rgb(9)).save(cat / "test/stain/001.png")
    gadget = root / "gadget" / "train" / "good"
    gadget.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rgb(10)).save(gadget / "000.png")
    (root / "not_a_category").mkdir(exist_ok=True)
    return root


@pytest.fixture
def tree(tmp_path):
    return write_tree(tmp_path / "ds")


def test_listing(tree):
    d = data.load_category(tree, "widget", image_size=SIZE)
    assert [p.name for p in d.train_good] == ["000.png", "001.png", "002.png", "003.png"]
    assert [d.name(t.path) for t in d.test] == [
        "test/crack/000.png",
        "test/crack/001.png",
        "test/good/000.png",
        "test/good/001.png",
        "test/stain/000.png",
    ]
    assert d.test_labels.tolist() == [1, 1, 0, 0, 1]
    assert d.defect_types == ("crack", "stain")
    assert [t.mask_path is None for t in d.test] == [False, False, True, True, False]
    assert data.discover_categories(tree) == ("gadget", "widget")


def test_color_modes_become_rgb(tree):
    d = data.load_category(tree, "widget", image_size=SIZE)
    imgs = d.load_images(d.train_good)
    assert imgs.shape == (4, SIZE, SIZE, 3) and imgs.dtype == np.uint8
    np.testing.assert_array_equal(imgs[0], _rgb(0))
    np.testing.assert_array_equal(imgs[1], np.repeat(_rgb(1)[..., :1], 3, axis=-1))
    np.testing.assert_array_equal(imgs[2], _rgb(2))  # RGBA: stored colour kept
    palette = d.load_images([d.test[3].path])[0]
    assert palette.shape == (SIZE, SIZE, 3)


def test_masks_binarised_then_nearest(tree):
    d = data.load_category(tree, "widget", image_size=SIZE)
    masks = d.load_masks(d.test)
    assert masks.dtype == bool and masks.shape == (5, SIZE, SIZE)
    np.testing.assert_array_equal(masks[0], _block_mask(0, 0) > 0)
    np.testing.assert_array_equal(masks[1], _block_mask(8, 16) > 0)  # mode "1" mask
    assert not masks[2].any() and not masks[3].any()
    np.testing.assert_array_equal(masks[4], _block_mask(16, 0) > 0)  # 200 in, 100 out
    half = data.load_category(tree, "widget", image_size=SIZE // 2)
    small = half.load_masks(half.test)
    assert small.shape == (5, SIZE // 2, SIZE // 2)
    np.testing.assert_array_equal(small[0], masks[0][::2, ::2])
    np.testing.assert_array_equal(small[4], masks[4][::2, ::2])
    imgs = half.load_images(half.train_good)
    assert imgs.shape == (4, SIZE // 2, SIZE // 2, 3)


def test_test_batches(tree):
    d = data.load_category(tree, "widget", image_size=16)
    batches = list(d.test_batches(batch_size=2))
    assert [len(b.items) for b in batches] == [2, 2, 1]
    b = batches[0]
    assert b.images.shape == (2, 16, 16, 3) and b.masks.shape == (2, 16, 16)
    assert b.labels.tolist() == [1, 1] and b.masks.any(axis=(1, 2)).all()
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(d.test_batches(0))


def test_missing_root(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(data.DatasetNotFoundError, match=re.escape(str(missing)) + ".*Fix"):
        data.load_category(missing, "widget")


def test_missing_category_lists_found(tree):
    with pytest.raises(
        data.DatasetNotFoundError,
        match=r"Category 'bottle' not found.*Categories found under .*: gadget, widget\. Fix",
    ):
        data.load_category(tree, "bottle")


def test_corrupt_image_named(tmp_path):
    root = write_tree(tmp_path / "ds", corrupt=True)
    d = data.load_category(root, "widget", image_size=SIZE)  # listing does not decode
    bad = root / "widget" / "test" / "good" / "002.png"
    with pytest.raises(data.CorruptImageError, match=re.escape(str(bad)) + ".*Fix: re-extract"):
        list(d.test_batches(batch_size=8))


def test_missing_mask_named(tmp_path):
    root = write_tree(tmp_path / "ds", missing_mask=True)
    image = root / "widget" / "test" / "stain" / "001.png"
    expected = root / "widget" / "ground_truth" / "stain" / "001_mask.png"
    with pytest.raises(
        data.MissingMaskError,
        match=re.escape(f"{image} has no ground-truth mask: expected {expected}") + ".*Fix",
    ):
        data.load_category(root, "widget")


def test_empty_train_good(tree):
    for f in (tree / "widget" / "train" / "good").glob("*.png"):
        f.unlink()
    with pytest.raises(data.EmptyTrainSetError, match=r"No good training image in .*train/good"):
        data.load_category(tree, "widget")


def test_missing_test_folder(tree):
    with pytest.raises(data.DatasetNotFoundError, match=r"No test folder .*gadget/test\. Fix"):
        data.load_category(tree, "gadget")


def test_registry(tree):
    assert len(data.MVTEC_CATEGORIES) == 15 and len(data.MPDD_CATEGORIES) == 6
    assert len(data.VISA_CATEGORIES) == 12
    assert data.list_categories("mpdd") == data.MPDD_CATEGORIES
    assert data.list_categories("folder", tree) == ("gadget", "widget")
    with pytest.raises(
        data.UnknownCategoryError, match=r"Unknown mpdd category 'widget'.*bracket_black, .*tubes"
    ):
        data.load_dataset_category("mpdd", tree, "widget")
    with pytest.raises(data.UnknownCategoryError, match="Unknown dataset 'kolektor'.*folder"):
        data.list_categories("kolektor")
    with pytest.raises(ValueError, match="no fixed category list"):
        data.list_categories("folder")
    d = data.load_dataset_category("folder", tree, "widget", image_size=SIZE)
    assert len(d.test) == 5
    (tree / "bottle" / "train" / "good").mkdir(parents=True)
    assert data.list_categories("mvtec", tree) == ("bottle",)
