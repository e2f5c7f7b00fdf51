"""Image-level labels only: folders without some masks, metrics over the known masks."""

import numpy as np
import pytest

from protorefine_jax.data import MissingMaskError, load_category, make_synthetic_dataset
from protorefine_jax.metrics import evaluate, evaluate_known_masks


def _data(rng, n=12, size=16):
    labels = np.array([0] * 6 + [1] * (n - 6))
    masks = np.zeros((n, size, size), bool)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, size - 4, 2)
        masks[i, y : y + 4, x : x + 4] = True
    maps = rng.random((n, size, size)) + 2.0 * masks
    scores = maps.reshape(n, -1).max(1)
    return labels, scores, masks, maps


def test_all_masks_known_equals_evaluate(rng):
    labels, scores, masks, maps = _data(rng)
    out = evaluate_known_masks(labels, scores, masks, maps, np.ones(12, bool))
    ref = evaluate(labels, scores, masks, maps)
    for k, v in ref.items():
        assert out[k] == pytest.approx(v, rel=1e-12)
    assert out["pixel_note"] is None and out["pixel_images"] == 12


def test_mix_uses_only_known_masks_and_says_how_many(rng):
    labels, scores, masks, maps = _data(rng)
    known = np.ones(12, bool)
    known[[7, 9]] = False
    out = evaluate_known_masks(labels, scores, masks, maps, known)
    ref_pix = evaluate(labels[known], scores[known], masks[known], maps[known])
    ref_img = evaluate(labels, scores)
    assert out["image_auroc"] == pytest.approx(ref_img["image_auroc"], rel=1e-12)
    assert out["pixel_auroc"] == pytest.approx(ref_pix["pixel_auroc"], rel=1e-12)
    assert out["aupro"] == pytest.approx(ref_pix["aupro"], rel=1e-12)
    assert out["pixel_images"] == 10 and out["defective_with_mask"] == 4
    assert "4 of 6 defective images" in out["pixel_note"]


def test_no_masks_gives_null_pixel_metrics(rng):
    labels, scores, masks, maps = _data(rng)
    out = evaluate_known_masks(labels, scores, masks, maps, labels == 0)
    assert out["pixel_auroc"] is None and out["aupro"] is None and out["pixel_f1_max"] is None
    assert "no defective image has a mask" in out["pixel_note"]
    assert out["image_auroc"] == pytest.approx(evaluate(labels, scores)["image_auroc"])
    with pytest.raises(ValueError, match="good images have empty masks"):
        evaluate_known_masks(labels, scores, masks, maps, labels == 1)


def test_folder_without_masks_is_strict_by_default_and_lenient_on_request(tmp_path):
    root = make_synthetic_dataset(tmp_path, ["fabric"], 2, 2, 3, image_size=32)
    first = sorted((root / "fabric/ground_truth").rglob("*_mask.png"))[0]
    first.unlink()
    with pytest.raises(MissingMaskError, match="has no ground-truth mask"):
        load_category(root, "fabric", 32)
    data = load_category(root, "fabric", 32, require_masks=False)
    known = [t.mask_known for t in data.test]
    assert known.count(False) == 1 and len(known) == 5
    assert [t.mask_path is None for t in data.test if t.label == 1].count(True) == 1
