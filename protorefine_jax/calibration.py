"""Support-set calibration of PatchCore+: host and refined scores fused per patch.

The refined score (distance to the refined prototypes `R = W M`) and the
host score (distance to the nearest bank prototype) flag different patches:
the refined one what the bank cannot reconstruct, the host one what lies far
from every prototype. Which is better depends on the data (docs/method.md,
"Scoring"), and nothing in a few normal images says which. So PatchCore+
keeps both: each is standardised by its own distribution on HELD-OUT SUPPORT
patches (robust z-score: median and interquartile range, the standard
location and scale of skewed scores), and a patch scores the larger of the
two,

    s_j = max((h_j - med_h) / iqr_h, (r_j - med_r) / iqr_r).

A refinement that adds nothing then costs little, and one that helps keeps
most of its gain.

Held-out patches (`holdout_splits`): each quadrant of each support image is
scored against a bank built, by the same coreset, from every other support
patch (the other quadrants of its image and all other images). This exists
at 1 shot, uses the support images only, and is the same rule at every shot
count. The held-out queries are refined under the ridge the real
bank uses (`ridge_wide` iff the real bank has `n >= c`), so calibration and
scoring see the same regime.

Each support image also gets a held-out IMAGE score in the units of the
deployed detector (`support_image_scores`): the largest score of its
quadrant hold-outs, over the original and `VIEWS` nuisance views of it
(`nuisance_views`: a small shift and rotation, a gain and offset of the grey
levels, standing in for the next good part differing from this one by pose
and light). With three or more images, each whole image is also scored
against a bank of the other images (`cross_image_units`): how unlike the
others it is, which names stray images (`threshold.outlying`); those scores
do not set the threshold (measured: it became more conservative than it
promises). A
decision threshold derived from these compares like with like: they are
scores of the deployed calibration, not of detectors refitted on fewer
images.

Everything here is pure: numpy/JAX arrays in, arrays out; no I/O.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from protorefine_jax import checks, gram
from protorefine_jax.config import RefineConfig
from protorefine_jax.coreset import coreset_size, greedy_coreset
from protorefine_jax.gram import gram_system, matmul_precision
from protorefine_jax.refine import refine
from protorefine_jax.scoring import base_patch_scores, refined_patch_scores
from protorefine_jax.threshold import augment_views

_TINY = 1e-12

VIEWS = 4
"""Nuisance views per support image in the support scores' hold-outs (0: originals only)."""


class ScoreCalibration(NamedTuple):
    """Location and scale of the host and refined patch scores on held-out support patches.

    A pytree of float32 scalars (traced under jit: a new category never
    recompiles).

    Attributes:
      host_loc: median host score of the held-out patches.
      host_scale: their interquartile range (floored, never 0).
      refined_loc: median refined score of the held-out patches.
      refined_scale: their interquartile range (floored, never 0).
    """

    host_loc: Float[Array, ""]
    host_scale: Float[Array, ""]
    refined_loc: Float[Array, ""]
    refined_scale: Float[Array, ""]


def fuse(
    host: Float[Array, "*m"], refined: Float[Array, "*m"], calibration: ScoreCalibration
) -> Float[Array, "*m"]:
    """`max` of the standardised host and refined patch scores (robust z-scores).

    Args:
      host: host patch scores (distance to the nearest prototype).
      refined: refined patch scores, same shape.
      calibration: their held-out support statistics.

    Returns:
      The fused patch scores, in held-out interquartile ranges.
    """
    return jnp.maximum(*standardise(host, refined, calibration))


def standardise(host, refined, calibration: ScoreCalibration):
    """`(z_host, z_refined)`: each half in held-out interquartile ranges from its median."""
    z_host = (host - calibration.host_loc) / calibration.host_scale
    z_refined = (refined - calibration.refined_loc) / calibration.refined_scale
    return z_host, z_refined


def in_host_units(fused: Float[Array, "*m"], calibration: ScoreCalibration) -> Float[Array, "*m"]:
    """`fuse`'s scores mapped back to the host's units: `loc_h + iqr_h * fused`.

    An increasing affine map, so it ranks patches as `fuse` does; it equals
    `max(h, loc_h + iqr_h * (r - loc_r) / iqr_r)`, at least the host score
    `h`. WinCLIP+ uses it (`clip.winclip.few_shot_query`): its scales are
    averaged and fused with the zero-shot probabilities in the host's
    distance units, and its window scores pass through a harmonic mean that
    needs them positive. Rounding below 0 (a host score of exactly 0) is
    clipped, as the distances themselves are (`scoring`).

    Args:
      fused: `fuse` output (robust z-scores).
      calibration: the statistics `fuse` used.

    Returns:
      The fused scores in the host score's units, `>= 0`.
    """
    return jnp.maximum(calibration.host_loc + calibration.host_scale * fused, 0.0)


# Settings that only render maps or switch the fusion on and off: a calibration
# measured under one value of these serves every other.
_NOT_CALIBRATED = ("image_size", "blur_sigma", "calibrated", "use_refinement", "grid_shape")


def config_differences(measured: RefineConfig, scoring: RefineConfig) -> list[str]:
    """The refinement settings in which `scoring` differs from the calibration's.

    A calibration holds the statistics of scores computed under one refinement
    (`measured`); fusing scores computed under another (`scoring`) mixes
    units. Map rendering (`image_size`, `blur_sigma`) and the switches
    `calibrated` / `use_refinement` do not change the patch scores. Traced
    values (inside the caller's `jit`) cannot be compared and are skipped.

    Returns:
      One `"name: measured -> scoring"` entry per differing field (empty: the
      calibration applies).
    """
    out = []
    for field in dataclasses.fields(RefineConfig):
        name = field.name
        if name in _NOT_CALIBRATED:
            continue
        a, b = getattr(measured, name), getattr(scoring, name)
        if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
            continue
        if not bool(np.asarray(a == b)):
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def check_applies(measured: RefineConfig | None, scoring: RefineConfig) -> None:
    """Raises when a calibration measured under `measured` cannot fuse `scoring`'s scores.

    Raises:
      ValueError: naming each differing setting and the two ways out.
    """
    if measured is None:
        return
    diff = config_differences(measured, scoring)
    if diff:
        raise ValueError(
            "the state's calibration was measured under other refinement settings ("
            + "; ".join(diff)
            + "): recalibrate with these settings (fit or fit_features with config=...), "
            "or score with the settings of the fit."
        )


def holdout_splits(k: int, grid_shape: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(bank rows, query rows) of every hold-out: each quadrant of each support image.

    Args:
      k: support images.
      grid_shape: patch grid `(h, w)` of one image (`h, w >= 2`).

    Returns:
      `4 k` pairs of int arrays indexing the `[k * m]` stacked support
      patches: the bank's rows (everything outside the quadrant) and the
      held-out quadrant's rows.
    """
    h, w = grid_shape
    if h < 2 or w < 2:
        raise ValueError(
            f"calibration holds out grid quadrants and needs a grid of at least 2 x 2 "
            f"patches, got {grid_shape}; use larger images or calibration=False."
        )
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    quadrant = ((rows >= h // 2).astype(int) * 2 + (cols >= w // 2).astype(int)).ravel()
    m = h * w
    everything = np.arange(k * m)
    splits = []
    for i in range(k):
        for q in range(4):
            held = i * m + np.flatnonzero(quadrant == q)
            splits.append((np.setdiff1d(everything, held), held))
    return splits


@jax.jit
def _host_and_refined(banks, queries, config: RefineConfig):
    """Host and refined patch scores of `[S, V, m', c]` queries: `V` per bank of `[S]`."""

    def one(bank, query):
        with matmul_precision(config):
            system = gram_system(bank, query, config)
            ref = refine(system, config)
            refined = refined_patch_scores(system, ref.w, config, ref.refined_sq)
            return base_patch_scores(system, config), refined

    return jax.vmap(jax.vmap(one, in_axes=(None, 0)))(banks, queries)


def _holdout_config(rows: int, feature_dim: int, alpha: float, config: RefineConfig):
    """The refinement hold-outs run: the real bank's ridge (a coreset of `rows` rows), raw grids."""
    cfg = ridge_in_force(coreset_size(rows, alpha), feature_dim, config)
    return cfg.replace(use_refinement=True, image_size=None, grid_shape=None)


def ridge_in_force(bank_rows: int, feature_dim: int, config: RefineConfig) -> RefineConfig:
    """`config` with both ridges set to the one a bank of `bank_rows` rows uses."""
    rel = gram.ridge_in_force(config, bank_rows, feature_dim)  # the one ridge rule
    return config.replace(ridge=rel, ridge_wide=rel)


def holdouts(
    support: Float[Array, "k m c"],
    alpha: float,
    grid_shape: tuple[int, int],
    views: Float[Array, "k v m c"] | None = None,
) -> tuple[list, list]:
    """The bank and the held-out queries of every hold-out (`holdout_splits`).

    Args:
      support: `[k, m, c]` support patch features (checked: shape, finite).
      alpha: coreset ratio of the real bank (each hold-out bank uses it too).
      grid_shape: patch grid of one image.
      views: optional `[k, V, m, c]` features of `V` nuisance views of each
        support image (`nuisance_views`). The held-out quadrant of a view is
        scored against the same bank as the quadrant of its original: what a
        new part that differs by that nuisance would score.

    Returns:
      `(banks, queries)`: per hold-out the coreset of every other support
      patch and the held-out quadrant's `[1 + V, m', c]` patches (the
      original's first, then its views').
    """
    support = jnp.asarray(support)
    if support.ndim != 3:
        raise ValueError(
            f"support must be [k, m, c] patch features of k images, got shape {support.shape}."
        )
    k, m, c = support.shape
    if grid_shape[0] * grid_shape[1] != m:
        raise ValueError(f"grid_shape {grid_shape} does not hold m={m} patches per image.")
    checks.check_finite(support, "support")
    sources = support[:, None]
    if views is not None:
        views = jnp.asarray(views)
        if views.ndim != 4 or views.shape[0] != k or views.shape[2:] != (m, c):
            raise ValueError(
                f"views must be [k, V, m, c] = [{k}, V, {m}, {c}] features of the support "
                f"images' views, got shape {tuple(views.shape)}."
            )
        checks.check_finite(views, "views")
        sources = jnp.concatenate([sources, views], axis=1)
    flat = support.reshape(k * m, c)
    banks, queries = [], []
    for bank_rows, held in holdout_splits(k, tuple(grid_shape)):
        rest = flat[bank_rows]
        banks.append(rest[greedy_coreset(rest, alpha)])
        image = int(held[0]) // m
        queries.append(sources[image][:, held - image * m])
    return banks, queries


def held_out_units(
    support: Float[Array, "k m c"],
    alpha: float,
    config: RefineConfig,
    grid_shape: tuple[int, int],
    views: Float[Array, "k v m c"] | None = None,
    prepared: tuple[list, list] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Host and refined scores of every held-out patch, per support image and view.

    Args:
      support: `[k, m, c]` support patch features.
      alpha: coreset ratio of the real bank (each hold-out bank uses it too).
      config: the scoring config (its refinement settings are used).
      grid_shape: patch grid of one image.
      views: optional `[k, V, m, c]` nuisance-view features (`holdouts`).
      prepared: `holdouts(support, alpha, grid_shape, views)` if the caller
        already built them (to score one support set under several configs).

    Returns:
      `(host, refined)`, each `[k, 1 + V, m]` float64: image `i`, view `v`
      (0 = the original), its patches quadrant by quadrant.
    """
    banks, queries = prepared or holdouts(support, alpha, grid_shape, views)
    k, m, c = jnp.shape(support)
    cfg = _holdout_config(k * m, c, alpha, config)
    # Quadrants of an even grid share one shape: all hold-outs in one vmapped
    # call; an odd grid's quadrants differ, and each is scored alone.
    groups: dict[tuple, list[int]] = {}
    for i, (b, q) in enumerate(zip(banks, queries, strict=True)):
        groups.setdefault((b.shape, q.shape), []).append(i)
    hosts: list = [None] * len(banks)
    refs: list = [None] * len(banks)
    for members in groups.values():
        h, r = _host_and_refined(
            jnp.stack([banks[i] for i in members]), jnp.stack([queries[i] for i in members]), cfg
        )
        for j, i in enumerate(members):
            hosts[i], refs[i] = np.asarray(h[j], np.float64), np.asarray(r[j], np.float64)
    per_image = len(banks) // k  # the four quadrants of each image, in hold-out order
    host = np.stack(
        [np.concatenate(hosts[i * per_image : (i + 1) * per_image], -1) for i in range(k)]
    )
    refined = np.stack(
        [np.concatenate(refs[i * per_image : (i + 1) * per_image], -1) for i in range(k)]
    )
    return host, refined


def held_out_scores(
    support: Float[Array, "k m c"],
    alpha: float,
    config: RefineConfig,
    grid_shape: tuple[int, int],
    prepared: tuple[list, list] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Host and refined scores of every held-out support patch, originals only.

    Returns:
      `(host, refined)`, each `[k * m]` float64 in hold-out order
      (`held_out_units` of the originals, flattened).
    """
    host, refined = held_out_units(support, alpha, config, grid_shape, prepared=prepared)
    return host[:, 0].reshape(-1), refined[:, 0].reshape(-1)


def nuisance_views(images: np.ndarray, count: int = VIEWS) -> np.ndarray:
    """`count` nuisance views of each support image (`threshold.augment_views`).

    Each image's views are seeded by a checksum of its pixels, so an image
    gets the same views whatever its position in the support set and
    whichever tool fits the detector.

    Args:
      images: `[k, H, W, 3]` support images in [0, 255].
      count: views per image, >= 1.

    Returns:
      `[k, count, H, W, 3]` uint8.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [k, H, W, 3], got shape {images.shape}.")
    seeds = [zlib.crc32(np.ascontiguousarray(im).tobytes()) for im in images]
    return np.stack(
        [augment_views(im, count, seed) for im, seed in zip(images, seeds, strict=True)]
    )


def cross_image_units(
    support: Float[Array, "k m c"],
    alpha: float,
    config: RefineConfig,
    views: Float[Array, "k v m c"] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Host and refined scores of each whole support image against a bank of the others.

    The hold-out of a new part: image `i` (and its views) against the coreset
    of the other `k - 1` images, refined under the real bank's ridge.

    Args:
      support: `[k, m, c]` support patch features, `k >= 2`.
      alpha: coreset ratio of the real bank.
      config: the scoring config (its refinement settings are used).
      views: optional `[k, V, m, c]` nuisance-view features.

    Returns:
      `(host, refined)`, each `[k, 1 + V, m]` float64.
    """
    support = np.asarray(support)
    k, m, c = support.shape
    if k < 2:
        raise ValueError(f"cross-image hold-outs need at least 2 support images, got {k}.")
    sources = (
        support[:, None]
        if views is None
        else np.concatenate([support[:, None], np.asarray(views)], axis=1)
    )
    cfg = _holdout_config(k * m, c, alpha, config)
    hosts, refs = [], []
    for i in range(k):
        rest = np.delete(support, i, axis=0).reshape(-1, c)
        bank = jnp.asarray(rest[np.asarray(greedy_coreset(jnp.asarray(rest), alpha))])
        h, r = _host_and_refined(bank[None], jnp.asarray(sources[i])[None], cfg)
        hosts.append(np.asarray(h[0], np.float64))
        refs.append(np.asarray(r[0], np.float64))
    return np.stack(hosts), np.stack(refs)


class HeldOut(NamedTuple):
    """Held-out support scores: `[k, 1 + V, m]` per kind (image, view, patch).

    Attributes:
      host, refined: quadrant hold-outs (`held_out_units`).
      cross_host, cross_refined: cross-image hold-outs (`cross_image_units`);
        None with one support image.
    """

    host: np.ndarray
    refined: np.ndarray
    cross_host: np.ndarray | None = None
    cross_refined: np.ndarray | None = None


def held_out(
    support: Float[Array, "k m c"],
    alpha: float,
    config: RefineConfig,
    grid_shape: tuple[int, int],
    views: Float[Array, "k v m c"] | None = None,
    cross: bool = False,
) -> HeldOut:
    """Quadrant hold-outs (originals and views) and, with `cross` and `k >= 2`, whole images."""
    host, refined = held_out_units(support, alpha, config, grid_shape, views)
    if not cross or np.shape(support)[0] < 2:
        return HeldOut(host, refined)
    return HeldOut(host, refined, *cross_image_units(support, alpha, config))


class SupportScores(NamedTuple):
    """Held-out image scores of the support images, in the deployed detector's units.

    Attributes:
      held_out: `[k]` the largest image score of each image's quadrant
        hold-outs, original and nuisance views: what a normal-only threshold
        is derived from.
      against_others: `[k]` each whole image scored against a bank of the
        other images (None without cross-image hold-outs): how unlike the
        others an image is, for naming outliers.
      host_patches, refined_patches: `[k m]` the raw host and refined scores
        of the originals' held-out patches (what the calibration's statistics
        are of; the starting pool of `stream_calibration`).
    """

    held_out: np.ndarray
    against_others: np.ndarray | None = None
    host_patches: np.ndarray | None = None
    refined_patches: np.ndarray | None = None


def support_image_scores(
    held: HeldOut, config: RefineConfig, calibration: ScoreCalibration | None
) -> SupportScores:
    """Each support image's held-out image scores in the deployed detector's units.

    The image score is the scoring's (`max_j s_j`; the fused score with a
    calibration and `config.calibrated`, else the refined or, for the host
    method, the host score).

    Returns:
      `SupportScores`: over the quadrant hold-outs (original and views), and
      the whole image against the others when `held` has cross-image units.
    """

    def image_score(h, r):
        if not config.use_refinement:
            s = h
        elif calibration is not None and config.calibrated:
            s = np.maximum(*(np.asarray(z, np.float64) for z in standardise(h, r, calibration)))
        else:
            s = r
        return s.max(axis=-1).max(axis=-1)  # patches, then the original and its views

    others = None if held.cross_host is None else image_score(held.cross_host, held.cross_refined)
    return SupportScores(
        image_score(held.host, held.refined),
        others,
        np.asarray(held.host[:, 0], np.float32).reshape(-1),
        np.asarray(held.refined[:, 0], np.float32).reshape(-1),
    )


def statistics(host: np.ndarray, refined: np.ndarray) -> ScoreCalibration:
    """Median and (floored) interquartile range of each kind of held-out score."""

    def loc_scale(x):
        x = np.asarray(x, np.float64)
        if x.size == 0 or not np.all(np.isfinite(x)):
            raise ValueError("held-out scores must be a non-empty, finite array.")
        q25, med, q75 = np.quantile(x, [0.25, 0.5, 0.75])
        # A constant score (e.g. all held-out patches reproduced exactly)
        # has no spread: fall back to the standard deviation, then a floor.
        spread = q75 - q25 if q75 > q25 else float(np.std(x))
        scale = max(spread, 1e-6 * abs(float(med)), _TINY)
        return jnp.float32(med), jnp.float32(scale)

    return ScoreCalibration(*loc_scale(host), *loc_scale(refined))


def calibration_error(
    host: np.ndarray, refined: np.ndarray, calibration: ScoreCalibration
) -> dict[str, float]:
    """How far the calibration is from the patch scores of images known to be normal.

    A calibration is right for new normal images when their z-scores have
    median 0 and interquartile range 1 in each half, and the two halves
    supply the image score (`max_j max(z_h, z_r)`) of normal images about
    equally often. Measured on labelled normal images (an evaluation's good
    test images); never used to score.

    Args:
      host: `[T, m]` host patch scores of normal images.
      refined: `[T, m]` refined patch scores of the same images.
      calibration: the statistics under test.

    Returns:
      `host_shift` / `refined_shift`: median z-score (in calibration IQRs);
      `host_iqr_ratio` / `refined_iqr_ratio`: IQR of the z-scores;
      `refined_share`: fraction of the images whose score the refined half
      supplies.
    """
    z_h, z_r = (np.asarray(z, np.float64) for z in standardise(host, refined, calibration))
    if z_h.ndim != 2 or z_h.shape != z_r.shape or z_h.shape[0] == 0:
        raise ValueError(f"host and refined must be [T, m] with T >= 1, got {z_h.shape}.")
    out = {}
    for name, z in (("host", z_h), ("refined", z_r)):
        q25, q50, q75 = np.quantile(z, [0.25, 0.5, 0.75])
        out[f"{name}_shift"] = float(q50)
        out[f"{name}_iqr_ratio"] = float(q75 - q25)
    out["refined_share"] = float(np.mean(z_r.max(axis=1) > z_h.max(axis=1)))
    return out


DEFAULT_ALPHA = 0.05
"""The coreset ratio `calibrate` assumes when not told (PatchCore's default)."""


def calibrate(
    support: Float[Array, "k m c"],
    config: RefineConfig,
    *,
    alpha: float = DEFAULT_ALPHA,
    grid_shape: tuple[int, int] | None = None,
) -> ScoreCalibration:
    """The calibration of a support set: statistics of its held-out scores.

    Args:
      support: `[k, m, c]` support patch features (k >= 1).
      config: the scoring config; its `grid_shape` is the patch grid unless
        `grid_shape` is given.
      alpha: coreset ratio of the real bank (`build_bank(support, alpha)`).
      grid_shape: patch grid `(h, w)` of one image, when `config` has none.

    Returns:
      The `ScoreCalibration` that `fuse` applies (pass it to
      `refine_and_score` / `score_query`).

    Example:
      >>> config = RefineConfig(grid_shape=(32, 32), image_size=(256, 256))
      >>> calib = calibrate(support, config, alpha=0.05)
    """
    if not isinstance(config, RefineConfig):
        raise TypeError(
            f"calibrate(support, config, *, alpha=..., grid_shape=...) takes a RefineConfig "
            f"second, got {type(config).__name__}; alpha and grid_shape are keywords."
        )
    grid = grid_shape if grid_shape is not None else config.grid_shape
    if grid is None:
        raise ValueError(
            "calibrate needs the patch grid: set RefineConfig.grid_shape or pass grid_shape=(h, w)."
        )
    return statistics(*held_out_scores(support, alpha, config, tuple(grid)))
