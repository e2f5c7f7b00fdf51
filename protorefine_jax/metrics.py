"""Anomaly-detection metrics in percent (numpy on host, pure functions).

Image AUROC / F1-max (paper Table 1), pixel AUROC / F1-max and AUPRO up to
FPR 0.3 (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021).

All curves come from one descending sort of the score values with tied
scores collapsed to one threshold, so ties are handled exactly as
scikit-learn's `roc_auc_score` and `precision_recall_curve` handle them, in
O(N log N) time and O(N) memory; the positives (defect pixels) are counted at
each threshold by a binary search in their own sorted scores, so no `argsort`
of all pixels is needed. `evaluate` sorts the pixels once for all three pixel
metrics.

Definitions:

- AUROC: trapezoidal area under (FPR, TPR) over all distinct thresholds.
- F1-max: `max_t 2 TP / (TP + FP + P)` over thresholds `score >= t` (equal to
  `2 PR / (P + R)`), the maximum over sklearn's precision-recall curve.
- AUPRO: regions are the 8-connected components of each GT mask
  (`scipy.ndimage.label` with a 3x3 structure, as the official MVTec code).
  For a threshold, PRO is the mean over ALL regions of all images of the
  fraction of the region's pixels above threshold; FPR is computed over the
  normal pixels of all images. PRO is integrated over FPR in [0, 0.3] by the
  trapezoid rule, interpolating linearly at 0.3, then divided by 0.3.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.ndimage

AUPRO_FPR_LIMIT = 0.3
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


class _Curve(NamedTuple):
    fps: np.ndarray  # [D] false positives with score >= each distinct threshold
    tps: np.ndarray  # [D] true positives, same thresholds (descending)
    num_pos: int
    num_neg: int


def _check_scores(scores: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(scores)
    if bad.any():
        n_nan = int(np.isnan(scores).sum())
        first = int(np.flatnonzero(bad.ravel())[0])
        raise ValueError(
            f"{what} contain {int(bad.sum())} non-finite value(s) ({n_nan} NaN; first at "
            f"flat index {first}). Metrics are undefined on NaN/inf: fix the detector "
            "output (e.g. a singular solve or log of zero) before evaluating."
        )


def _check_labels(labels: np.ndarray, scores: np.ndarray, what: str) -> tuple[int, int]:
    if labels.shape != scores.shape:
        raise ValueError(
            f"{what}: labels shape {labels.shape} != scores shape {scores.shape}; pass one "
            "label per score (masks [N, H, W] with maps [N, H, W])."
        )
    if labels.dtype != bool and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{what}: labels must be 0/1 or bool, got values {np.unique(labels)}.")
    num_pos = int(np.count_nonzero(labels))
    num_neg = labels.size - num_pos
    if num_pos == 0 or num_neg == 0:
        present = "anomalous (1)" if num_neg == 0 else "normal (0)"
        raise ValueError(
            f"{what} is undefined: all {labels.size} labels are {present}. It needs both "
            "normal and anomalous samples; evaluate on a test set with good AND defective "
            "images (for pixel metrics: at least one defect pixel in the masks)."
        )
    return num_pos, num_neg


class _Sorted(NamedTuple):
    thresholds: np.ndarray  # [D] the distinct scores, descending
    at_or_above: np.ndarray  # [D] how many scores are >= each threshold


def _sort_desc(scores: np.ndarray) -> _Sorted:
    """The distinct thresholds of flat scores and their counts; shared by the pixel metrics.

    Only the values are sorted (no `argsort` of all pixels: 16x slower for
    6.4M float32 here); the positives are counted per threshold by
    `_first_at_or_above` in their own sorted scores. Tied scores collapse to
    one threshold, so the curves do not depend on any order within ties.
    """
    desc = np.sort(scores)[::-1]
    ends = np.append(np.flatnonzero(desc[1:] != desc[:-1]), scores.size - 1)
    return _Sorted(thresholds=desc[ends], at_or_above=ends + 1)


def _first_at_or_above(ascending: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold, the index of the first entry of `ascending` that is >= it."""
    return np.searchsorted(ascending, thresholds, side="left")


def _curve(labels, scores, what: str, srt: _Sorted | None = None) -> _Curve:
    """Cumulative FP/TP counts at each distinct score, highest first."""
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores).ravel()
    num_pos, num_neg = _check_labels(labels, scores, what)
    _check_scores(scores, what + " scores")
    srt = _sort_desc(scores) if srt is None else srt
    positives = np.sort(scores[labels.astype(bool)])
    tps = num_pos - _first_at_or_above(positives, srt.thresholds)
    return _Curve(fps=srt.at_or_above - tps, tps=tps, num_pos=num_pos, num_neg=num_neg)


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    # np.trapezoid needs numpy>=2 (pyproject allows 1.26) and np.trapz is deprecated there.
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) * 0.5)


def _auroc(c: _Curve) -> float:
    fpr = np.concatenate([[0.0], c.fps / c.num_neg])
    tpr = np.concatenate([[0.0], c.tps / c.num_pos])
    return _trapezoid(tpr, fpr) * 100.0


def _f1_max(c: _Curve) -> float:
    return float(np.max(2.0 * c.tps / (c.tps + c.fps + c.num_pos))) * 100.0


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve in percent (any shape; flattened).

    Args:
      labels: `[...]` 0/1 or bool, 1 = anomalous.
      scores: `[...]` float, higher = more anomalous.

    Returns:
      AUROC in [0, 100].

    Raises:
      ValueError: shape mismatch, non-binary labels, one class only, NaN/inf.
    """
    return _auroc(_curve(labels, scores, "AUROC"))


class PairedAuroc(NamedTuple):
    """Two scorers' AUROC on the same samples and DeLong's test of their difference."""

    first: float  # AUROC in percent
    second: float
    z: float  # (first - second) / its standard error; 0 where the error is 0


def paired_auroc(labels: np.ndarray, first: np.ndarray, second: np.ndarray) -> PairedAuroc:
    """AUROC of two scores of the same samples and DeLong's z of their difference.

    DeLong, DeLong & Clarke-Pearson (1988): each AUROC is the mean of the
    placement values `V10_i` (share of negatives a positive beats, ties
    half) and `V01_j` (share of positives a negative loses to); the
    variance of the difference comes from the covariances of those
    placements across positives and across negatives. O(P N) memory: for
    the small sample sizes of fit-time checks.

    Args:
      labels: `[n]` 0/1, both classes present.
      first: `[n]` scores, higher = more anomalous.
      second: `[n]` scores of the same samples.

    Returns:
      `PairedAuroc(first, second, z)`; `z > 0` when `first` separates better.
    """
    labels = np.asarray(labels).reshape(-1)
    scores = [np.asarray(x, np.float64).reshape(-1) for x in (first, second)]
    for x, what in zip(scores, ("first", "second"), strict=True):
        _check_labels(labels, x, what)
    pos, neg = labels == 1, labels == 0
    v10, v01 = [], []
    for x in scores:
        psi = (x[pos][:, None] > x[neg][None, :]) + 0.5 * (x[pos][:, None] == x[neg][None, :])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    a, b = float(np.mean(v10[0])), float(np.mean(v10[1]))

    def var_of_difference(v: list[np.ndarray]) -> float:
        if len(v[0]) < 2:
            return 0.0
        c = np.cov(np.stack(v))
        return float(c[0, 0] + c[1, 1] - 2 * c[0, 1]) / len(v[0])

    var = var_of_difference(v10) + var_of_difference(v01)
    z = (a - b) / np.sqrt(var) if var > 1e-18 else 0.0
    return PairedAuroc(100.0 * a, 100.0 * b, float(z))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over all thresholds, in percent (any shape; flattened).

    Args:
      labels: `[...]` 0/1 or bool, 1 = anomalous.
      scores: `[...]` float, higher = more anomalous.

    Returns:
      F1-max in [0, 100].

    Raises:
      ValueError: shape mismatch, non-binary labels, one class only, NaN/inf.
    """
    return _f1_max(_curve(labels, scores, "F1-max"))


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [x0, x_max], x sorted ascending."""
    ins = int(np.searchsorted(x, x_max, side="right"))  # x[:ins] <= x_max
    area = _trapezoid(y[:ins], x[:ins])
    if ins < x.size and x[ins - 1] < x_max:
        x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """Normalised area under the per-region-overlap curve up to `fpr_limit`, in percent.

    Args:
      masks: `[N, H, W]` 0/1 or bool ground truth.
      maps: `[N, H, W]` float anomaly maps.
      fpr_limit: upper FPR of the integral (0.3 standard); area / fpr_limit.

    Returns:
      AUPRO in [0, 100].

    Raises:
      ValueError: shape mismatch, no defect region, no normal pixel, NaN/inf.
    """
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    _check_aupro_inputs(masks, maps, fpr_limit)
    _check_labels(masks, maps, "AUPRO")
    _check_scores(maps, "AUPRO maps")
    return _aupro(masks, maps.ravel(), _sort_desc(maps.ravel()), fpr_limit)


def _check_aupro_inputs(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> None:
    if masks.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(
            f"AUPRO needs masks and maps of the same shape [N, H, W], got {masks.shape} "
            f"and {maps.shape}."
        )
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}.")


def _aupro(masks: np.ndarray, flat_maps: np.ndarray, srt: _Sorted, fpr_limit: float) -> float:
    """AUPRO of validated `masks: [N, H, W]` given the flat maps and their thresholds."""
    # Per defect pixel: its contribution to the summed region overlaps (1 / region area).
    region_weight = np.zeros(masks.shape, np.float64)
    num_regions = 0
    for i, mask in enumerate(masks):
        labelled, n = scipy.ndimage.label(mask, structure=_EIGHT_CONNECTED)
        if n:
            areas = np.bincount(labelled.ravel(), minlength=n + 1).astype(np.float64)
            inv = np.concatenate([[0.0], 1.0 / areas[1:]])
            region_weight[i] = inv[labelled]
        num_regions += n
    defect = masks.ravel().astype(bool)
    num_normal = defect.size - int(defect.sum())
    # The defect pixels alone, ascending by score: those at or above a threshold
    # are a suffix, their summed weights a suffix sum (accumulated from the
    # highest score down, as the curve runs).
    scores = flat_maps[defect]
    order = np.argsort(scores)
    scores, weights = scores[order], region_weight.ravel()[defect][order]
    del region_weight
    suffix = np.append(np.cumsum(weights[::-1])[::-1], 0.0)
    first = _first_at_or_above(scores, srt.thresholds)
    fpr = (srt.at_or_above - (scores.size - first)) / num_normal
    pro = suffix[first] / num_regions
    # Cumulative sums of 1/area drift by ~1e-16 per step: clip so PRO ends at 1.
    fpr = np.concatenate([[0.0], np.minimum(fpr, 1.0)])
    pro = np.concatenate([[0.0], np.minimum(pro, 1.0)])
    return _trapezoid_to(fpr, pro, fpr_limit) / fpr_limit * 100.0


def evaluate(
    image_labels: np.ndarray,
    image_scores: np.ndarray,
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics of the protocol (image / pixel AUROC, F1-max, AUPRO), in percent.

    Args:
      image_labels: `[N]` 0/1, 1 = anomalous image.
      image_scores: `[N]` float image scores.
      masks: `[N, H, W]` bool ground truth, or None to skip pixel metrics.
      maps: `[N, H, W]` float anomaly maps (required with `masks`).

    Returns:
      `{"image_auroc", "image_f1_max"}` plus, with masks,
      `{"pixel_auroc", "pixel_f1_max", "aupro"}`.

    Raises:
      ValueError: see :func:`auroc` and :func:`aupro`.
    """
    img = _curve(image_labels, image_scores, "image AUROC / F1-max")
    out = {"image_auroc": _auroc(img), "image_f1_max": _f1_max(img)}
    if masks is None:
        return out
    if maps is None:
        raise ValueError("evaluate: masks were given without maps; pass both or neither.")
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    _check_aupro_inputs(masks, maps, AUPRO_FPR_LIMIT)
    _check_scores(maps, "pixel maps")  # before sorting: NaN would sort arbitrarily
    srt = _sort_desc(maps.ravel())  # one sort of all pixels serves all pixel metrics
    pix = _curve(masks, maps, "pixel AUROC / F1-max", srt)
    out["pixel_auroc"] = _auroc(pix)
    out["pixel_f1_max"] = _f1_max(pix)
    out["aupro"] = _aupro(masks, maps.ravel(), srt, AUPRO_FPR_LIMIT)
    return out


def evaluate_known_masks(
    image_labels: np.ndarray,
    image_scores: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    mask_known: np.ndarray,
) -> dict[str, float | int | str | None]:
    """`evaluate` when some defective images have no ground-truth mask.

    Image metrics use every image. Pixel metrics use the images whose mask is
    known: every good image (its mask is empty by definition) and the
    defective images that have a mask file. Without any such defective
    image, the pixel metrics are None and `pixel_note` says why.

    Args:
      image_labels: `[N]` 0/1.
      image_scores: `[N]`.
      masks: `[N, H, W]` bool (anything for images whose mask is unknown).
      maps: `[N, H, W]` anomaly maps.
      mask_known: `[N]` bool, True where `masks` holds the ground truth.

    Returns:
      The metrics of `evaluate` (pixel ones None without masks) plus
      `pixel_images` (images the pixel metrics used), `defective_with_mask`,
      `defective_images` and `pixel_note` (None when every mask is known).
    """
    labels = np.asarray(image_labels)
    known = np.asarray(mask_known, bool)
    if known.shape != labels.shape:
        raise ValueError(f"mask_known shape {known.shape} != labels shape {labels.shape}.")
    if np.any(~known & (labels == 0)):
        raise ValueError("mask_known is False for a good image; good images have empty masks.")
    out: dict[str, float | int | str | None] = dict(evaluate(labels, image_scores))
    defective = int(np.sum(labels == 1))
    with_mask = int(np.sum(known & (labels == 1)))
    out.update(defective_images=defective, defective_with_mask=with_mask)
    if with_mask == 0:
        out.update(pixel_auroc=None, pixel_f1_max=None, aupro=None, pixel_images=0)
        out["pixel_note"] = (
            f"no defective image has a mask ({defective} without): pixel metrics need masks"
        )
        return out
    idx = np.flatnonzero(known)
    pixel = evaluate(labels[idx], np.asarray(image_scores)[idx], masks[idx], maps[idx])
    out.update({k: pixel[k] for k in ("pixel_auroc", "pixel_f1_max", "aupro")})
    out["pixel_images"] = int(idx.size)
    out["pixel_note"] = (
        None
        if with_mask == defective
        else f"pixel metrics over the {idx.size} images with known masks: {with_mask} of "
        f"{defective} defective images (the others have no mask) and every good image"
    )
    return out
