"""Metrics against sklearn and an independent, slow AUPRO written here."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.measure
from sklearn.metrics import precision_recall_curve, roc_auc_score

from protorefine_jax import metrics


def _ties(rng, shape, levels=7):
    """Scores with many ties: few distinct values."""
    return rng.integers(0, levels, shape).astype(np.float32) / levels


def _sk_f1_max(labels, scores):
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return 100.0 * f1.max()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [3, 20, 0])
def test_auroc_and_f1_match_sklearn(seed, levels):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[:2] = [True, False]  # both classes present
    if levels:
        scores = _ties(rng, n, levels) + labels * rng.uniform(0, 0.3)
        scores = np.round(scores, 1)
    else:
        scores = rng.standard_normal(n) + labels
    np.testing.assert_allclose(
        metrics.auroc(labels, scores), 100 * roc_auc_score(labels, scores), rtol=1e-12, atol=1e-10
    )
    np.testing.assert_allclose(
        metrics.f1_max(labels, scores), _sk_f1_max(labels, scores), rtol=1e-12, atol=1e-10
    )


def test_pixel_metrics_on_maps_match_sklearn(rng):
    masks = rng.random((4, 16, 16)) < 0.1
    maps = np.round(rng.random((4, 16, 16)) + 0.5 * masks, 2).astype(np.float32)
    labels, scores = masks.ravel(), maps.ravel()
    out = metrics.evaluate(np.array([0, 1, 1, 0]), np.array([0.1, 0.2, 0.2, 0.3]), masks, maps)
    np.testing.assert_allclose(
        out["pixel_auroc"], 100 * roc_auc_score(labels, scores), rtol=1e-12, atol=1e-10
    )
    np.testing.assert_allclose(out["pixel_f1_max"], _sk_f1_max(labels, scores), rtol=1e-12)
    np.testing.assert_allclose(
        out["image_auroc"], 100 * roc_auc_score([0, 1, 1, 0], [1, 2, 2, 3]), rtol=1e-12, atol=1e-10
    )
    assert set(out) == {"image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro"}


def _slow_aupro(masks, maps, limit=0.3):
    """Threshold by threshold, region by region; exact clipped trapezoid."""
    regions = []
    for i, mask in enumerate(masks):
        lab = skimage.measure.label(mask.astype(int), connectivity=2)  # 8-connectivity
        regions += [(i, lab == k) for k in range(1, lab.max() + 1)]
    normal = ~masks.astype(bool)
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([pred[i][r].mean() for i, r in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return 100.0 * area / limit


def _hand_case(a1, a2, normals):
    """3x3 image, one 8-connected L-shaped defect region {(0,0), (1,1), (1,2)}."""
    mask = np.zeros((1, 3, 3), bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 1, 2] = True
    maps = np.zeros((1, 3, 3))
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 1, 2] = a1, a2, a2
    maps[~mask] = normals
    return mask, maps


def test_aupro_hand_cases():
    # Perfect separation: PRO is 1 from FPR 0 on.
    mask, _ = _hand_case(0, 0, 0)
    assert metrics.aupro(mask, mask.astype(float)) == pytest.approx(100.0, abs=1e-12)
    # Only (0,0) above every normal pixel: one 8-connected region of area 3
    # is 1/3 covered until FPR 1 -> 100/3. (4-connectivity would give 50.)
    mask, maps = _hand_case(1.0, 0.0, [0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    assert metrics.aupro(mask, maps) == pytest.approx(100 / 3, abs=1e-10)
    # A tie of (0,0) with the 2nd normal pixel makes a sloped step from
    # (1/6, 0) to (2/6, 1/3); 0.3 falls inside it: PRO(0.3) = (1/3) * 0.8,
    # area = 0.5 * (0.3 - 1/6) * 0.8/3, divided by 0.3 -> 160/27 %.
    mask, maps = _hand_case(0.8, 0.0, [0.95, 0.8, 0.5, 0.3, 0.2, 0.1])
    assert metrics.aupro(mask, maps) == pytest.approx(160 / 27, abs=1e-10)
    assert _slow_aupro(mask, maps) == pytest.approx(160 / 27, abs=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 20, 20), bool)
    for i in range(3):
        for _ in range(int(rng.integers(0, 4))):
            y, x = rng.integers(0, 17, 2)
            h, w = rng.integers(1, 5, 2)
            masks[i, y : y + h, x : x + w] = True
    masks[0, 1, 1] = masks[0, 2, 2] = True  # a diagonal pair: one 8-connected region
    maps = np.round(rng.random(masks.shape) + 0.4 * masks * rng.random(masks.shape), 2)
    np.testing.assert_allclose(
        metrics.aupro(masks, maps), _slow_aupro(masks, maps), rtol=1e-9, atol=1e-9
    )
    np.testing.assert_allclose(
        metrics.aupro(masks, maps, fpr_limit=1.0),
        _slow_aupro(masks, maps, limit=1.0),
        rtol=1e-9,
        atol=1e-9,
    )


def test_large_pixel_arrays_are_handled():
    """150 maps of 256x256 (10M pixels), as an MVTec category at 256 px."""
    rng = np.random.default_rng(0)
    masks = np.zeros((150, 256, 256), bool)
    masks[::2, 100:140, 60:90] = True
    maps = rng.random(masks.shape, dtype=np.float32) + 0.5 * masks
    labels = np.arange(150) % 2 == 0
    out = metrics.evaluate(labels, maps.max(axis=(1, 2)), masks, maps)
    # U(0, 1) + 0.5 against U(0, 1): AUROC = 1 - 0.5**2 / 2 = 87.5 %.
    assert out["pixel_auroc"] == pytest.approx(87.5, abs=0.1)
    assert 0.0 < out["aupro"] <= 100.0


@pytest.mark.parametrize("fn", [metrics.auroc, metrics.f1_max])
def test_single_class_raises(fn):
    with pytest.raises(ValueError, match=r"undefined: all 5 labels are normal \(0\).*both"):
        fn(np.zeros(5), np.arange(5.0))
    with pytest.raises(ValueError, match=r"all 3 labels are anomalous \(1\)"):
        fn(np.ones(3), np.arange(3.0))


def test_aupro_without_defect_raises():
    with pytest.raises(ValueError, match="AUPRO is undefined: all 8 labels are normal"):
        metrics.aupro(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))


def test_nan_scores_raise():
    scores = np.array([0.1, np.nan, 0.3, 0.4])
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\) \(1 NaN; first at flat index 1"):
        metrics.auroc(np.array([0, 1, 0, 1]), scores)
    masks = np.zeros((1, 2, 2), bool)
    masks[0, 0, 0] = True
    maps = np.full((1, 2, 2), np.inf)
    with pytest.raises(ValueError, match="AUPRO maps contain 4 non-finite"):
        metrics.aupro(masks, maps)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="labels shape"):
        metrics.auroc(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="labels must be 0/1 or bool"):
        metrics.f1_max(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="masks were given without maps"):
        metrics.evaluate(np.array([0, 1]), np.array([0.0, 1.0]), masks=np.zeros((2, 2, 2)))
