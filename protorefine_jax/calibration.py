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

Above `HoldoutBudget.exact_max` support images (default 8) the hold-outs
are approximated (`shared_held_out`; the exact ones cost ~k^3 and a
refinement against a bank of `n = alpha k m` rows costs ~n^2 per patch):
every hold-out bank is the deployed bank's coreset with the held-out rows
removed and the region they covered re-covered by a short greedy
continuation; host scores for every quadrant and view, refined scores for a
fixed number of quadrants spread over the images (`HoldoutBudget`).

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
from protorefine_jax.config import MAP_FIELDS, RefineConfig
from protorefine_jax.coreset import coreset_size, greedy_coreset, projection_matrix
from protorefine_jax.gram import feature_products, gram_system, matmul_precision, normalize_rows
from protorefine_jax.metrics import paired_auroc
from protorefine_jax.refine import refine
from protorefine_jax.scoring import _min_distance, base_patch_scores, refined_patch_scores
from protorefine_jax.threshold import TYPICAL_QUANTILE, augment_views

_TINY = 1e-12

VIEWS = 4
"""Nuisance views per support image in the support scores' hold-outs (0: originals only)."""

CHECK_Z = 1.96
"""`refinement_check` drops the refined half when the host is better at this z (5 %, two-sided)."""

PSEUDO_ANOMALIES = 16
"""Pasted-defect copies per checked support image in `refinement_check` (0: no check)."""


@dataclasses.dataclass(frozen=True)
class HoldoutBudget:
    """How the support hold-outs are computed: exactly for few images, approximated above.

    Attributes:
      exact_max: up to this many support images, every quadrant hold-out has
        its own greedy coreset of the other support patches and is refined
        with its views, and each image is scored against a coreset of the
        others (`held_out_units`, `cross_image_units`): the measured tables
        (1, 2, 4 shots) and the earlier fits are these. Above it
        `shared_held_out` approximates them (module docstring).
      refined_units: above `exact_max`, the number of quadrant hold-outs
        whose original patches are refined (spread evenly over the images
        and the four quadrants, deterministic), fewer against banks of more
        than `REFINED_WORK_ROWS` rows (`budget_units`: a refined patch costs
        ~n c); every quadrant and view gets its host score. The refined
        half's statistics come from these quadrants (paired with their host
        scores), and an image's held-out score takes its refined half only
        where it was refined: the host half supplied the held-out image
        score of 7 of 8 metal_plate images in the exact computation, the
        refined one at most 2 % more in the 8th (docs/method.md, "Scoring").
        Scoring with the refined half alone (`calibrated=False`) keeps the
        exact hold-outs at every `k`: its image score has no host half to
        stand in where nothing was refined.
    """

    exact_max: int = 8
    refined_units: int = 16

    def __post_init__(self):
        for name in ("exact_max", "refined_units"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"HoldoutBudget.{name} must be an int >= 1, got {value!r}.")

    def exact(self, k: int) -> bool:
        """Whether `k` support images get the exact hold-outs."""
        return k <= self.exact_max


class ScoreCalibration(NamedTuple):
    """Location and scale of the host and refined patch scores on held-out support patches.

    A pytree of float32 scalars (traced under jit: a new category never
    recompiles).

    Attributes:
      host_loc: median host score of the held-out patches.
      host_scale: their interquartile range (floored, never 0).
      refined_loc: median refined score of the held-out patches.
      refined_scale: their interquartile range (floored, never 0).
      refined_on: 1.0 to fuse the refined half into the score (the max of
        the two z-scores), 0.0 to score with the host's z-score alone: what
        `refinement_check` decided at fit time (1.0 when no check ran).
    """

    host_loc: Float[Array, ""]
    host_scale: Float[Array, ""]
    refined_loc: Float[Array, ""]
    refined_scale: Float[Array, ""]
    refined_on: Float[Array, ""] = 1.0


def fuse(
    host: Float[Array, "*m"], refined: Float[Array, "*m"], calibration: ScoreCalibration
) -> Float[Array, "*m"]:
    """`max` of the standardised host and refined patch scores (robust z-scores).

    With `calibration.refined_on` 0 (the fit's `refinement_check` found that
    the refined half does not help on the support images), the host's
    z-score alone.

    Args:
      host: host patch scores (distance to the nearest prototype).
      refined: refined patch scores, same shape.
      calibration: their held-out support statistics.

    Returns:
      The fused patch scores, in held-out interquartile ranges.
    """
    z_host, z_refined = standardise(host, refined, calibration)
    return jnp.where(calibration.refined_on > 0, jnp.maximum(z_host, z_refined), z_host)


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
_NOT_CALIBRATED = (*MAP_FIELDS, "calibrated", "use_refinement")


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


def _support_and_views(support, grid_shape, views):
    """Checked `[k, m, c]` support and the `[k, 1 + V, m, c]` queries of its hold-outs.

    The original of each image first, then its nuisance `views` (`[k, V, m, c]`, or None).
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
    return support, sources


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
    support, sources = _support_and_views(support, grid_shape, views)
    k, m, c = support.shape
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
    budget: HoldoutBudget | None = None,
    bank_indices: np.ndarray | None = None,
) -> HeldOut:
    """Quadrant hold-outs (originals and views) and, with `cross` and `k >= 2`, whole images.

    Exact up to `budget.exact_max` images (default `HoldoutBudget()`), else
    `shared_held_out` (whose refined entries are NaN where not refined);
    `bank_indices`: the deployed bank's coreset rows of the flattened
    support, if already built (the approximation starts from them).
    """
    budget = HoldoutBudget() if budget is None else budget
    # Refined-alone scoring has no host half to stand in where nothing was refined.
    refined_alone = config.use_refinement and not config.calibrated
    if not budget.exact(np.shape(support)[0]) and not refined_alone:
        return shared_held_out(
            support, alpha, config, grid_shape, views, cross, budget.refined_units, bank_indices
        )
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
      typical: `[k, 1 + V]` the `TYPICAL_QUANTILE` of each held-out image's
        and view's patch scores, in the deployed units: how high a normal
        image scores where it is normal, the reference of `threshold.typical_check`
        (None in states fitted before it existed, and for WinCLIP).
    """

    held_out: np.ndarray
    against_others: np.ndarray | None = None
    host_patches: np.ndarray | None = None
    refined_patches: np.ndarray | None = None
    typical: np.ndarray | None = None


def support_image_scores(
    held: HeldOut, config: RefineConfig, calibration: ScoreCalibration | None
) -> SupportScores:
    """Each support image's held-out image scores in the deployed detector's units.

    The image score is the scoring's (`max_j s_j`; the fused score with a
    calibration and `config.calibrated`, else the refined or, for the host
    method, the host score).

    Returns:
      `SupportScores`: over the quadrant hold-outs (original and views), and
      the whole image against the others when `held` has cross-image units;
      the `TYPICAL_QUANTILE` of each held-out image's and view's patch scores (`typical`).
    """

    def image_score(h, r):  # patches, then the original and its views
        return deployed_patch_scores(h, r, config, calibration).max(axis=-1).max(axis=-1)

    others = None if held.cross_host is None else image_score(held.cross_host, held.cross_refined)
    host, refined = paired_originals(held)
    units = deployed_patch_scores(held.host, held.refined, config, calibration)
    return SupportScores(
        units.max(axis=-1).max(axis=-1),
        others,
        np.asarray(host, np.float32),
        np.asarray(refined, np.float32),
        np.quantile(units, TYPICAL_QUANTILE, axis=-1),
    )


def deployed_patch_scores(
    host: np.ndarray,
    refined: np.ndarray,
    config: RefineConfig,
    calibration: ScoreCalibration | None,
) -> np.ndarray:
    """Float64 patch scores in the deployed detector's units, from the two halves' raw scores.

    The host score for the host method; the fused z-score with a calibration
    and `config.calibrated` (the host's z alone where the refinement check
    dropped the refined half; `fmax`: a refined score the hold-out budget
    left out, NaN, leaves the host's); else the refined score.
    """
    if not config.use_refinement:
        return np.asarray(host, np.float64)
    if calibration is not None and config.calibrated:
        z_h, z_r = (np.asarray(z, np.float64) for z in standardise(host, refined, calibration))
        return np.fmax(z_h, z_r) if float(calibration.refined_on) > 0 else z_h
    return np.asarray(refined, np.float64)


def paired_originals(held: HeldOut) -> tuple[np.ndarray, np.ndarray]:
    """`(host, refined)` `[n]` of the originals' held-out patches that have both halves.

    Every patch (`n = k m`) for the exact hold-outs; the refined quadrants'
    patches under a `HoldoutBudget` approximation. What the calibration's
    statistics are of.
    """
    host = np.asarray(held.host[:, 0]).reshape(-1)
    refined = np.asarray(held.refined[:, 0]).reshape(-1)
    both = ~np.isnan(refined)
    if both.all():
        return host, refined
    return host[both], refined[both]


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

    return ScoreCalibration(*loc_scale(host), *loc_scale(refined), refined_on=jnp.float32(1.0))


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


class RefinementCheck(NamedTuple):
    """Whether the refined half helps the host on the support images (`refinement_check`).

    Attributes:
      host_auroc: image AUROC (percent) of the host z-score: pasted-defect
        copies of the checked support images against their clean held-out
        quadrants (originals and nuisance views).
      fused_auroc: the same for the fused score (max of the two z-scores).
      images: support images checked.
      pasted: pasted-defect copies per checked image.
      host_better_z: DeLong's z of `host_auroc - fused_auroc` (the same
        units scored both ways; `metrics.paired_auroc`).
    """

    host_auroc: Float[Array, ""]
    fused_auroc: Float[Array, ""]
    images: Float[Array, ""]
    pasted: Float[Array, ""]
    host_better_z: Float[Array, ""] = 0.0

    @property
    def keep(self) -> bool:
        """The refinement stays unless the host alone separates significantly better."""
        return bool(float(self.host_better_z) < CHECK_Z)


def check_images(k: int, budget: HoldoutBudget | None = None) -> np.ndarray:
    """Indices of the support images `refinement_check` pastes defects into.

    All of them up to `budget.exact_max` (8), else that many evenly spaced.
    """
    budget = HoldoutBudget() if budget is None else budget
    n = min(k, budget.exact_max)
    return np.unique(np.round(np.linspace(0, k - 1, n)).astype(int))


def refinement_check(
    support: Float[Array, "k m c"],
    alpha: float,
    config: RefineConfig,
    grid_shape: tuple[int, int],
    pasted: Float[Array, "n p m c"],
    views: Float[Array, "k v m c"] | None = None,
    budget: HoldoutBudget | None = None,
) -> RefinementCheck:
    """Does fusing the refined half separate defects from normal variation better than the host?

    Decided from the support images only, at fit time: the checked images
    (`check_images`) are held out quadrant by quadrant as in the calibration
    (`held_out_units`), their nuisance `views` give the normal variation a
    new part shows, and copies of them with one pasted defect each
    (`pseudo_anomalies.support_pseudo_anomalies`) give defects. Each held-out
    unit (an image assembled from its four held-out quadrants) scores its
    maximum patch z-score, under the host alone and under the fused max of
    the checked images' own statistics; the refined half is dropped
    (`RefinementCheck.keep` False) only where the host alone separates
    pasted from clean units significantly better (DeLong's z of the AUROC
    difference at least `CHECK_Z`): the refinement stays unless the support
    images show that it hurts. Measured on the dev sets in RESULTS.md,
    "Calibration that sees new parts" (pseudo-anomalies), with the stricter
    rule "keep only if the fused AUROC is higher" beside it.

    Args:
      support: `[k, m, c]` support patch features.
      alpha: coreset ratio of the real bank.
      config: the scoring config whose refinement is checked.
      grid_shape: patch grid of one image.
      pasted: `[n, P, m, c]` features of the pasted copies of the `n` checked
        images (`check_images(k, budget)`, in that order).
      views: optional `[k, V, m, c]` nuisance-view features of every support image.
      budget: how many images are checked (`HoldoutBudget.exact_max`).

    Returns:
      The `RefinementCheck`.
    """
    k = int(np.shape(support)[0])
    idx = check_images(k, budget)
    pasted = np.asarray(pasted)
    if pasted.ndim != 4 or pasted.shape[0] != len(idx) or pasted.shape[2:] != np.shape(support)[1:]:
        raise ValueError(
            f"pasted must be [n, P, m, c] = [{len(idx)}, P, *{tuple(np.shape(support)[1:])}] "
            f"features of the checked images' copies, got shape {pasted.shape}."
        )
    checks.check_finite(pasted, "pasted")
    sub = np.asarray(support)[idx]
    queries = pasted if views is None else np.concatenate([np.asarray(views)[idx], pasted], 1)
    cfg = config.replace(use_refinement=True)
    host, refined = held_out_units(sub, alpha, cfg, grid_shape, queries)  # [n, 1+V+P, m]
    return check_units(host, refined, pasted.shape[1])


def check_units(
    host: np.ndarray,
    refined: np.ndarray,
    pasted: int,
    calibration: ScoreCalibration | None = None,
) -> RefinementCheck:
    """`refinement_check`'s decision from its held-out units.

    Args:
      host: `[n, 1 + V + P, m]` held-out host scores of the checked images:
        the original, its `V` views, then its `P` pasted copies.
      refined: the refined scores, same shape.
      pasted: `P`.
      calibration: the statistics the z-scores are taken in; None: those
        of the originals' units (`host[:, 0]`, `refined[:, 0]`).

    Returns:
      The `RefinementCheck`.
    """
    host, refined = np.asarray(host, np.float64), np.asarray(refined, np.float64)
    n, per_image, _ = host.shape
    clean = per_image - pasted
    if pasted < 1 or clean < 1:
        raise ValueError(
            f"need clean and pasted units, got {per_image} units with {pasted} pasted."
        )
    cal = statistics(host[:, 0], refined[:, 0]) if calibration is None else calibration
    z_host, z_refined = (np.asarray(z, np.float64) for z in standardise(host, refined, cal))
    labels = np.r_[np.zeros(n * clean), np.ones(n * pasted)]

    def unit_scores(z):
        best = z.max(axis=-1)  # [n, 1+V+P] image score of each held-out unit
        return np.r_[best[:, :clean].ravel(), best[:, clean:].ravel()]

    fused = np.maximum(z_host, z_refined)
    paired = paired_auroc(labels, unit_scores(z_host), unit_scores(fused))
    return RefinementCheck(
        jnp.float32(paired.first),
        jnp.float32(paired.second),
        jnp.float32(n),
        jnp.float32(pasted),
        jnp.float32(paired.z),
    )


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


# --------------------------------------------------------------------------- many support images


def quadrant_rows(grid_shape: tuple[int, int]) -> list[np.ndarray]:
    """Patch rows (row-major, one image) of each grid quadrant, in `holdout_splits`' order."""
    h, w = grid_shape
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    quadrant = ((rows >= h // 2).astype(int) * 2 + (cols >= w // 2).astype(int)).ravel()
    return [np.flatnonzero(quadrant == q) for q in range(4)]


REFINED_WORK_ROWS = 1024
"""Bank rows up to which `HoldoutBudget.refined_units` quadrants are refined (`budget_units`)."""


def budget_units(count: int, bank_rows: int) -> int:
    """Quadrants refined against a bank of `bank_rows` rows: `count`, fewer for larger banks.

    A patch's refinement against `n > 2c` bank rows costs ~`n c` (the
    feature form, `gram.uses_feature_form`): above `REFINED_WORK_ROWS` the
    count falls as `REFINED_WORK_ROWS / n`, so the refinement's cost stays
    about flat in `k`, never below one quadrant of each position (4) or above
    `count`. (Before the feature form a patch cost ~`n^2` and the count fell
    as the square of that ratio.)
    """
    scaled = int(count * min(1.0, REFINED_WORK_ROWS / max(bank_rows, 1)))
    return max(min(4, count), scaled)


def refined_units(k: int, count: int) -> np.ndarray:
    """`[min(count, 4k), 2]` (image, quadrant) of the quadrants a budget refines.

    Spread evenly over the images (`floor(j k / U)`), the quadrant turning
    with `j` (`j mod 4`), so no quadrant of the grid is favoured; all `4 k`
    quadrants when `count >= 4 k`.
    """
    total = min(count, 4 * k)
    j = np.arange(total)
    return np.stack([j * k // total, j % 4], axis=1)


@jax.jit
def _nearest_centre(points, centres):
    """Nearest row of `centres` to each row of `points`, and its squared distance."""
    c_sq = jnp.sum(centres * centres, axis=1)
    chunk = 1024
    num = points.shape[0]
    blocks = jnp.pad(points, ((0, (-num) % chunk), (0, 0))).reshape(-1, chunk, points.shape[1])

    def one(block):
        dots = jnp.matmul(block, centres.T, precision=jax.lax.Precision.HIGHEST)
        d = jnp.sum(block * block, axis=1)[:, None] - 2.0 * dots + c_sq[None]
        return jnp.argmin(d, axis=1), jnp.maximum(jnp.min(d, axis=1), 0.0)

    near, dist = jax.lax.map(one, blocks)
    return near.reshape(-1)[:num], dist.reshape(-1)[:num]


class SharedBanks(NamedTuple):
    """Hold-out banks cut from one coreset: `[G, n]` rows of the flattened support, used flags."""

    rows: np.ndarray
    used: np.ndarray


class Cover(NamedTuple):
    """How one coreset covers the support: what `shared_banks` cuts hold-out banks from.

    Attributes:
      centres: `[n]` the coreset's rows of the flattened support, in selection order.
      points: `[k m, d]` float32 the rows in the coreset's (projected) distances.
      nearest: `[k m]` each row's nearest centre (a position in `centres`).
      radius: the covering radius (largest squared distance to the nearest centre).
    """

    centres: np.ndarray
    points: np.ndarray
    nearest: np.ndarray
    radius: float


def cover(flat: Float[Array, "N c"], alpha: float, bank_indices=None) -> Cover:
    """The `Cover` of `[N, c]` rows by their greedy coreset (`bank_indices` if already built)."""
    flat = jnp.asarray(flat)
    if bank_indices is None:
        bank_indices = greedy_coreset(flat, alpha)
    centres = np.asarray(bank_indices, np.int64)
    points = flat
    if flat.shape[1] > 128:  # the projection `greedy_coreset` measures in
        proj = projection_matrix(flat.shape[1], 128, 0)
        points = jnp.matmul(flat, proj, precision=jax.lax.Precision.HIGHEST)
    near, dist = _nearest_centre(points, points[centres])
    return Cover(centres, np.asarray(points, np.float32), np.asarray(near), float(jnp.max(dist)))


def shared_banks(held: list[np.ndarray], alpha: float, cov: Cover) -> SharedBanks:
    """The bank of each hold-out `held[g]` (rows of the flattened support), from one coreset.

    The coreset `S` of the whole support (`cov`) with the held-out rows
    removed approximates a coreset of the other rows, except where those
    rows were the only centres: the rows whose nearest centre was removed
    lose their cover. A greedy continuation among them re-covers that
    region, as a coreset of the remaining rows would: it takes the farthest
    of them while any lies beyond the coreset's covering radius, at most one
    per removed centre, into the removed centres' slots. Last, the
    latest-selected rows of `S` are dropped until the bank holds the size a
    coreset of the remaining rows has (`coreset_size`). One `[n]` shape for
    every hold-out: removed rows are marked unused.

    Args:
      held: per hold-out, the held-out rows of the flattened `[k m]` support.
      alpha: coreset ratio.
      cov: the support's `Cover`.

    Returns:
      `SharedBanks`: `rows [G, n]` (int) and `used [G, n]` (bool).
    """
    centres, points = cov.centres, cov.points
    n, total = centres.size, points.shape[0]
    sq = np.sum(points * points, axis=1)
    slot_of_row = np.full(total, -1)
    slot_of_row[centres] = np.arange(n)

    def sq_dist(a, b):
        return np.maximum(sq[a][:, None] - 2.0 * (points[a] @ points[b].T) + sq[b][None], 0.0)

    rows = np.broadcast_to(centres, (len(held), n)).copy()
    used = np.ones((len(held), n), bool)
    for g, out in enumerate(held):
        slots = slot_of_row[out]
        removed = np.sort(slots[slots >= 0])
        used[g, removed] = False
        outside = np.ones(total, bool)
        outside[out] = False
        lost = np.zeros(n, bool)
        lost[removed] = True
        orphans = np.flatnonzero(lost[cov.nearest] & outside)
        if removed.size and orphans.size:
            gap = sq_dist(orphans, centres[used[g]]).min(axis=1)
            for slot in removed:
                j = int(np.argmax(gap))
                if gap[j] <= cov.radius:
                    break
                rows[g, slot], used[g, slot] = orphans[j], True
                gap = np.minimum(gap, sq_dist(orphans, orphans[j : j + 1])[:, 0])
        extra = int(used[g].sum()) - coreset_size(total - out.size, alpha)
        if extra > 0:  # the latest-selected centres go first
            kept = np.flatnonzero(used[g] & (rows[g] == centres))
            used[g, kept[-extra:]] = False
    return SharedBanks(rows, used)


@jax.jit
def _host_against(flat, rows, used, queries, config: RefineConfig):
    """Host scores `[G, V, m']` of `queries [G, V, m', c]`, each against its masked bank."""

    def one(args):
        idx, use, query = args
        bank = flat[idx]
        q = query.reshape(-1, query.shape[-1])
        if config.distance == "cosine":
            bank, q = normalize_rows(bank), normalize_rows(q)
        dots = feature_products(q, bank, config.precision)
        b_sq = jnp.sum(bank * bank, axis=1)
        q_sq = jnp.sum(q * q, axis=1)
        if config.distance == "cosine":
            dots = jnp.where(use, dots, -jnp.inf)
            scores = _min_distance(dots, q_sq, jnp.where(use, b_sq, 1.0), config.distance)
        else:
            scores = _min_distance(dots, q_sq, jnp.where(use, b_sq, jnp.inf), config.distance)
        return scores.reshape(query.shape[:-1])

    return jax.lax.map(one, (rows, used, queries))


@jax.jit
def _refined_against(flat, rows, used, queries, config: RefineConfig):
    """Refined scores `[G, m']` of `queries [G, m', c]`, each against its masked bank."""

    def one(args):
        idx, use, query = args
        bank = jnp.where(use[:, None], flat[idx], 0.0)  # unused rows: zero and weight 0
        weights = use / jnp.maximum(jnp.sum(use), 1)
        with matmul_precision(config):
            system = gram_system(bank, query, config, weights=weights)
            ref = refine(system, config)
            return refined_patch_scores(system, ref.w, config, ref.refined_sq)

    return jax.lax.map(one, (rows, used, queries))


def shared_held_out(
    support: Float[Array, "k m c"],
    alpha: float,
    config: RefineConfig,
    grid_shape: tuple[int, int],
    views: Float[Array, "k v m c"] | None = None,
    cross: bool = False,
    refined_count: int = 16,
    bank_indices: np.ndarray | None = None,
) -> HeldOut:
    """`held_out`'s scores from one coreset, for many support images (module docstring).

    Every quadrant hold-out (and with `cross`, `k >= 3`, every whole image)
    gets a `shared_banks` bank; host scores for every quadrant and view,
    refined scores for the originals of `refined_units(k, refined_count)`
    quadrants (`budget_units`; NaN elsewhere; `cross_refined` all NaN: an image's score
    against the others is its host half). The refinement runs under the
    real bank's ridge, as `held_out_units`'. Checked against the exact
    hold-outs in tests/test_calibration.py; measured in BENCHMARKS.md.

    Returns:
      `HeldOut`, the layout of `held_out`'s.
    """
    support, sources = _support_and_views(support, grid_shape, views)
    k, m, c = support.shape
    holdout_splits(1, tuple(grid_shape))  # the grid check
    flat = support.reshape(k * m, c)
    cov = cover(flat, alpha, bank_indices)
    cfg = _holdout_config(k * m, c, alpha, config)
    quads = quadrant_rows(tuple(grid_shape))
    host = np.zeros((k, sources.shape[1], m))
    refined = np.full((k, sources.shape[1], m), np.nan)
    chosen = refined_units(k, budget_units(refined_count, cov.centres.size))
    for q, local in enumerate(quads):
        held = [i * m + local for i in range(k)]
        banks = shared_banks(held, alpha, cov)
        h = _host_against(flat, banks.rows, banks.used, sources[:, :, local], cfg)
        host[:, :, local] = np.asarray(h, np.float64)
        images = chosen[chosen[:, 1] == q, 0]
        if images.size:
            r = _refined_against(
                flat, banks.rows[images], banks.used[images], support[images][:, local], cfg
            )
            refined[images[:, None], 0, local[None]] = np.asarray(r, np.float64)
    if not cross or k < 2:
        return HeldOut(host, refined)
    banks = shared_banks([i * m + np.arange(m) for i in range(k)], alpha, cov)
    cross_host = np.asarray(
        _host_against(flat, banks.rows, banks.used, support[:, None], cfg), np.float64
    )
    return HeldOut(host, refined, cross_host, np.full_like(cross_host, np.nan))
