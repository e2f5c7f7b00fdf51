"""PatchCore aggregation against a float64 numpy transcription of the official code."""

import math

import jax
import numpy as np
import pytest

from protorefine_jax.features import aggregation as ag

RTOL, ATOL = 1e-5, 1e-5


# ---------------------------------------------------------------- numpy reference
def np_adaptive_avg_pool1d(v, out):
    """torch adaptive_avg_pool1d: output i averages v[floor(i*L/out) : ceil((i+1)*L/out)]."""
    length = len(v)
    res = np.empty(out)
    for i in range(out):
        lo, hi = math.floor(i * length / out), math.ceil((i + 1) * length / out)
        res[i] = v[lo:hi].mean()
    return res


def np_bilinear(img, out_h, out_w):
    """torch upsample_bilinear2d, align_corners=False, for one [H, W] channel (loops)."""
    in_h, in_w = img.shape

    def coords(o, n_in, n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(src)
        i1 = i0 + (1 if i0 < n_in - 1 else 0)
        return i0, i1, src - i0

    res = np.empty((out_h, out_w))
    for y in range(out_h):
        y0, y1, ly = coords(y, in_h, out_h)
        for x in range(out_w):
            x0, x1, lx = coords(x, in_w, out_w)
            res[y, x] = (1 - ly) * ((1 - lx) * img[y0, x0] + lx * img[y0, x1]) + ly * (
                (1 - lx) * img[y1, x0] + lx * img[y1, x1]
            )
    return res


def np_unfold(f):
    """torch.nn.Unfold(3, padding=1) on one [C, H, W] map -> [H, W, C, 3, 3]."""
    c, h, w = f.shape
    fp = np.pad(f, ((0, 0), (1, 1), (1, 1)))
    out = np.empty((h, w, c, 3, 3))
    for y in range(h):
        for x in range(w):
            out[y, x] = fp[:, y : y + 3, x : x + 3]
    return out


def np_official(f8, f16, pretrain_dim, target_dim):
    """PatchCore._embed for one image: f8 [C8, h, w], f16 [C16, h', w'] -> [h*w, target]."""
    h, w = f8.shape[1:]
    u8 = np_unfold(f8)
    u16 = np_unfold(f16)  # unfold first, at stride-16 resolution
    c16 = f16.shape[0]
    up = np.empty((h, w, c16, 3, 3))
    for c in range(c16):
        for ky in range(3):
            for kx in range(3):
                up[:, :, c, ky, kx] = np_bilinear(u16[:, :, c, ky, kx], h, w)
    rows = []
    for y in range(h):
        for x in range(w):
            stacked = np.stack(
                [
                    np_adaptive_avg_pool1d(u8[y, x].reshape(-1), pretrain_dim),
                    np_adaptive_avg_pool1d(up[y, x].reshape(-1), pretrain_dim),
                ]
            )
            rows.append(np_adaptive_avg_pool1d(stacked.reshape(-1), target_dim))
    return np.stack(rows)


def np_simple(f8, f16):
    h, w = f8.shape[1:]
    m8 = np_unfold(f8).mean(axis=(3, 4))  # zero-padded 3x3 mean, [h, w, C8]
    m16 = np_unfold(f16).mean(axis=(3, 4))
    up = np.stack([np_bilinear(m16[..., c], h, w) for c in range(m16.shape[-1])], -1)
    return np.concatenate([m8, up], -1).reshape(h * w, -1)


def _maps(c8, c16, h=6, w=6, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    f8 = rng.standard_normal((batch, h, w, c8)).astype(np.float32)
    f16 = rng.standard_normal((batch, h // 2, w // 2, c16)).astype(np.float32)
    return f8, f16


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "length,out",
    [(9, 9), (36, 12), (4608, 1024), (1008, 360), (1080, 432), (10, 7), (7, 10), (2, 5)],
)
def test_adaptive_avg_pool_matches_torch_definition(length, out):
    v = np.random.default_rng(length).standard_normal((3, length))
    got = np.asarray(ag.adaptive_avg_pool_1d(v.astype(np.float32), out))
    want = np.stack([np_adaptive_avg_pool1d(row, out) for row in v])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("src,dst", [((4, 4), (8, 8)), ((3, 5), (6, 10)), ((5, 4), (7, 3))])
def test_bilinear_resize_matches_torch(src, dst):
    x = np.random.default_rng(0).standard_normal((2, *src, 3))
    got = np.asarray(ag.bilinear_resize(x.astype(np.float32), dst))
    for b in range(2):
        for c in range(3):
            np.testing.assert_allclose(
                got[b, ..., c], np_bilinear(x[b, ..., c], *dst), rtol=RTOL, atol=ATOL
            )


def test_unfold_matches_torch_layout():
    f8, _ = _maps(3, 3, h=4, w=5)
    got = np.asarray(ag.unfold_3x3(f8))
    want = np_unfold(f8[1].transpose(2, 0, 1)).reshape(4, 5, 27)
    np.testing.assert_array_equal(got[1], want)


@pytest.mark.parametrize(
    "c8,c16,pretrain,target",
    [
        (8, 16, 16, 16),  # WRN-like: q = 2 and q = 1 fast paths, halves pooled separately
        (4, 7, 36, 36),  # Lite-like default: identity at stride 8, generic at stride 16
        (4, 7, 36, 72),  # target = 2 * pretrain: no final pooling
        (5, 6, 10, 7),  # nothing divides: generic paths everywhere
        (3, 5, 40, 30),  # repetition (pretrain > 9*c8) still matches torch
    ],
)
def test_official_aggregate_matches_numpy_reference(c8, c16, pretrain, target):
    f8, f16 = _maps(c8, c16)
    got = np.asarray(
        jax.jit(ag.official_aggregate, static_argnums=(2, 3))(f8, f16, pretrain, target)
    )
    assert got.shape == (2, 36, target)
    for b in range(2):
        want = np_official(
            f8[b].transpose(2, 0, 1).astype(np.float64),
            f16[b].transpose(2, 0, 1).astype(np.float64),
            pretrain,
            target,
        )
        np.testing.assert_allclose(got[b], want, rtol=RTOL, atol=ATOL)


def test_simple_aggregate_matches_numpy_reference():
    f8, f16 = _maps(4, 6)
    got = np.asarray(jax.jit(ag.simple_aggregate)(f8, f16))
    assert got.shape == (2, 36, 10)
    for b in range(2):
        want = np_simple(f8[b].transpose(2, 0, 1), f16[b].transpose(2, 0, 1))
        np.testing.assert_allclose(got[b], want, rtol=RTOL, atol=ATOL)


def test_256px_grid_gives_1024_patches():
    f8, f16 = _maps(2, 3, h=32, w=32, batch=1)
    assert ag.official_aggregate(f8, f16, 18, 18).shape == (1, 1024, 18)
    assert ag.simple_aggregate(f8, f16).shape == (1, 1024, 5)
