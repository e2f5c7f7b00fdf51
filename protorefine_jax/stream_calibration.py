"""Stream calibration: PatchCore+'s fusion statistics updated from past images.

`calibration.statistics` fixes the location and scale of each half (host and
refined) from the held-out support patches alone: a few images, measured
once. A deployed line then scores a stream of mostly normal parts, whose
patches are many more samples of the same normal distribution. Stream
calibration uses them: after a warm-up of `warmup` images, each new image is
standardised by the median and interquartile range of a pool of

  * the support hold-out scores, which always stay (a stream of defects can
    shift the statistics, never take them over alone), and
  * the patch scores of the images scored so far, kept in a bounded uniform
    sample (reservoir sampling, Vitter's algorithm R),

mixed so that the support scores make up `support_weight` of the pool. An
image is scored by the statistics of the images BEFORE it only (no
look-ahead), and the statistics are the same floored median / IQR rule as
`calibration.statistics` (which computes them).

It is OPT-IN and never the default: it uses past unlabelled query images,
which the fixed support calibration does not, so its scores depend on the
order and content of the stream. The default detectors keep
`calibration.statistics` of the support hold-outs.

Everything here is host-side numpy and pure: no I/O and no global state. The
state is a value (`StreamState`, a NamedTuple of read-only arrays): `update`
returns a new state and never modifies its argument, and all randomness is
drawn from generators seeded by `(config.seed, images seen)`, so a stream
replayed from the same state gives the same statistics.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import NamedTuple

import numpy as np

from protorefine_jax import calibration
from protorefine_jax.calibration import ScoreCalibration

# Streams of the seeded generators (`_generator`): one for the reservoir's
# draws in `update`, one for the pool's subsample in `current`.
_RESERVOIR_STREAM = 0
_POOL_STREAM = 1


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """Settings of a stream calibration.

    Attributes:
      warmup: images scored by the support statistics alone before the stream
        statistics are used (`>= 0`; 0: from the first image on, a pool of
        the support scores only until one image is seen).
      capacity: most patch scores the reservoir keeps per half (`>= 1`); the
        memory is `2 * capacity` float64 values.
      support_weight: fraction in `[0, 1]` of the pool that the support
        hold-out scores make up once the stream is warm. 1 keeps the support
        statistics; 0 uses the stream alone.
      seed: seed (`>= 0`) of the reservoir and pool samples.
    """

    warmup: int = 8
    capacity: int = 65536
    support_weight: float = 0.5
    seed: int = 0

    def __post_init__(self):
        def integer(name, value, low):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"StreamConfig.{name} must be an integer, got {value!r}.")
            if value < low:
                raise ValueError(f"StreamConfig.{name} must be >= {low}, got {value}.")

        integer("warmup", self.warmup, 0)
        integer("capacity", self.capacity, 1)
        integer("seed", self.seed, 0)
        w = self.support_weight
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not 0.0 <= float(w) <= 1.0:
            raise ValueError(f"StreamConfig.support_weight must be a number in [0, 1], got {w!r}.")


class StreamState(NamedTuple):
    """Where a stream calibration stands: the support scores and a sample of the past.

    A value: its arrays are read-only, and `update` returns a new state.

    Attributes:
      config: the settings.
      support_host: `[n]` float64 host scores of the held-out support patches.
      support_refined: `[n]` float64 refined scores of the same patches.
      host_reservoir: `[capacity]` float64 host scores of past stream
        patches; the first `min(seen, capacity)` entries are filled.
      refined_reservoir: `[capacity]` float64 refined scores of the same
        patches (one sample of patches: both halves keep the same ones).
      seen: stream patches offered to the reservoir so far.
      images: stream images seen so far.
      refined_on: the fit's refinement check (`ScoreCalibration.refined_on`):
        1.0 fuses both halves, 0.0 scores with the host half alone; the
        stream re-estimates the statistics, never this decision.
    """

    config: StreamConfig
    support_host: np.ndarray
    support_refined: np.ndarray
    host_reservoir: np.ndarray
    refined_reservoir: np.ndarray
    seen: int
    images: int
    refined_on: float = 1.0

    @property
    def filled(self) -> int:
        """Number of filled reservoir entries."""
        return min(self.seen, self.config.capacity)


def _scores(x, name: str) -> np.ndarray:
    """`x` as a flat float64 array, checked non-empty and finite."""
    x = np.asarray(x, np.float64).reshape(-1)
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be a non-empty, finite array of patch scores.")
    return x


def _pair(host, refined, host_name: str, refined_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Both halves' scores of the same patches, checked (`_scores`, equal sizes)."""
    host, refined = _scores(host, host_name), _scores(refined, refined_name)
    if host.shape != refined.shape:
        raise ValueError(
            f"{host_name} and {refined_name} must hold the same patches, got "
            f"{host.size} and {refined.size} scores."
        )
    return host, refined


def _frozen(x: np.ndarray) -> np.ndarray:
    x.flags.writeable = False
    return x


def _generator(config: StreamConfig, stream: int, images: int) -> np.random.Generator:
    """The seeded generator of one step (`stream` tells `update` and `current` apart)."""
    return np.random.default_rng(np.random.SeedSequence([config.seed, stream, images]))


def init(
    support_host,
    support_refined,
    config: StreamConfig | None = None,
    refined_on: float = 1.0,
) -> StreamState:
    """A stream calibration that has seen no image yet.

    Args:
      support_host: host scores of the held-out support patches (any shape,
        flattened; e.g. `calibration.held_out_scores(...)[0]`).
      support_refined: their refined scores, same number.
      config: the settings (default `StreamConfig()`).
      refined_on: the fit's refinement check (`StreamState.refined_on`).

    Returns:
      The initial `StreamState` (copies of the scores; empty reservoirs).

    Raises:
      ValueError: empty, non-finite or mismatched support scores, or a
        `config` that is not a `StreamConfig`.
    """
    config = StreamConfig() if config is None else config
    if not isinstance(config, StreamConfig):
        raise ValueError(f"config must be a StreamConfig, got {type(config).__name__}.")
    host, refined = _pair(support_host, support_refined, "support_host", "support_refined")
    empty = lambda: _frozen(np.zeros(config.capacity, np.float64))
    return StreamState(
        config=config,
        support_host=_frozen(host.copy()),
        support_refined=_frozen(refined.copy()),
        host_reservoir=empty(),
        refined_reservoir=empty(),
        seen=0,
        images=0,
        refined_on=float(refined_on),
    )


def _placements(seen: int, m: int, capacity: int, draws: np.ndarray) -> tuple[np.ndarray, ...]:
    """Where algorithm R puts `m` new items: `(slots, items)`, item `items[i]` into `slots[i]`.

    The item at global position `p = seen + i` fills slot `p` while the
    reservoir is not full; afterwards it replaces slot `draws[i]` if
    `draws[i] < capacity`, where `draws[i]` is uniform on `[0, p]`. Items are
    offered in order, so when several items of the batch hit one slot the
    last one stays; each slot is assigned at most once in the result.

    Args:
      seen: items offered before this batch.
      m: items in this batch.
      capacity: reservoir size.
      draws: `[m]` ints, `draws[i]` uniform on `[0, seen + i]` (only used
        where `seen + i >= capacity`).

    Returns:
      `(slots, items)`: int arrays of equal length.
    """
    positions = seen + np.arange(m)
    slots = np.where(positions < capacity, positions, draws)
    kept = np.flatnonzero(slots < capacity)
    slots = slots[kept]
    # Last write wins: the first occurrence of each slot in reversed order.
    _, first_from_end = np.unique(slots[::-1], return_index=True)
    last = len(slots) - 1 - first_from_end
    return slots[last], kept[last]


def update(state: StreamState, host_patches, refined_patches) -> StreamState:
    """The state after one more image: its patch scores offered to the reservoir.

    Args:
      state: the state before the image (not modified).
      host_patches: `[m]` host patch scores of the image (any shape, flattened).
      refined_patches: `[m]` refined patch scores of the same patches.

    Returns:
      A new `StreamState` with `images + 1` images and `seen + m` patches.

    Raises:
      ValueError: empty, non-finite or mismatched patch scores.
    """
    host, refined = _pair(host_patches, refined_patches, "host_patches", "refined_patches")
    config, m = state.config, host.size
    positions = state.seen + np.arange(m)
    # Draws only matter past the fill; `integers(0, p + 1)` is uniform on [0, p].
    draws = _generator(config, _RESERVOIR_STREAM, state.images).integers(0, positions + 1)
    slots, items = _placements(state.seen, m, config.capacity, draws)
    host_res, refined_res = state.host_reservoir.copy(), state.refined_reservoir.copy()
    host_res[slots] = host[items]
    refined_res[slots] = refined[items]
    return state._replace(
        host_reservoir=_frozen(host_res),
        refined_reservoir=_frozen(refined_res),
        seen=state.seen + m,
        images=state.images + 1,
    )


def _pool_sizes(support: int, stream: int, weight: float) -> tuple[int, int]:
    """Sizes `(n_support, n_stream)` of the largest pool with `weight` support scores.

    The limiting side is kept whole and the other one subsampled to the
    proportion (rounded, never above what is available). A stream of no
    patches gives the support alone.
    """
    if stream == 0 or weight >= 1.0:
        return support, 0
    if weight <= 0.0:
        return 0, stream
    ratio = (1.0 - weight) / weight  # stream scores per support score
    if support * ratio <= stream:
        return support, min(stream, round(support * ratio))
    return min(support, round(stream / ratio)), stream


def _subsample(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """`size` distinct indices of `range(n)` (all of them, in order, when `size == n`)."""
    if size >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=size, replace=False))


def pool(state: StreamState) -> tuple[np.ndarray, np.ndarray]:
    """The `(host, refined)` scores `current` takes its statistics from once warm.

    The support hold-out scores and the reservoir, each subsampled (the same
    patches for both halves) to sizes in the proportion `support_weight`
    (`_pool_sizes`), by the generator of `(seed, images)`.
    """
    n_support, n_stream = _pool_sizes(
        state.support_host.size, state.filled, float(state.config.support_weight)
    )
    rng = _generator(state.config, _POOL_STREAM, state.images)
    s = _subsample(rng, state.support_host.size, n_support)
    r = _subsample(rng, state.filled, n_stream)
    host = np.concatenate([state.support_host[s], state.host_reservoir[r]])
    refined = np.concatenate([state.support_refined[s], state.refined_reservoir[r]])
    return host, refined


def current(state: StreamState) -> ScoreCalibration:
    """The calibration that scores the next image.

    Args:
      state: the state after the images scored so far.

    Returns:
      Before `warmup` images, `calibration.statistics` of the support scores
      exactly; from then on, `calibration.statistics` of `pool(state)`.
    """
    if state.images < state.config.warmup:
        cal = calibration.statistics(state.support_host, state.support_refined)
    else:
        cal = calibration.statistics(*pool(state))
    return cal._replace(refined_on=np.float32(state.refined_on))


def _fuse(host: np.ndarray, refined: np.ndarray, cal: ScoreCalibration) -> np.ndarray:
    """`calibration.fuse` in numpy float32 (the same IEEE operations, the same values)."""
    cal32 = ScoreCalibration(*(np.float32(v) for v in cal))
    z_host, z_refined = calibration.standardise(host, refined, cal32)
    return np.maximum(z_host, z_refined) if float(cal32.refined_on) > 0 else z_host


def calibrate_stream(
    support_host,
    support_refined,
    host_grids,
    refined_grids,
    config: StreamConfig | None = None,
    gate: float | None = None,
    refined_on: float = 1.0,
) -> tuple[np.ndarray, list[ScoreCalibration]]:
    """Fused patch scores of a stream of images, each calibrated by the images before it.

    Image `t` is fused by `current` of the state after images `0 .. t-1`, and
    then added to the state: no image influences its own score or an earlier
    one. With a `gate`, only images whose fused image score (`max_j s_j`,
    under the calibration they were scored with) is at most `gate` are
    added: the statistics learn from the images judged normal, so a run of
    defective parts does not widen them.

    Args:
      support_host: host scores of the held-out support patches.
      support_refined: their refined scores.
      host_grids: `[T, m]` host patch scores of the stream, in order (each
        image's patches may have any shape; `[T, h, w]` works too).
      refined_grids: `[T, m]` refined patch scores, same shape.
      config: the settings (default `StreamConfig()`).
      gate: image score above which an image is not added (None: every
        image is); e.g. the model's normal-only decision threshold.
      refined_on: the fit's refinement check (`StreamState.refined_on`).

    Returns:
      `(fused, calibrations)`: `[T, ...]` float32 fused scores (as
      `calibration.fuse` computes them) and the `T` calibrations used,
      `calibrations[t]` for image `t`.

    Raises:
      ValueError: mismatched shapes or non-finite scores.
    """
    state = init(support_host, support_refined, config, refined_on)
    _, fused, calibrations = fuse_next(state, host_grids, refined_grids, gate)
    return fused, calibrations


def fuse_next(
    state: StreamState, host_grids, refined_grids, gate: float | None = None
) -> tuple[StreamState, np.ndarray, list[ScoreCalibration]]:
    """`calibrate_stream` resumed from `state`: the next images of a stream, in order.

    Returns:
      `(state, fused, calibrations)`: the state after these images, their
      `[T, ...]` float32 fused scores and the calibration each was scored with.

    Raises:
      ValueError: mismatched shapes or non-finite scores.
    """
    host = np.asarray(host_grids, np.float64)
    refined = np.asarray(refined_grids, np.float64)
    if host.shape != refined.shape or host.ndim < 2:
        raise ValueError(
            f"host_grids and refined_grids must be [T, m] patch scores of the same shape, "
            f"got {host.shape} and {refined.shape}."
        )
    if not (np.all(np.isfinite(host)) and np.all(np.isfinite(refined))):
        raise ValueError("host_grids and refined_grids must be finite patch scores.")
    fused = np.empty(host.shape, np.float32)
    calibrations = []
    for t in range(host.shape[0]):
        cal = current(state)
        calibrations.append(cal)
        fused[t] = _fuse(host[t].astype(np.float32), refined[t].astype(np.float32), cal)
        if gate is None or float(fused[t].max()) <= gate:
            state = update(state, host[t], refined[t])
    return state, fused, calibrations


def in_order(calibrations: list[ScoreCalibration], order: np.ndarray) -> ScoreCalibration:
    """The calibration each image was scored with, back in the images' own order.

    Args:
      calibrations: `calibrate_stream`'s list, in stream order.
      order: `order[t]` is the index of the `t`-th image of the stream.

    Returns:
      One `ScoreCalibration` of `[T, 1]` float64 columns (broadcasts against
      `[T, m]` patch scores in `calibration.standardise`).
    """
    per_image: list = [None] * len(calibrations)
    for t, i in enumerate(np.asarray(order)):
        per_image[int(i)] = calibrations[t]
    return ScoreCalibration(
        *(np.asarray(f, np.float64)[:, None] for f in zip(*per_image, strict=True))
    )
