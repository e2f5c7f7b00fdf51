"""Issue 11, items 5 and 6 (images, masks) and the `jax.export` artifact checks.

Images: a pixel limit checked from the header before decoding (a flag raises
it), PIL's DecompressionBombError turned into the same clear error, masks
compared in their own integer dtype, a mask/image size mismatch an error
naming both files. Export: a corrupt or mismatched artifact is an
`ExportError` before anything runs.
"""

from __future__ import annotations

import hashlib
import struct
import tracemalloc
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageFile

from protorefine_jax import export as export_lib
from protorefine_jax.data import imageio
from protorefine_jax.data.errors import CorruptImageError, ImageTooLargeError
from protorefine_jax.data.folder import load_category
from protorefine_jax.data.synthetic import make_synthetic_dataset


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, side: int, full: bool = True) -> Path:
    """A grayscale PNG of `side` x `side` zeros: ~side^2 / 1000 bytes on disk.

    Compressed row by row, so building it allocates one row. `full=False`
    writes the header and a token IDAT only (enough for PIL's size check).
    """
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    comp = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    parts = [comp.compress(row) for _ in range(side if full else 1)]
    idat = b"".join(parts) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


@pytest.fixture
def no_decode(monkeypatch):
    """Makes any pixel decode fail loudly: the refusal must come from the header."""

    def load(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_large_png_refused_from_its_header(tmp_path, no_decode):
    path = bomb_png(tmp_path / "big.png", 12000)
    assert path.stat().st_size < 600_000  # 420 KB in the issue; 1.7 GB decoded
    with pytest.raises(
        ImageTooLargeError,
        match=r"Image .*big\.png is 12000 x 12000 pixels.*"
        r"--max_image_pixels",
    ):
        imageio.read_image(path, 64)
    with pytest.raises(ImageTooLargeError, match=r"Mask .*big\.png is 12000 x 12000"):
        imageio.read_mask(path, 64, 127)


def test_pil_decompression_bomb_error_is_a_clear_error(tmp_path, monkeypatch):
    # Our limit raised beyond PIL's own (2 x 89.5 MP): PIL refuses in Image.open.
    monkeypatch.setattr(imageio, "_max_pixels", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)
    path = bomb_png(tmp_path / "huge.png", 14000, full=False)
    with pytest.raises(ImageTooLargeError, match=r"huge\.png is too large for PIL"):
        imageio.read_image(path, 64)


def test_pixel_limit_flag_raises_and_lowers_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(imageio, "_max_pixels", imageio._max_pixels)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    path = tmp_path / "img.png"
    Image.fromarray(np.full((20, 30), 7, np.uint8)).save(path)
    imageio.set_max_image_pixels(599)
    with pytest.raises(ImageTooLargeError, match="30 x 20 pixels, more than the limit of 599"):
        imageio.read_image(path, 8)
    imageio.set_max_image_pixels(600)
    assert imageio.read_image(path, 8).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="must be >= 1"):
        imageio.set_max_image_pixels(0)
    imageio.set_max_image_pixels(None)
    assert imageio.max_image_pixels() == imageio.DEFAULT_MAX_IMAGE_PIXELS == 50_000_000


def test_eval_flag_is_defined():
    from protorefine_jax.cli import eval as eval_cli

    assert eval_cli._MAX_IMAGE_PIXELS.default == imageio.DEFAULT_MAX_IMAGE_PIXELS


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.bool_])
@pytest.mark.parametrize("threshold", [0, 1, 127, 254])
def test_mask_rule_in_native_dtype_matches_the_float64_rule(dtype, threshold):
    rng = np.random.default_rng(threshold)
    if dtype == np.bool_:
        x = rng.random((9, 7, 3)) > 0.5
        ref = x.astype(np.float64) * 255
    elif dtype == np.float32:
        x = rng.random((9, 7, 3)).astype(np.float32)
        x[0, 0] = threshold / 255  # boundary value
        ref = x.astype(np.float64) * 255
    else:
        hi = 256 if dtype == np.uint8 else 65536
        x = rng.integers(0, hi, (9, 7, 3)).astype(dtype)
        x[0, 0] = threshold * (1 if dtype == np.uint8 else 257)  # boundary value
        ref = x.astype(np.float64) / (1 if dtype == np.uint8 else 257)
    got = imageio._mask_defect(x, threshold)
    assert got.dtype == np.bool_
    want = ref.max(-1) > threshold
    if dtype == np.float32:  # 255 * v in float32 may round across the boundary
        np.testing.assert_array_equal(got[1:], want[1:])
    else:
        np.testing.assert_array_equal(got, want)


def test_masks_decode_without_float64_copies(tmp_path):
    side = 1500
    path = tmp_path / "m.png"
    Image.fromarray(np.full((side, side), 255, np.uint8)).save(path)
    tracemalloc.start()
    mask = imageio.read_mask(path, 64, 127)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert mask.dtype == np.bool_ and mask.all()
    # The float64 rule needed >= 24 bytes per pixel (3 channels); now uint8 / bool.
    assert peak < 4 * side * side


def test_mask_of_another_size_names_both_files(tmp_path):
    root = tmp_path / "ds"
    make_synthetic_dataset(root, ("fabric",), 2, 1, 1, image_size=64, seed=0)
    data = load_category(root, "fabric", image_size=32)
    item = next(t for t in data.test if t.mask_path is not None)
    Image.fromarray(np.full((3, 7), 255, np.uint8)).save(item.mask_path)
    with pytest.raises(CorruptImageError) as err:
        data.load_masks([item])
    msg = str(err.value)
    assert str(item.mask_path) in msg and str(item.path) in msg
    assert "7 x 3" in msg and "64 x 64" in msg and "not stretched" in msg


def _artifact(image_shape=(8, 8, 3)) -> bytes:
    def fn(images):
        s = jnp.mean(images, axis=(1, 2, 3))
        return s, images[..., 0], images[..., 0]

    shape = jax.export.symbolic_shape("b, {}, {}, {}".format(*image_shape))
    exp = jax.export.export(jax.jit(fn))(jax.ShapeDtypeStruct(shape, jnp.float32))
    return exp.serialize()


def test_export_artifact_is_validated_before_running():
    blob = bytes(_artifact())
    run = export_lib.load_detect(
        blob, image_shape=(8, 8, 3), expected_sha256=hashlib.sha256(blob).hexdigest()
    )
    scores, _, _ = run(jnp.ones((2, 8, 8, 3)))
    np.testing.assert_allclose(scores, [1.0, 1.0], rtol=0, atol=0)
    with pytest.raises(export_lib.ExportError, match=r"shape \(8, 8, 3\), not \(16, 16, 3\)"):
        export_lib.load_detect(blob, image_shape=(16, 16, 3))
    with pytest.raises(export_lib.ExportError, match="differs from the expected"):
        export_lib.load_detect(blob, expected_sha256="0" * 64)


@pytest.mark.parametrize("cut", ["half", "garbage", "empty", "tail"])
def test_corrupt_export_artifact_is_an_export_error(cut):
    blob = bytes(_artifact())
    bad = {
        "half": blob[: len(blob) // 2],
        "garbage": b"\x07" * 64,
        "empty": b"",
        "tail": blob[:-40],
    }[cut]
    with pytest.raises(export_lib.ExportError, match="jax.export artifact"):
        export_lib.load_detect(bad)


def test_export_signature_checked():
    exp = jax.export.export(jax.jit(lambda x: x))(jax.ShapeDtypeStruct((4,), jnp.float32))
    with pytest.raises(export_lib.ExportError, match="is not a detect program"):
        export_lib.load_detect(exp.serialize())
