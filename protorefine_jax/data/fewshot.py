"""Few-shot protocol: seeded support sets from `train/good`, aggregation over seeds.

The pool is sorted by path before drawing, so a support set depends only on
(file names, k, seed), never on directory listing order. The draw is a numpy
`Generator` permutation truncated to k, which makes supports nested across
shots for one seed: `support(k=1, seed) == support(k=2, seed)[:1]`, so a k-shot
gain is never a different-luck artefact. The support is returned in draw
order (not re-sorted) to keep that prefix visible in stored results.

Example::

    data = load_category(root, "metal_plate")
    for s in support_sets(data.train_good, k=2, seeds=DEFAULT_SEEDS, root=data.root):
        support_images = data.load_images(s.paths)  # [2, S, S, 3]
        ...  # store s.names with the result
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from protorefine_jax.data.errors import EmptyTrainSetError, NotEnoughShotsError

DEFAULT_SEEDS = (0, 1, 2, 3, 4)


class SupportSet(NamedTuple):
    """One seeded k-shot support set.

    Attributes:
      seed: the seed it was drawn with.
      k: number of shots.
      paths: `k` image files, in draw order.
      names: the same files as POSIX strings relative to the `root` passed to
        :func:`sample_support` (else bare file names): store these with results.
    """

    seed: int
    k: int
    paths: tuple[Path, ...]
    names: tuple[str, ...]


def sample_support(
    pool: Sequence[str | Path], k: int, seed: int, root: str | Path | None = None
) -> SupportSet:
    """Draws `k` distinct support images from `pool` with `seed`.

    Args:
      pool: candidate good images (e.g. `CategoryData.train_good`); any order.
      k: number of shots, `>= 1`.
      seed: seed of `np.random.default_rng`.
      root: folder that `names` are relative to (e.g. `CategoryData.root`).

    Returns:
      :class:`SupportSet`.

    Raises:
      EmptyTrainSetError: empty pool.
      NotEnoughShotsError: `k` exceeds the pool size.
      ValueError: `k < 1`.
    """
    files = sorted(Path(p) for p in pool)
    if k < 1:
        raise ValueError(f"k (shots) must be >= 1, got {k}.")
    if not files:
        raise EmptyTrainSetError(
            "The support pool is empty. Fix: put defect-free images in train/good."
        )
    if k > len(files):
        raise NotEnoughShotsError(
            f"Asked for {k} shots but only {len(files)} good training image(s) exist "
            f"(e.g. in {files[0].parent}). Fix: use k <= {len(files)}, or add more "
            "defect-free images to train/good."
        )
    order = np.random.default_rng(seed).permutation(len(files))[:k]
    paths = tuple(files[i] for i in order)
    if root is None:
        names = tuple(p.name for p in paths)
    else:
        names = tuple(p.relative_to(Path(root)).as_posix() for p in paths)
    return SupportSet(seed=int(seed), k=int(k), paths=paths, names=names)


def support_sets(
    pool: Sequence[str | Path],
    k: int,
    seeds: Iterable[int] = DEFAULT_SEEDS,
    root: str | Path | None = None,
) -> list[SupportSet]:
    """One :class:`SupportSet` per seed (see :func:`sample_support`)."""
    return [sample_support(pool, k, s, root=root) for s in seeds]


def mean_std(values: Sequence[float], ddof: int = 0) -> tuple[float, float]:
    """Mean and standard deviation over seeds.

    Args:
      values: one number per seed.
      ddof: 0 (default, `np.std`, as most few-shot tables report) or 1.

    Returns:
      `(mean, std)`; std is 0.0 for a single value with `ddof=0`.

    Raises:
      ValueError: empty input or NaN values.
    """
    arr = np.asarray(values, np.float64)
    if arr.size == 0:
        raise ValueError("mean_std needs at least one value (one per seed).")
    if arr.size <= ddof:
        raise ValueError(f"{arr.size} value(s) are too few for ddof={ddof}.")
    if np.isnan(arr).any():
        raise ValueError(f"mean_std got NaN among {arr.tolist()}; a seed's run failed.")
    return float(arr.mean()), float(arr.std(ddof=ddof))


def aggregate_seeds(
    results: Sequence[Mapping[str, float]], ddof: int = 0
) -> dict[str, tuple[float, float]]:
    """Mean and std per metric over per-seed result dicts.

    Args:
      results: one `{metric: value}` dict per seed, all with the same keys.
      ddof: see :func:`mean_std`.

    Returns:
      `{metric: (mean, std)}` in the key order of the first result.

    Raises:
      ValueError: empty input or differing keys.
    """
    if not results:
        raise ValueError("aggregate_seeds needs at least one per-seed result.")
    keys = list(results[0])
    for i, r in enumerate(results):
        if set(r) != set(keys):
            raise ValueError(f"Result {i} has keys {sorted(r)}, expected {sorted(keys)}.")
    return {key: mean_std([r[key] for r in results], ddof=ddof) for key in keys}
