"""Preprocessing at the data edge: channels, dtypes, resizing."""

import numpy as np
import pytest
from PIL import Image

from protorefine_jax.features import preprocess_batch, resize_image, to_rgb
from protorefine_jax.features.preprocess import resize_rgb


def test_gray_rgba_and_pil_become_rgb():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = to_rgb(gray)
    assert rgb.shape == (3, 4, 3) and (rgb == gray[..., None]).all()
    assert (to_rgb(gray[..., None]) == rgb).all()
    rgba = np.dstack([rgb, np.full((3, 4), 7, np.uint8)])
    assert (to_rgb(rgba) == rgb).all()
    la = np.dstack([gray, np.zeros_like(gray)])
    assert (to_rgb(la) == rgb).all()
    assert (to_rgb(Image.fromarray(rgba, "RGBA")) == rgb).all()
    assert (to_rgb(Image.fromarray(gray, "L")) == rgb).all()


def test_float_inputs_scaled_from_unit_range():
    x = np.full((2, 2, 3), 0.5, np.float64)
    np.testing.assert_allclose(to_rgb(x), 127.5, rtol=0, atol=1e-4)
    np.testing.assert_allclose(to_rgb(x * 255, float_scale=1.0), 127.5, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"expected in \[0, 1\].*float_scale=1.0"):
        to_rgb(x * 255)


def test_16bit_scaled_by_257_for_arrays_and_pil_modes():
    x = np.array([[0, 128, 129, 257, 1000, 65535]], np.uint16)
    want = np.round(x / 257.0).astype(np.uint8)  # [0, 0, 1, 1, 4, 255]: not clipped to 255
    assert want.tolist() == [[0, 0, 1, 1, 4, 255]]
    rgb = to_rgb(x)
    assert rgb.dtype == np.uint8 and (rgb == want[..., None]).all()
    assert (to_rgb(Image.fromarray(x)) == rgb).all()  # PIL "I;16"
    assert (to_rgb(Image.fromarray(x.astype(np.int32))) == rgb).all()  # PIL "I"
    with pytest.raises(ValueError, match=r"mode 'I'.*\[0, 65535\]"):
        to_rgb(Image.fromarray(np.array([[70000]], np.int32)))
    assert (to_rgb(np.array([[True, False]])) == np.array([[255, 0]])[..., None]).all()


def test_resize_rgb_keeps_dtype():
    img = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    out = resize_rgb(img, 16)
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    np.testing.assert_array_equal(resize_image(img, 16), out.astype(np.float32))
    assert resize_rgb(img / 255.0, 16).dtype == np.float32


def test_resize_no_crop_bilinear_matches_pil():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)
    out = resize_image(img, 256)
    assert out.shape == (256, 256, 3) and out.dtype == np.float32
    want = np.asarray(Image.fromarray(img).resize((256, 256), Image.BILINEAR), np.float32)
    np.testing.assert_array_equal(out, want)
    # Float images take PIL's float path: same filter, no quantisation (PIL's uint8
    # path uses fixed-point weights, hence up to 1 level apart).
    out_f = resize_image(img.astype(np.float32) / 255.0, 256)
    np.testing.assert_allclose(out_f, want, atol=1.0)


def test_constant_image_stays_constant():
    out = resize_image(np.full((37, 53), 200, np.uint8), 64)
    assert out.shape == (64, 64, 3) and np.all(out == 200)


def test_preprocess_batch_mixes_sizes_and_layouts():
    images = [
        np.zeros((100, 80), np.uint8),
        np.ones((64, 64, 4), np.float32),
        np.full((30, 40, 3), 9, np.uint8),
    ]
    batch = preprocess_batch(images, 32)
    assert batch.shape == (3, 32, 32, 3) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[1], 255.0, rtol=0, atol=1e-4)
    np.testing.assert_allclose(batch[2], 9.0, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "image,err,match",
    [
        (np.zeros((4, 4, 5), np.uint8), ValueError, r"got shape \(4, 4, 5\)"),
        (np.zeros((2, 4, 4, 3), np.uint8), ValueError, r"got shape \(2, 4, 4, 3\)"),
        (np.zeros((4, 4, 3), np.int32), TypeError, "must be uint8 or uint16, got int32"),
    ],
)
def test_bad_images(image, err, match):
    with pytest.raises(err, match=match):
        to_rgb(image)


def test_empty_batch():
    with pytest.raises(ValueError, match="at least one image"):
        preprocess_batch([])
