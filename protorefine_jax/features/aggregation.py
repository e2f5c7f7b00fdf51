"""PatchCore patch-feature aggregation of a stride-8 and a stride-16 feature map.

Two modes:

- ``official_aggregate``: the official PatchCore pipeline (Roth et al. 2022,
  ``patchcore/patchcore.py`` and ``common.py``): each map is unfolded into
  zero-padded 3x3 neighbourhoods (``torch.nn.Unfold(3, padding=1)``, flattened
  channel-major as ``[C, 3, 3]``), the stride-16 neighbourhoods are bilinearly
  upsampled (``align_corners=False``) to the stride-8 grid, each stage's
  ``C*9`` vector is adaptive-average-pooled to ``pretrain_dim``, the two are
  stacked to ``[2, pretrain_dim]``, flattened and pooled to ``target_dim``.
- ``simple_aggregate``: 3x3 zero-padded mean of each map, stride-16 map upsampled
  bilinearly, channels concatenated (``c8 + c16``).

Both take one batch of NHWC maps and return ``[B, h*w, c]`` with patches in
row-major ``(y, x)`` order. Resampling matrices and pooling indices are built
with numpy at trace time (static shapes), so the jitted graph only holds small
constants.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def adaptive_pool_plan(length: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather indices and weights of ``adaptive_avg_pool1d(length -> out_size)``.

    Output ``i`` averages ``x[floor(i*L/out) : ceil((i+1)*L/out)]`` (PyTorch's
    definition). When ``out_size > length`` windows overlap and values repeat.

    Returns:
      ``idx [out_size, k]`` int32 and ``weight [out_size, k]`` float32 with
      ``k`` the longest window; padding slots have weight 0.
    """
    i = np.arange(out_size)
    start = (i * length) // out_size
    end = -((-(i + 1) * length) // out_size)  # ceil
    k = int((end - start).max())
    idx = start[:, None] + np.arange(k)[None, :]
    valid = idx < end[:, None]
    weight = np.where(valid, 1.0 / (end - start)[:, None], 0.0).astype(np.float32)
    return np.minimum(idx, length - 1).astype(np.int32), weight


def adaptive_avg_pool_1d(x: jax.Array, out_size: int) -> jax.Array:
    """``torch.nn.functional.adaptive_avg_pool1d`` over the last axis.

    Args:
      x: ``[..., L]``.
      out_size: output length.

    Returns:
      ``[..., out_size]``.
    """
    length = x.shape[-1]
    if length == out_size:
        return x
    if length % out_size == 0:
        return x.reshape(*x.shape[:-1], out_size, length // out_size).mean(-1)
    idx, weight = adaptive_pool_plan(length, out_size)
    return jnp.einsum("...ok,ok->...o", x[..., idx], weight)


@functools.cache
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Row-stochastic ``[out, in]`` matrix of ``F.interpolate(bilinear, align_corners=False)``.

    Source coordinate ``(o + 0.5) * in / out - 0.5``, clamped at 0; the upper
    neighbour is clamped at ``in - 1``, as in PyTorch's ``upsample_bilinear2d``.
    """
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = src - i0
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), i0), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), i1), frac)
    return m.astype(np.float32)


def bilinear_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of ``[B, h, w, C]`` to ``[B, H, W, C]`` with PyTorch semantics.

    ``F.interpolate(mode="bilinear", align_corners=False)``, no antialiasing.
    """
    if size == (2 * x.shape[1], 2 * x.shape[2]):
        return _upsample2x_axis(_upsample2x_axis(x, 1), 2)
    my = jnp.asarray(bilinear_matrix(x.shape[1], size[0]))
    mx = jnp.asarray(bilinear_matrix(x.shape[2], size[1]))
    x = jnp.einsum("Yy,byxc->bYxc", my, x)
    return jnp.einsum("Xx,byxc->byXc", mx, x)


def _upsample2x_axis(x: jax.Array, axis: int) -> jax.Array:
    """Exact 2x ``align_corners=False`` bilinear upsampling along one axis.

    ``out[2i] = x[i] - (x[i] - x[i-1]) / 4`` and ``out[2i+1] = x[i] + (x[i+1] - x[i]) / 4``
    with the neighbours clamped at the borders (PyTorch's edge rule), written
    with shifts so XLA fuses it instead of running a small matmul.
    """
    n = x.shape[axis]
    take = lambda start, stop: jax.lax.slice_in_dim(x, start, stop, axis=axis)
    prev = jnp.concatenate([take(0, 1), take(0, n - 1)], axis=axis)
    nxt = jnp.concatenate([take(1, n), take(n - 1, n)], axis=axis)
    even, odd = 0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt
    out = jnp.stack([even, odd], axis=axis + 1)
    return out.reshape(*x.shape[:axis], 2 * n, *x.shape[axis + 1 :])


def unfold_3x3(x: jax.Array) -> jax.Array:
    """Zero-padded 3x3 neighbourhoods, flattened like ``torch.nn.Unfold`` (``[C, 3, 3]``).

    Args:
      x: ``[B, h, w, C]``.

    Returns:
      ``[B, h, w, C*9]``; entry ``c*9 + 3*dy + dx`` is ``x[y + dy - 1, x + dx - 1, c]``.
    """
    _, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifts = [xp[:, dy : dy + h, dx : dx + w, :] for dy in range(3) for dx in range(3)]
    return jnp.stack(shifts, axis=-1).reshape(*x.shape[:3], c * 9)  # [B, h, w, C, 9]


def unfold_pool(x: jax.Array, out_size: int) -> jax.Array:
    """``adaptive_avg_pool_1d(unfold_3x3(x), out_size)`` without materialising the unfold.

    When ``out_size`` is a multiple of ``C`` every pooling window lies inside one
    channel's 3x3 neighbourhood and the pattern repeats per channel, so each
    output is a fixed weighted sum of the 9 shifted maps (for WRN-50-2 with
    ``pretrain_dim`` 1024 this is the whole computation). Otherwise the unfold
    is materialised and pooled generically.

    Args:
      x: ``[B, h, w, C]``.
      out_size: pooled length of the ``C*9`` neighbourhood vector.

    Returns:
      ``[B, h, w, out_size]``.
    """
    b, h, w, c = x.shape
    if out_size % c or out_size > 9 * c:
        return adaptive_avg_pool_1d(unfold_3x3(x), out_size)
    q = out_size // c
    idx, weight = adaptive_pool_plan(9, q)  # one channel's 9 values -> q outputs
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shift = lambda j: xp[:, j // 3 : j // 3 + h, j % 3 : j % 3 + w, :]
    outs = [
        sum(shift(int(j)) * float(wt) for j, wt in zip(idx[t], weight[t], strict=True) if wt)
        for t in range(q)
    ]
    return jnp.stack(outs, axis=-1).reshape(b, h, w, c * q)  # [B, h, w, C, q]


def official_aggregate(
    f8: jax.Array, f16: jax.Array, pretrain_dim: int, target_dim: int
) -> jax.Array:
    """Official PatchCore aggregation of a stride-8 and a stride-16 map.

    Upsampling and the per-stage channel pooling are linear maps on different
    axes, so they commute; the stride-16 neighbourhoods are pooled to
    ``pretrain_dim`` *before* upsampling (up to float rounding identical to the
    official order, and ``C*9 / pretrain_dim`` times less work).

    Args:
      f8: ``[B, h, w, c8]`` stride-8 map.
      f16: ``[B, h', w', c16]`` stride-16 map.
      pretrain_dim: per-stage pooled dimension.
      target_dim: final dimension.

    Returns:
      ``[B, h*w, target_dim]`` patch features.
    """
    b, h, w, _ = f8.shape
    p8 = unfold_pool(f8, pretrain_dim)  # [B, h, w, P]
    p16 = unfold_pool(f16, pretrain_dim)  # [B, h', w', P]
    r = 2 * pretrain_dim / target_dim
    if r == int(r) and pretrain_dim % int(r) == 0:
        # Every final window lies inside one stage's half of the stacked vector:
        # pool each half before upsampling (all maps here are linear and commute).
        half = target_dim // 2
        p8 = adaptive_avg_pool_1d(p8, half)
        p16 = bilinear_resize(adaptive_avg_pool_1d(p16, half), (h, w))
        out = jnp.concatenate([p8, p16], axis=-1)
    else:
        p16 = bilinear_resize(p16, (h, w))  # [B, h, w, P]
        stacked = jnp.concatenate([p8, p16], axis=-1)  # [B, h, w, 2P] == stack(dim=1).reshape
        out = adaptive_avg_pool_1d(stacked, target_dim)
    return out.reshape(b, h * w, target_dim)


def simple_aggregate(f8: jax.Array, f16: jax.Array) -> jax.Array:
    """3x3 zero-padded mean of each stage, stride-16 upsampled, channels concatenated.

    Args:
      f8: ``[B, h, w, c8]`` stride-8 map.
      f16: ``[B, h', w', c16]`` stride-16 map.

    Returns:
      ``[B, h*w, c8 + c16]`` patch features.
    """
    b, h, w, c8 = f8.shape
    # unfold_pool to C outputs == zero-padded 3x3 mean (count_include_pad), fused.
    a8 = unfold_pool(f8, c8)
    a16 = bilinear_resize(unfold_pool(f16, f16.shape[-1]), (h, w))
    out = jnp.concatenate([a8, a16], axis=-1)
    return out.reshape(b, h * w, out.shape[-1])
