"""File decoding at the data edge: 16-bit images and masks, one shared array path."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from protorefine_jax import data
from protorefine_jax.data import imageio
from protorefine_jax.features import preprocess

S = 16


def _ramp16() -> np.ndarray:
    """16-bit gray ramp over the full range (most values > 255: clipping shows)."""
    return np.linspace(0, 65535, S * S).round().astype(np.uint16).reshape(S, S)


def _write_mode_i_tiff(path, values: np.ndarray):
    """A TIFF that PIL reopens in mode "I" (as older Pillow opens 16-bit PNG)."""
    Image.fromarray(values.astype(np.int32)).save(path)
    with Image.open(path) as img:
        assert img.mode == "I"
    return path


def _write_16bit_png(path, values: np.ndarray):
    Image.fromarray(values.astype(np.uint16)).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # "I;16" on current Pillow, "I" on older ones
    return path


def test_16bit_images_scaled_by_257_not_clipped(tmp_path):
    ramp = _ramp16()
    want = np.repeat(np.round(ramp / 257.0).astype(np.uint8)[..., None], 3, axis=-1)
    for path in (
        _write_16bit_png(tmp_path / "a.png", ramp),
        _write_mode_i_tiff(tmp_path / "b.tif", ramp),
    ):
        got = imageio.read_image(path, S)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, want, err_msg=str(path))
    # Resized: the same as resizing the scaled 8-bit image.
    small = imageio.read_image(tmp_path / "b.tif", S // 2)
    ref = Image.fromarray(want).resize((S // 2, S // 2), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(small, np.asarray(ref))


def test_mode_i_beyond_16_bits_is_rejected(tmp_path):
    path = tmp_path / "big.tif"
    Image.fromarray(np.full((S, S), 70000, np.int32)).save(path)
    with pytest.raises(data.CorruptImageError, match=re.escape(str(path)) + ".*16-bit"):
        imageio.read_image(path, S)
    with pytest.raises(data.CorruptImageError, match=re.escape(str(path))):
        imageio.read_mask(path, S, imageio.MVTEC_MASK_THRESHOLD)


@pytest.mark.parametrize("writer", [_write_16bit_png, _write_mode_i_tiff])
def test_16bit_masks_compared_on_the_8bit_scale(tmp_path, writer):
    m = np.zeros((S, S), np.uint16)
    m[:4] = 1  # a class index (VisA-style): defective only under threshold 0
    m[4:8] = 30000  # 116.7 on the 8-bit scale: below 127
    m[8:12] = 40000  # 155.6: above 127
    m[12:] = 65535
    path = writer(tmp_path / ("m.png" if writer is _write_16bit_png else "m.tif"), m)
    mvtec = imageio.read_mask(path, S, imageio.MVTEC_MASK_THRESHOLD)
    np.testing.assert_array_equal(mvtec, m > 127 * 257)
    assert not mvtec[:8].any() and mvtec[8:].all()
    visa = imageio.read_mask(path, S, imageio.VISA_MASK_THRESHOLD)
    np.testing.assert_array_equal(visa, m > 0)


def _files(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
    files = {
        "rgb.png": Image.fromarray(rgb),
        "gray.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "la.png": Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]])).convert("LA"),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "binary.png": Image.fromarray(rgb[..., 0] > 128),
        "gray16.png": Image.fromarray(rng.integers(0, 65536, (20, 28)).astype(np.uint16)),
        "gray16.tif": Image.fromarray(rng.integers(0, 65536, (20, 28)).astype(np.int32)),
    }
    for name, img in files.items():
        img.save(tmp_path / name)
    return {name: tmp_path / name for name in files}


def test_file_reader_and_array_preprocessing_agree(tmp_path):
    """One implementation: reading a file == preprocessing its decoded image or array."""
    for name, path in _files(tmp_path).items():
        got = imageio.read_image(path, S)
        with Image.open(path) as img:
            img.load()
            via_pil = preprocess.resize_image(img, S)
            via_array = preprocess.resize_image(preprocess.pil_to_array(img), S)
        np.testing.assert_array_equal(got, via_pil, err_msg=name)
        np.testing.assert_array_equal(got, via_array, err_msg=name)


def test_float_tiff_uses_the_unit_range_rule(tmp_path):
    values = np.random.default_rng(1).uniform(0, 1, (20, 28)).astype(np.float32)
    path = tmp_path / "f.tif"
    Image.fromarray(values).save(path)
    got = imageio.read_image(path, S)
    want = np.round(preprocess.resize_image(values, S))
    np.testing.assert_array_equal(got, want)
    Image.fromarray(values * 1000).save(path)
    with pytest.raises(data.CorruptImageError, match=re.escape(str(path)) + ".*float_scale"):
        imageio.read_image(path, S)
