"""Sliding windows over the ViT patch grid and WinCLIP's window-to-patch aggregation.

A window of size `k` covers `k x k` patches; windows slide with stride one
patch, so an `h x w` grid has `(h - k + 1) * (w - k + 1)` windows (15x15 grid:
196 windows of 2x2, 169 of 3x3). Windows and the patches inside a window are
both ordered row-major (as `torch.nn.functional.unfold`, which WinCLIP uses).

Each patch gets one score per scale by aggregating the scores of the windows
that cover it: harmonic mean in WinCLIP (Jeong et al. 2023, Sec. 4.2), or the
arithmetic mean as an option. Index tables are numpy constants built at trace
time; the aggregation is a jittable scatter-add for ONE image.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import numpy as np
from jax import Array

Aggregation = Literal["harmonic", "mean"]


def window_grid(grid_shape: tuple[int, int], size: int) -> tuple[int, int]:
    """Grid of window positions `(h - size + 1, w - size + 1)`.

    Raises:
      ValueError: if the window does not fit in the grid.
    """
    h, w = grid_shape
    if size < 1 or size > h or size > w:
        raise ValueError(f"window size {size} does not fit in the patch grid {grid_shape}.")
    return (h - size + 1, w - size + 1)


def window_indices(grid_shape: tuple[int, int], size: int) -> np.ndarray:
    """Flat patch indices inside each window.

    Args:
      grid_shape: patch grid `(h, w)`.
      size: window side `k` in patches (stride 1).

    Returns:
      int32 `[n_windows, k * k]`; row `r` lists the patches (row-major,
      index `i * w + j`) of window `r` (windows row-major by top-left corner).
    """
    w = grid_shape[1]
    gh, gw = window_grid(grid_shape, size)
    top = np.arange(gh)[:, None] * w + np.arange(gw)[None, :]  # [gh, gw]
    offsets = np.arange(size)[:, None] * w + np.arange(size)[None, :]  # [k, k]
    return (top.reshape(-1, 1) + offsets.reshape(1, -1)).astype(np.int32)


def coverage_counts(grid_shape: tuple[int, int], size: int) -> np.ndarray:
    """Number of windows covering each patch, `[h, w]` int32."""
    counts = np.bincount(window_indices(grid_shape, size).ravel(), minlength=np.prod(grid_shape))
    return counts.reshape(grid_shape).astype(np.int32)


def aggregate_windows(
    window_scores: Array,
    grid_shape: tuple[int, int],
    size: int,
    how: Aggregation = "harmonic",
) -> Array:
    """Patch scores from the scores of the windows covering each patch (one image).

    Harmonic: `count_p / sum_{r covers p} 1 / s_r`. A zero window score makes
    every patch it covers zero (the harmonic mean's limit), with no NaN: the
    reciprocals are scatter-added, never multiplied by an incidence matrix.

    Args:
      window_scores: `[n_windows]` scores of one image, in `window_indices` order.
      grid_shape: patch grid `(h, w)`.
      size: window side `k`.
      how: `"harmonic"` (WinCLIP) or `"mean"`.

    Returns:
      `[h, w]` patch scores.
    """
    idx = window_indices(grid_shape, size)  # [n_windows, k*k]
    n_patches = grid_shape[0] * grid_shape[1]
    if window_scores.shape != (idx.shape[0],):
        raise ValueError(
            f"expected {idx.shape[0]} window scores for {size}x{size} windows on "
            f"{grid_shape}, got shape {window_scores.shape}."
        )
    counts = jnp.asarray(coverage_counts(grid_shape, size).ravel(), window_scores.dtype)
    if how == "harmonic":
        values = 1.0 / window_scores
    elif how == "mean":
        values = window_scores
    else:
        raise ValueError(f"aggregation must be 'harmonic' or 'mean', got {how!r}.")
    spread = jnp.broadcast_to(values[:, None], idx.shape)  # [n_windows, k*k]
    sums = jnp.zeros((n_patches,), window_scores.dtype).at[idx.ravel()].add(spread.ravel())
    out = counts / sums if how == "harmonic" else sums / counts
    return out.reshape(grid_shape)
