"""CLIP / WinCLIP input resize: antialiased bicubic as anomalib, vs a float64 numpy reference.

anomalib's WinCLIP resizes float images with torchvision
`Resize((240, 240), bicubic, antialias=True)`, i.e. torch's antialiased
bicubic: Keys cubic with a = -0.5, half-pixel centres, the kernel support
widened by the shrink factor, weights renormalised at the borders (PIL's
algorithm). The reference below is that formula written out in float64.

Tolerances: the float path within 1e-3 grey levels (PIL keeps a float32
intermediate between the two passes); the uint8 path (the data edge stores
uint8) within one grey level of round(clip(reference)).
"""

import numpy as np
import pytest
from PIL import Image

from protorefine_jax.data.imageio import read_image
from protorefine_jax.features.preprocess import resize_rgb


def _keys_cubic(x, a=-0.5):
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return a * (((x - 5.0) * x + 8.0) * x - 4.0)
    return 0.0


def _resize_matrix(n_in, n_out):
    """`[n_out, n_in]` weights of antialiased bicubic resampling along one axis."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)  # antialias: widen the kernel when shrinking
    support = 2.0 * stretch
    out = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        w = np.array([_keys_cubic((j + 0.5 - centre) / stretch) for j in range(lo, hi)])
        out[i, lo:hi] = w / w.sum()
    return out


def reference_bicubic(image, size):
    """float64 `[size, size, C]` antialiased bicubic resize of `[H, W, C]`, unclipped."""
    x = np.asarray(image, np.float64)
    rows = _resize_matrix(x.shape[0], size)
    cols = _resize_matrix(x.shape[1], size)
    return np.einsum("ih,hwc,jw->ijc", rows, x, cols)


def _images(rng):
    noise = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    step = np.zeros((100, 90, 3), np.uint8)
    step[:, 45:] = 255  # sharp edge: bicubic overshoots, the uint8 path clips
    step[30:60, :, 1] = 200
    small = rng.integers(0, 256, (10, 7, 3), dtype=np.uint8)  # upscaling: no widening
    return [noise, step, small]


@pytest.mark.parametrize("size", [24, 29])
def test_bicubic_float_path_matches_reference(rng, size):
    for image in _images(rng):
        got = resize_rgb(image.astype(np.float32) / 255.0, size, resample="bicubic")
        want = np.clip(reference_bicubic(image, size), 0.0, 255.0)
        assert got.dtype == np.float32 and got.shape == (size, size, 3)
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


def test_bicubic_uint8_path_matches_reference_within_one_level(rng):
    for image in _images(rng):
        got = resize_rgb(image, 24, resample="bicubic")
        ref = reference_bicubic(image, 24)
        want = np.round(np.clip(ref, 0.0, 255.0))
        assert got.dtype == np.uint8
        diff = np.abs(got.astype(np.float64) - want)
        assert diff.max() <= 1.0 and np.mean(diff == 0) > 0.99
    # The step image overshoots in float (what anomalib keeps) and is clipped here.
    ref = reference_bicubic(_images(rng)[1], 24)
    assert ref.max() > 255.5 and ref.min() < -0.5


def test_bicubic_is_not_bilinear(rng):
    image = _images(rng)[0]
    bicubic = resize_rgb(image, 24, resample="bicubic").astype(np.float64)
    bilinear = resize_rgb(image, 24).astype(np.float64)
    assert np.abs(bicubic - bilinear).max() > 5.0
    assert np.abs(bicubic - np.round(np.clip(reference_bicubic(image, 24), 0, 255))).max() <= 1


def test_read_image_bicubic_and_bad_filter(tmp_path, rng):
    image = _images(rng)[0]
    path = tmp_path / "x.png"
    Image.fromarray(image).save(path)
    np.testing.assert_array_equal(
        read_image(path, 24, "bicubic"), resize_rgb(image, 24, resample="bicubic")
    )
    with pytest.raises(ValueError, match=r"resample must be one of \['bicubic', 'bilinear'\]"):
        resize_rgb(image, 24, resample="lanczos")
