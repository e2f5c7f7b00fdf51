"""Greedy k-center coreset (Sener & Savarese 2017), as PatchCore samples its bank.

The loop carries the running min-distance vector `[N]` (never an `N x N`
matrix), so memory is linear in the number of support patches.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def coreset_size(num_features: int, alpha: float) -> int:
    """Bank size `n = max(1, floor(alpha * N))` (docs/method.md, "Objects").

    Args:
      num_features: number of candidate rows `N`.
      alpha: sampling ratio in `(0, 1]`.

    Returns:
      The static bank size.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"coreset ratio alpha must lie in (0, 1], got {alpha}.")
    if num_features < 1:
        raise ValueError("cannot build a coreset from an empty feature set (N = 0).")
    # The small epsilon keeps e.g. 0.05 * 4096 = 204.8 from flooring to 204.79...
    return max(1, math.floor(alpha * num_features + 1e-9))


def projection_matrix(dim: int, projection_dim: int = 128, seed: int = 0) -> Float[Array, "c d"]:
    """Gaussian Johnson-Lindenstrauss matrix `[c, d]`, entries `N(0, 1/d)`.

    Args:
      dim: feature dimension `c`.
      projection_dim: target dimension `d`.
      seed: PRNG seed; fixed so that a bank is reproducible.

    Returns:
      The projection matrix, float32.
    """
    key = jax.random.PRNGKey(seed)
    return jax.random.normal(key, (dim, projection_dim), jnp.float32) / math.sqrt(projection_dim)


@functools.partial(jax.jit, static_argnames=("n",))
def greedy_coreset_indices(
    points: Float[Array, "N d"], n: int, start_index: int | Int[Array, ""] = 0
) -> Int[Array, " n"]:
    """Greedy k-center selection on already projected points.

    Each step adds the point farthest (squared Euclidean) from the selected
    set; ties go to the lowest index, as `numpy.argmax`.

    Args:
      points: `[N, d]` candidates.
      n: number of indices to select (static).
      start_index: first selected index.

    Returns:
      `[n]` int32 indices into `points`, in selection order.
    """
    sq_norms = jnp.sum(points * points, axis=1)  # [N]

    def dist_to(i):
        p = points[i]
        # Full float32 on GPUs too (TF32 would reorder near-ties).
        dots = jnp.matmul(points, p, precision=jax.lax.Precision.HIGHEST)
        return jnp.maximum(sq_norms - 2.0 * dots + jnp.dot(p, p), 0.0)

    start = jnp.asarray(start_index, jnp.int32)
    indices = jnp.zeros((n,), jnp.int32).at[0].set(start)

    def body(k, carry):
        indices, min_dist = carry
        nxt = jnp.argmax(min_dist).astype(jnp.int32)
        return indices.at[k].set(nxt), jnp.minimum(min_dist, dist_to(nxt))

    indices, _ = jax.lax.fori_loop(1, n, body, (indices, dist_to(start)))
    return indices


def greedy_coreset(
    features: Float[Array, "N c"],
    alpha: float,
    *,
    projection_dim: int = 128,
    seed: int = 0,
    start_index: int = 0,
) -> Int[Array, " n"]:
    """Indices of a greedy k-center coreset of `features` (docs/method.md, "Objects").

    Distances are measured after a fixed Gaussian random projection to
    `projection_dim` dimensions (skipped when `c <= projection_dim`, where it
    cannot reduce work); the bank keeps the unprojected rows.

    Args:
      features: `[N, c]` support patch features.
      alpha: ratio in `(0, 1]`; the bank holds `max(1, floor(alpha * N))` rows.
      projection_dim: JL target dimension (128 by default).
      seed: seed of the projection.
      start_index: first selected row (default 0).

    Returns:
      `[n]` int32 row indices.
    """
    num, dim = features.shape
    n = coreset_size(num, alpha)
    if not 0 <= start_index < num:
        raise ValueError(f"start_index must lie in [0, {num}), got {start_index}.")
    points = features
    if dim > projection_dim:
        proj = projection_matrix(dim, projection_dim, seed)
        points = jnp.matmul(features, proj, precision=jax.lax.Precision.HIGHEST)
    return greedy_coreset_indices(points, n, start_index)
