"""Synthetic default dataset: determinism, exact masks, layout, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from protorefine_jax import data


def test_deterministic():
    a = data.render("fabric", "test_defect", 4, seed=3)
    b = data.render("fabric", "test_defect", 4, seed=3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    c = data.render("fabric", "test_defect", 4, seed=4)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(
        data.render("grain", "train", 0).image, data.render("grain", "train", 1).image
    )


@pytest.mark.parametrize("category", data.SYNTHETIC_CATEGORIES)
def test_defects_change_exactly_the_mask(category):
    for i in range(6):
        s = data.render(category, "test_defect", i, seed=1)
        assert s.defect_type == data.DEFECT_TYPES[i % 3]
        assert s.image.shape == (256, 256, 3) and s.image.dtype == np.uint8
        assert 10 < s.mask.sum() < 0.05 * s.mask.size
        diff = np.abs(s.image.astype(int) - s.clean.astype(int)).max(-1)
        assert not diff[~s.mask].any()  # nothing changes outside the mask
        assert diff[s.mask].mean() > 5  # the defect is visible inside it
    good = data.render(category, "test_good", 0)
    assert not good.mask.any() and np.array_equal(good.image, good.clean)


def test_written_dataset_reads_back(tmp_path):
    # CPU time of this process: robust to other jobs sharing the machine.
    t0 = time.process_time()
    root = data.make_synthetic_dataset(tmp_path / "syn", seed=0)  # 2 x (10 + 10 + 10) @ 256
    elapsed = time.process_time() - t0
    assert elapsed < 5.0, f"generation took {elapsed:.1f} s"
    assert data.discover_categories(root) == ("fabric", "grain")
    d = data.load_category(root, "fabric")
    assert len(d.train_good) == 10 and len(d.test) == 20
    assert d.defect_types == tuple(sorted(data.DEFECT_TYPES))
    assert d.test_labels.sum() == 10
    for item in d.test:
        if item.label == 0:
            continue
        i = 3 * int(item.path.stem) + data.DEFECT_TYPES.index(item.defect_type)
        ref = data.render("fabric", "test_defect", i, seed=0)
        np.testing.assert_array_equal(np.asarray(Image.open(item.path)), ref.image)
        raw = np.asarray(Image.open(item.mask_path))
        assert set(np.unique(raw)) <= {0, 255}
        np.testing.assert_array_equal(d.load_masks([item])[0], ref.mask)


def test_unknown_names():
    with pytest.raises(ValueError, match="Unknown synthetic category 'wool'. Known: fabric"):
        data.render("wool", "train", 0)
    with pytest.raises(ValueError, match="Unknown split"):
        data.render("fabric", "val", 0)
