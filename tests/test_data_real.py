"""Smoke test on the real images of the workspace (skipped where absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from protorefine_jax import data

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

pytestmark = pytest.mark.skipif(
    not DATA.is_dir(),
    reason=f"real images not found at {DATA} (only present in the project workspace)",
)


@pytest.mark.parametrize(
    ("dataset", "category", "train", "good", "defect", "types"),
    [
        ("mpdd", "metal_plate", 54, 26, 71, ("defect",)),
        ("mvtec", "bottle", 209, 20, 8, ("broken_large", "broken_small", "contamination")),
    ],
)
def test_counts_and_a_batch(dataset, category, train, good, defect, types):
    d = data.load_dataset_category(dataset, DATA / dataset, category, image_size=256)
    assert len(d.train_good) == train
    labels = d.test_labels
    assert (labels == 0).sum() == good and (labels == 1).sum() == defect
    assert all(t.mask_path is not None and t.mask_path.is_file() for t in d.test if t.label)
    assert d.defect_types == types
    support = data.sample_support(d.train_good, 2, seed=0, root=d.root)
    assert all(n.startswith("train/good/") for n in support.names)
    assert d.load_images(support.paths).shape == (2, 256, 256, 3)
    # First batch holds defective images (sorted by defect type, "good" after them).
    batch = next(d.test_batches(batch_size=4))
    assert batch.images.shape == (4, 256, 256, 3) and batch.images.dtype == np.uint8
    assert batch.labels.tolist() == [1, 1, 1, 1]
    frac = batch.masks.mean(axis=(1, 2))
    assert ((frac > 0) & (frac < 0.5)).all()
