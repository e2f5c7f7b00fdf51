"""Decision thresholds on image scores: from good images only, or from labels.

A detector outputs a score per image; deploying it needs a threshold
(`score > threshold` = anomalous). Two ways to get one:

- **Normal-only** (:func:`normal_threshold`, :func:`from_support_scores`):
  only good images exist. Each support image has a held-out score in the
  deployed detector's units (`calibration.support_image_scores`: its
  quadrants, and those of nuisance views of it, scored against a bank
  without them). An image far above the others when scored against them is
  named and left out (:func:`outlying`). The threshold is an order statistic
  of the remaining `n` scores (split-conformal rank), plus an optional
  relative margin.

  What it promises, and assumes: if the score of a new good image and the
  `n` held-out scores are exchangeable (new good parts vary like the support
  images), a new good image exceeds the threshold with probability at most
  `(n + 1 - r) / (n + 1)` (`r` = the rank used; Vovk et al., "Algorithmic
  Learning in a Random World", 2005; Angelopoulos & Bates, "A Gentle
  Introduction to Conformal Prediction", 2021, Sec. 1). That is
  `false_alarm_bound`. With `k = 2` the best bound is 1/3; the requested rate
  `a` needs `n >= 1/a - 1` images. New parts that differ more than the
  support images do (lighting, pose, another batch) break the assumption:
  measure it (RESULTS.md, "Calibration that sees new parts").

  After the fact, :func:`typical_check` tests that assumption on the
  images scored (unlabelled): it warns when most of them score higher where
  they are normal than every held-out support image and view does.

- **F1-optimal** (:func:`f1_threshold`): labelled calibration images (good
  and defective) exist. The threshold maximises F1 on them; it says nothing
  about rates on other images.

Everything here is numpy on `[n]` score vectors, pure (no I/O).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

NORMAL_SOURCES = ("held_out", "leave_one_out", "augmented_views")

OUTLIER_CUTOFF = 3.5
"""Robust z-score above which a support image's held-out score is named an outlier.

The modified z-score cut-off of Iglewicz and Hoaglin ("How to Detect and
Handle Outliers", 1993): `(s_i - median) / (1.4826 MAD)` of the other scores.
"""


class Threshold(NamedTuple):
    """A decision threshold and where it came from.

    Attributes:
      value: an image is anomalous when its score is `> value`.
      kind: `"normal_only"` or `"f1"`.
      source: `"held_out"` (held-out support scores), `"calibration"` (F1),
        or, in models written by earlier versions, `"leave_one_out"` /
        `"augmented_views"`.
      num_scores: number of calibration scores used.
      rank: normal-only: the 1-based order statistic used (ascending).
      margin: normal-only: relative margin added, `value = s_(r) * (1 + margin)`
        for non-negative scores (`s_(r) + margin * |s_(r)|` in general).
      target_false_alarm_rate: normal-only: the rate asked for.
      false_alarm_bound: normal-only: `(n + 1 - r) / (n + 1)`, the promised
        bound on the false-alarm rate of good images (module docstring).
      guaranteed: whether `false_alarm_bound` is the conformal guarantee
        (leave-one-out) or only an estimate (augmented views).
      f1: F1-optimal: F1 in [0, 1] on the calibration images at `value`.
    """

    value: float
    kind: str
    source: str
    num_scores: int
    rank: int | None = None
    margin: float = 0.0
    target_false_alarm_rate: float | None = None
    false_alarm_bound: float | None = None
    guaranteed: bool = False
    f1: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return dict(self._asdict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Threshold:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        unknown = set(d) - set(cls._fields)
        if unknown:
            raise ValueError(f"unknown threshold fields {sorted(unknown)}; known: {cls._fields}")
        return cls(**d)

    def describe(self) -> str:
        """One line for logs and reports."""
        if self.kind == "f1":
            return (
                f"F1-optimal threshold {self.value:.6g} from {self.num_scores} labelled "
                f"calibration images (F1 {100 * (self.f1 or 0.0):.1f}%)"
            )
        if self.source == "held_out":
            needed = math.ceil(1.0 / self.target_false_alarm_rate - 1.0)
            return (
                f"normal-only threshold {self.value:.6g}: score {self.rank} of {self.num_scores} "
                f"held-out support image scores (ascending), margin {self.margin:g}. If new good "
                f"parts vary like these support images, at most {100 * self.false_alarm_bound:.0f}"
                f"% of them score above it; the requested "
                f"{100 * self.target_false_alarm_rate:g}% needs at least {needed} good images."
            )
        how = "if exchangeable" if self.guaranteed else "estimate only"
        return (
            f"normal-only threshold {self.value:.6g}: order statistic {self.rank}/"
            f"{self.num_scores} of {self.source.replace('_', '-')} scores, margin "
            f"{self.margin:g}; false alarms on good images <= {self.false_alarm_bound:.3f} "
            f"({how})"
        )


def _as_scores(scores: Any, what: str) -> np.ndarray:
    s = np.asarray(scores, np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D array of image scores, got {s.shape}.")
    if not np.all(np.isfinite(s)):
        raise ValueError(
            f"{what} contain non-finite values ({int(np.sum(~np.isfinite(s)))} of {s.size}); "
            "fix the detector output before deriving a threshold."
        )
    return s


def conformal_rank(num_scores: int, false_alarm_rate: float) -> tuple[int, float]:
    """Rank of the split-conformal threshold and the bound it achieves.

    Args:
      num_scores: `n` calibration scores.
      false_alarm_rate: target `a` in (0, 1).

    Returns:
      `(r, bound)`: `r = ceil((n + 1)(1 - a))` capped at `n`, and
      `bound = (n + 1 - r) / (n + 1)`: at most `a` when `n >= 1/a - 1`, else
      `1 / (n + 1)` (the best `n` scores can promise).
    """
    if num_scores < 1:
        raise ValueError(f"need at least one calibration score, got {num_scores}.")
    if not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}.")
    # The small tolerance keeps e.g. (19 + 1) * 0.95 = 19.000000000000004 at 19.
    r = min(math.ceil((num_scores + 1) * (1.0 - false_alarm_rate) - 1e-9), num_scores)
    return r, (num_scores + 1 - r) / (num_scores + 1)


def normal_threshold(
    scores: Any,
    false_alarm_rate: float = 0.05,
    margin: float = 0.0,
    source: str = "held_out",
) -> Threshold:
    """Threshold from the scores of good images only (module docstring).

    Args:
      scores: `[n]` calibration scores of good images (the support images'
        held-out scores).
      false_alarm_rate: target false-alarm rate `a`; with few scores the
        achievable bound is `1 / (n + 1)` (then the maximum score is used).
      margin: relative margin `>= 0` on top of the order statistic (more
        conservative: fewer false alarms, more misses).
      source: `"held_out"` (the bound holds if new good parts vary like the
        support images), or the earlier sources `"leave_one_out"` (the
        bound called a guarantee) or
        `"augmented_views"` (an estimate).

    Returns:
      The `Threshold` (`kind="normal_only"`).

    Raises:
      ValueError: empty or non-finite scores, a rate outside (0, 1), a
        negative margin or an unknown source.
    """
    s = np.sort(_as_scores(scores, "normal-only calibration scores"))
    if margin < 0:
        raise ValueError(f"margin must be >= 0 (it only makes the threshold safer), got {margin}.")
    if source not in NORMAL_SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {NORMAL_SOURCES}.")
    r, bound = conformal_rank(s.size, false_alarm_rate)
    base = float(s[r - 1])
    return Threshold(
        value=base + margin * abs(base),
        kind="normal_only",
        source=source,
        num_scores=int(s.size),
        rank=r,
        margin=float(margin),
        target_false_alarm_rate=float(false_alarm_rate),
        false_alarm_bound=float(bound),
        guaranteed=source == "leave_one_out",
    )


def _check_labels(labels: Any, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels shape {y.shape} != scores shape {(n,)}; one label per image.")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (good) / 1 (defective), got values {np.unique(y)}.")
    return y.astype(bool)


def f1_threshold(labels: Any, scores: Any) -> Threshold:
    """The F1-maximising threshold on labelled calibration images.

    Decisions are `score > value`. `value` lies midway between the lowest
    score flagged at the optimum and the next lower score, so it is robust to
    rounding of either.

    Args:
      labels: `[n]` 0 = good, 1 = defective (both classes needed).
      scores: `[n]` image scores.

    Returns:
      The `Threshold` (`kind="f1"`, `f1` = the F1 reached, in [0, 1]).

    Raises:
      ValueError: shape mismatch, non-binary labels, one class only, NaN/inf.
    """
    s = _as_scores(scores, "calibration scores")
    y = _check_labels(labels, s.size)
    if y.all() or not y.any():
        raise ValueError(
            "the F1-optimal threshold needs good AND defective calibration images; "
            f"got {int(y.sum())} defective of {y.size}. Add the missing kind to "
            "--calibration_dir, or use the normal-only threshold."
        )
    distinct = np.unique(s)[::-1]  # descending
    pos = int(y.sum())
    # Flag every image with score >= t for each distinct t.
    tp = np.array([np.sum(y & (s >= t)) for t in distinct])
    flagged = np.array([np.sum(s >= t) for t in distinct])
    f1 = 2.0 * tp / (flagged + pos)
    best = int(np.argmax(f1))
    lower = distinct[best + 1] if best + 1 < distinct.size else distinct[best] - 1.0
    value = 0.5 * (float(distinct[best]) + float(lower))
    return Threshold(
        value=value, kind="f1", source="calibration", num_scores=int(s.size), f1=float(f1[best])
    )


class Rates(NamedTuple):
    """Decision rates at a threshold (`score > value` = anomalous).

    Attributes:
      false_alarm_rate: flagged good images / good images (nan without any).
      miss_rate: unflagged defective images / defective images (nan without any).
      num_good: good images.
      num_defective: defective images.
      false_alarms: flagged good images.
      misses: unflagged defective images.
    """

    false_alarm_rate: float
    miss_rate: float
    num_good: int
    num_defective: int
    false_alarms: int
    misses: int


def decision_rates(labels: Any, scores: Any, threshold: float) -> Rates:
    """False-alarm and miss rates of `score > threshold` on labelled images."""
    s = _as_scores(scores, "scores")
    y = _check_labels(labels, s.size)
    flagged = s > threshold
    fa, miss = int(np.sum(flagged & ~y)), int(np.sum(~flagged & y))
    ng, nd = int(np.sum(~y)), int(np.sum(y))
    return Rates(
        false_alarm_rate=fa / ng if ng else float("nan"),
        miss_rate=miss / nd if nd else float("nan"),
        num_good=ng,
        num_defective=nd,
        false_alarms=fa,
        misses=miss,
    )


def outlying(scores: Any, cutoff: float = OUTLIER_CUTOFF) -> np.ndarray:
    """Which support images score far above the others (`[k]` bool).

    Image `i` is named when its robust z-score among the OTHER images,
    `(s_i - median(s_-i)) / spread`, exceeds `cutoff`, with `spread` the
    larger of `1.4826 MAD(s_-i)` and half the others' median magnitude. The
    floor keeps a few near-identical good images from making every small
    difference an outlier: with little spread, an image is named only when it
    scores more than `1 + cutoff / 2` (2.75) times the others' median. It
    needs two others to compare with (`k >= 3`); with fewer nothing is named.
    `fit` applies it to each image scored against the others; on the dev
    sets that named an image of another dev set added to the support folder
    in all 27 support sets tried, and 6 of 408 good images (RESULTS.md,
    "Calibration that sees new parts").

    Args:
      scores: `[k]` held-out image scores of the support images.
      cutoff: robust z-score cut-off (default `OUTLIER_CUTOFF`).

    Returns:
      `[k]` bool, True for an outlier.
    """
    s = _as_scores(scores, "support image scores")
    out = np.zeros(s.size, bool)
    if s.size < 3:
        return out
    for i in range(s.size):
        rest = np.delete(s, i)
        med = float(np.median(rest))
        spread = 1.4826 * float(np.median(np.abs(rest - med)))
        spread = max(spread, 0.5 * abs(med), 1e-12)
        out[i] = (s[i] - med) / spread > cutoff
    return out


def from_support_scores(
    scores: Any, false_alarm_rate: float = 0.05, margin: float = 0.0
) -> tuple[Threshold, np.ndarray]:
    """The normal-only threshold of a fitted detector's held-out support scores.

    Images far above the others when scored against them are named
    (`outlying` of `scores.against_others`, when there are such scores) and
    left out; the threshold is the conformal order statistic of the other
    images' `scores.held_out` (source `held_out`).

    Args:
      scores: `calibration.SupportScores` (`held_out`, `against_others`).
      false_alarm_rate: target rate of good images above the threshold.
      margin: relative margin (`normal_threshold`).

    Returns:
      `(threshold, outliers)`: the `Threshold` and the `[k]` bool outliers.
    """
    held = _as_scores(scores.held_out, "held-out support scores")
    others = scores.against_others
    outliers = np.zeros(held.size, bool) if others is None else outlying(others)
    return normal_threshold(held[~outliers], false_alarm_rate, margin, "held_out"), outliers


def augment_views(image: np.ndarray, count: int, seed: int = 0, **ranges: float) -> np.ndarray:
    """Mild random views of one image: sub-pixel shift, small rotation, gain / offset.

    Meant to mimic the variation between good photos of the same part (the
    camera and the part move a little, the light changes a little), not to
    create defects: no flips or large rotations, which industrial parts with
    a fixed pose would never show.

    Args:
      image: `[H, W, 3]` pixels in [0, 255] (uint8 or float).
      count: number of views `V`.
      seed: numpy generator seed (views are deterministic in it).
      **ranges: `max_shift` (pixels, default 6.0), `max_angle` (degrees,
        default 3.0), `max_gain` (relative contrast change, default 0.08),
        `max_offset` (grey levels, default 8.0).

    Returns:
      `[V, H, W, 3]` uint8 views; borders filled by reflection.
    """
    unknown = set(ranges) - {"max_shift", "max_angle", "max_gain", "max_offset"}
    if unknown:
        raise ValueError(f"unknown augmentation ranges {sorted(unknown)}.")
    img = np.asarray(image, np.float64)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got {img.shape}.")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")
    max_shift = ranges.get("max_shift", 6.0)
    max_angle = ranges.get("max_angle", 3.0)
    max_gain = ranges.get("max_gain", 0.08)
    max_offset = ranges.get("max_offset", 8.0)
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    center = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    views = np.empty((count, h, w, 3), np.uint8)
    for v in range(count):
        theta = np.deg2rad(rng.uniform(-max_angle, max_angle))
        shift = rng.uniform(-max_shift, max_shift, size=2)
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        # Output pixel o samples input rot @ (o - center) + center + shift.
        offset = center + shift - rot @ center
        warped = np.stack(
            [
                ndimage.affine_transform(img[..., ch], rot, offset=offset, order=1, mode="reflect")
                for ch in range(3)
            ],
            axis=-1,
        )
        gain = 1.0 + rng.uniform(-max_gain, max_gain)
        bias = rng.uniform(-max_offset, max_offset)
        views[v] = np.clip(np.round(warped * gain + bias), 0, 255).astype(np.uint8)
    return views


TYPICAL_QUANTILE = 0.1
"""Quantile of an image's patch scores that says how high it scores where it is normal.

The support check (`typical_check`) compares it between new images
and the held-out support units. A low quantile, not the median: a defect
would have to cover 90 % of the patches to move it, and the refined half
raises the scores of a defective query across the whole image (measured:
with the median, test folders of mostly defective images tripped the check
in 25 of 90 dev cell-seeds against 8 with their good images alone; RESULTS.md,
"Support check")."""

TYPICAL_LEVEL = 0.01
"""Significance level of `typical_check`'s warning (the conventional 1 %)."""


def exceedance_p_value(above: int, scored: int, references: int) -> float:
    """P(at least `above` of `scored` draws exceed the largest of `references` draws).

    All `scored + references` draws exchangeable and continuous (no ties).
    With `U` the largest reference's quantile (density `N u^(N-1)`), the
    count above it is Binomial(`n`, `1 - U`), so

        P(E = j) = C(n, j) N B(j + 1, n - j + N)

    (a Beta-Binomial law); the p-value sums it over `j >= above`. Computed
    in log space (no overflow at thousands of images).

    Args:
      above: observed count `e`, `0 <= e <= n`.
      scored: number of draws `n >= 0`.
      references: number of reference draws `N >= 1`.

    Returns:
      The p-value in [0, 1] (1.0 for `above = 0`).
    """
    if references < 1 or scored < 0 or not 0 <= above <= scored:
        raise ValueError(
            f"need references >= 1 and 0 <= above <= scored, got above={above}, "
            f"scored={scored}, references={references}."
        )
    if above == 0:
        return 1.0
    n, big_n = scored, references
    logs = [
        math.lgamma(n + 1)
        - math.lgamma(n - j + 1)
        + math.log(big_n)
        + math.lgamma(n - j + big_n)
        - math.lgamma(n + big_n + 1)
        for j in range(above, n + 1)
    ]  # C(n, j) B(j + 1, n - j + N) with the Gamma(j + 1) terms cancelled
    top = max(logs)
    return float(min(1.0, math.exp(top) * sum(math.exp(x - top) for x in logs)))


class TypicalCheck(NamedTuple):
    """Whether the images scored vary like the support images (`typical_check`).

    Attributes:
      scored: images scored `n`.
      above: how many of them have a typical score above `support_max`.
      references: held-out support units (images and views) `N`.
      support_max: the largest typical score of a held-out support unit.
      median: the median typical score of the images scored.
      p_value: `exceedance_p_value(above, scored, references)`.
      level: the warning's significance level.
    """

    scored: int
    above: int
    references: int
    support_max: float
    median: float
    p_value: float
    level: float = TYPICAL_LEVEL

    @property
    def warns(self) -> bool:
        """The median image is above every support unit, and that is not chance (`p < level`)."""
        return self.median > self.support_max and self.p_value < self.level

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, `warns` included."""
        return {**self._asdict(), "warns": self.warns}

    def describe(self) -> str:
        """One plain paragraph: what was seen, what it means, and the fix when it warns."""
        expected = self.scored / (self.references + 1)
        seen = (
            f"{self.above} of {self.scored} images have a typical score (the "
            f"{100 * TYPICAL_QUANTILE:g}th percentile of the image's patch scores: where it is "
            f"normal) above every one of the "
            f"{self.references} held-out support images and views (at most "
            f"{self.support_max:.3g}; median of the images scored {self.median:.3g}); if new "
            f"good parts varied like the support images, about {expected:.1f} would be "
            f"(p = {self.p_value:.2g})"
        )
        if not self.warns:
            return f"support check: {seen}. No sign that these images differ more."
        return (
            f"warning: these images differ from the support images more than the support "
            f"images differ among themselves: {seen}. The threshold's promise assumes new good "
            "parts vary like the support images, so it may not hold here: more good parts may "
            "be flagged than it states (unless most of these images are defective, which also "
            "raises their typical score). Fix: fit on good images from across the production "
            "(other batches, days, lighting), or predict with --calibrate_on_stream."
        )


def typical_check(support_typical: Any, scored_typical: Any, level: float = TYPICAL_LEVEL):
    """Tests, without labels, whether the images scored vary like the support images.

    Each image's typical score is a low quantile of its patch scores in the
    deployed units (`TYPICAL_QUANTILE`, the 10th percentile):
    most patches of a good or a defective image are normal, so it says how
    high the image scores where it is normal. The reference is the same
    quantile for each held-out support image and view
    (`calibration.SupportScores.typical`, the units the threshold comes
    from). If the images scored were exchangeable with those units, the
    number above the largest unit would follow `exceedance_p_value`. The
    check warns when the MEDIAN image is above every unit (robust while most
    images scored are good; a folder of mostly defective images can still
    trip it) and the count is unlikely by chance (`p < level`): one image
    alone warns only with at least `1 / level - 1` units (99), two need all
    of them above every unit. Decided from the support units and the images
    alone: no constant tuned on a data set (RESULTS.md, "Support check").

    Args:
      support_typical: `[N]` (any shape; flattened) typical scores of the
        held-out support units.
      scored_typical: `[n]` typical scores of the images scored, `n >= 1`.
      level: significance level of the warning (default 1 %).

    Returns:
      `TypicalCheck`.
    """
    ref = np.asarray(support_typical, np.float64).reshape(-1)
    got = np.asarray(scored_typical, np.float64).reshape(-1)
    if ref.size == 0 or not np.all(np.isfinite(ref)):
        raise ValueError("the support units' typical scores must be a non-empty, finite array.")
    if got.size == 0 or not np.all(np.isfinite(got)):
        raise ValueError("the scored images' typical scores must be a non-empty, finite array.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    top = float(ref.max())
    above = int(np.sum(got > top))
    return TypicalCheck(
        scored=int(got.size),
        above=above,
        references=int(ref.size),
        support_max=top,
        median=float(np.median(got)),
        p_value=exceedance_p_value(above, int(got.size), int(ref.size)),
        level=float(level),
    )
