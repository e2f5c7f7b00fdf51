"""Patch scores, image scores and anomaly maps (docs/method.md, "Scoring"; paper Eq. 6).

Patch score `s_j = min_r d(F_j, r)` over the scoring bank; image score
`max_j s_j`; map = bilinear upsample of the `[h, w]` score grid to the image
size, then a Gaussian blur (sigma 4, reflect padding). Upsampling and blur are
both separable linear maps, so the map is `A S B^T` with constant
`A = blur_H @ up_H [H, h]` and `B = blur_W @ up_W [W, w]`: two small matmuls
instead of a resize and a 33-tap convolution over the full image.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from protorefine_jax.config import MapConfig, RefineConfig
from protorefine_jax.gram import GramSystem, refined_rows, refined_sq_norms

_EPS = 1e-12

# Query patches per block of the refined scoring (`refined_patch_scores`):
# one `[B, 128, m]` block is 4 MiB at batch 8 and m = 1024 (L3-resident on
# CPU) and still a large product on a GPU. A speed knob only; no number
# depends on it.
SCORE_BLOCK_ROWS = 128


def _min_distance(dots, q_sq, r_sq, distance: str, scale_sq=1.0) -> Float[Array, " m"]:
    """`min_k d(q_j, r_k)` from inner products `dots [m, k]` and squared norms.

    Squared-Euclidean distances are multiplied by `scale_sq` (the rescaling
    of `gram.gram_system`) to return to the caller's units.
    """
    if distance == "sqeuclidean":
        d = q_sq[:, None] + r_sq[None, :] - 2.0 * dots
        return jnp.maximum(jnp.min(d, axis=-1), 0.0) * scale_sq
    # Cosine: queries and prototypes are unit rows; refined ones are not.
    cos = dots / jnp.sqrt(jnp.maximum(q_sq[:, None] * r_sq[None, :], _EPS))
    # Rounding can push a cosine past 1; a negative distance would break
    # harmonic means downstream (WinCLIP window aggregation).
    return jnp.maximum(0.5 * (1.0 - jnp.max(cos, axis=-1)), 0.0)


def base_patch_scores(sys: GramSystem, config: RefineConfig) -> Float[Array, " m"]:
    """Host-method scores: distance of each patch to its nearest prototype."""
    # Empty ring-buffer slots (weight 0) are no prototypes: push them away.
    m_sq = jnp.where(sys.weights > 0, sys.m_sq, jnp.inf)
    if config.distance == "cosine":
        dots = jnp.where(sys.weights > 0, sys.cross, -jnp.inf)
        # The rows are unit up to rounding (bfloat16: 2^-8); use their norms.
        r_sq = jnp.where(sys.weights > 0, sys.m_sq, 1.0)
        return _min_distance(dots, sys.f_sq, r_sq, config.distance)
    return _min_distance(sys.cross, sys.f_sq, m_sq, config.distance, sys.scale_sq)


def refined_patch_scores(
    sys: GramSystem,
    w: Float[Array, "m n"],
    config: RefineConfig,
    refined_sq: Float[Array, " m"] | None = None,
) -> Float[Array, " m"]:
    """Scores against the refined prototypes `R = W M` (or `M` union `R`).

    The `[m, m]` distances are formed in equal blocks of at most
    `SCORE_BLOCK_ROWS` query patches (a `lax.map` over row blocks, each
    block's min taken before the next): under `vmap` the whole `[B, m, m]`
    array (32 MiB at batch 8, m = 1024) would leave the CPU caches and cost
    3x the product itself (docs/method.md, "Batching"). Each entry is computed
    as in the unblocked product: the scores are the same numbers. In the
    feature form (`gram.uses_feature_form`) the inner products are
    `F R^T` with `R = W M` formed once (`m n c + m^2 c` flops, not `m^2 n`).

    Args:
      sys: Gram system of the query.
      w: `[m, n]` refined transform.
      config: distance and `bank` mode.
      refined_sq: `[m]` `||R_j||^2` if the caller has them
        (`Refinement.refined_sq`); computed (one `[m, n] x [n, n]` product)
        when None.

    Returns:
      `[m]` patch scores.
    """
    r_sq = refined_sq_norms(sys, w) if refined_sq is None else refined_sq
    m = sys.cross.shape[0]
    blocks = -(-m // SCORE_BLOCK_ROWS)
    rows = -(-m // blocks)  # equal blocks of at most SCORE_BLOCK_ROWS rows
    pad = blocks * rows - m  # < blocks
    # Zero rows pad the last block (finite, cut off below).
    if sys.feature_form:
        left, right = sys.query_rows, refined_rows(sys, w)  # [m, c], [m, c]
    else:
        left, right = sys.cross, w  # [m, n], [m, n]
    left = jnp.pad(left, ((0, pad), (0, 0))).reshape(blocks, rows, -1)
    f_sq = jnp.pad(sys.f_sq, (0, pad)).reshape(blocks, rows)

    def block(args):
        left_b, f_sq_b = args
        return _min_distance(left_b @ right.T, f_sq_b, r_sq, config.distance, sys.scale_sq)

    scores = jax.lax.map(block, (left, f_sq)).reshape(-1)[:m]
    if config.bank == "union":
        scores = jnp.minimum(scores, base_patch_scores(sys, config))
    return scores


def gaussian_blur_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """`[size, size]` matrix of a 1-D Gaussian blur with reflect padding.

    Matches `scipy.ndimage.gaussian_filter1d(mode="reflect", truncate=4)`:
    kernel radius `int(truncate * sigma + 0.5)` (16 for sigma 4, 33 taps),
    and "reflect" mirrors about the edge, repeating the edge sample.

    Args:
      size: signal length.
      sigma: standard deviation in samples (0 gives the identity).
      truncate: kernel half-width in sigmas.

    Returns:
      float64 matrix `K` with `blurred = K @ signal`.
    """
    if sigma == 0:
        return np.eye(size)
    radius = int(truncate * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (taps / sigma) ** 2)
    weights /= weights.sum()
    mat = np.zeros((size, size))
    period = 2 * size
    for i in range(size):
        j = (i + taps) % period
        j = np.where(j >= size, period - 1 - j, j)
        np.add.at(mat[i], j, weights)
    return mat


def _upsample_matrix(size_in: int, size_out: int) -> np.ndarray:
    """`[size_out, size_in]` matrix of `jax.image.resize(..., "bilinear")`."""
    with jax.ensure_compile_time_eval():
        eye = jnp.eye(size_in, dtype=jnp.float32)
        up = jax.image.resize(eye, (size_out, size_in), method="bilinear")
    return np.asarray(up, np.float64)


@functools.lru_cache(maxsize=32)
def map_operators(
    grid_shape: tuple[int, int], image_size: tuple[int, int], sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Constant `A [H, h]` and `B [W, w]` with `map = A @ grid @ B.T`.

    Args:
      grid_shape: patch grid `(h, w)`.
      image_size: map size `(H, W)`.
      sigma: blur sigma in map pixels.

    Returns:
      float32 operators `(A, B)`.
    """
    ops = []
    for small, big in zip(grid_shape, image_size, strict=True):
        op = gaussian_blur_matrix(big, sigma) @ _upsample_matrix(small, big)
        ops.append(op.astype(np.float32))
    return ops[0], ops[1]


def maps_of_grids(
    grids: np.ndarray, grid_shape: tuple[int, int], image_size: tuple[int, int], sigma: float
) -> np.ndarray:
    """`[T, m]` patch scores -> `[T, H, W]` float32 maps on the host, as `anomaly_map` makes them.

    For scores fused outside the compiled detector (stream calibration, studies).
    """
    a, b = map_operators(tuple(grid_shape), tuple(image_size), sigma)
    g = np.asarray(grids, np.float32).reshape(-1, *grid_shape)
    return np.einsum("Hh,thw,Ww->tHW", a, g, b, optimize=True).astype(np.float32)


def grid_shape_of(m: int, grid_shape: tuple[int, int] | None) -> tuple[int, int]:
    """`(h, w)` of `m` patches: `grid_shape` if given, else the square root."""
    if grid_shape is not None:
        if grid_shape[0] * grid_shape[1] != m:
            raise ValueError(f"grid_shape {grid_shape} does not hold m={m} patches.")
        return tuple(grid_shape)
    side = math.isqrt(m)
    if side * side != m:
        raise ValueError(
            f"m={m} patches do not form a square grid; set RefineConfig.grid_shape=(h, w)."
        )
    return side, side


def anomaly_map(
    scores: Float[Array, " m"], config: RefineConfig | MapConfig
) -> Float[Array, "H W"]:
    """Upsampled, blurred anomaly map of one query (docs/method.md, "Scoring").

    Args:
      scores: `[m]` patch scores, row-major over the grid.
      config: the rendering: a `MapConfig`, or a `RefineConfig`'s map fields
        (`grid_shape`, `image_size`, `blur_sigma`; the same map either way).

    Returns:
      `[H, W]` map, or the raw `[h, w]` grid when `config.image_size` is None.
    """
    h, w = grid_shape_of(scores.shape[0], config.grid_shape)
    grid = scores.reshape(h, w)
    if config.image_size is None:
        return grid
    a, b = map_operators((h, w), tuple(config.image_size), float(config.blur_sigma))
    return jnp.asarray(a, grid.dtype) @ grid @ jnp.asarray(b, grid.dtype).T
