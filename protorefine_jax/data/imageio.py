"""Decoding of image and mask files at the I/O edge (PIL, numpy).

Everything the models see passes through :func:`read_image` and
:func:`read_mask`, so the folder reader, the VisA reader and the TFDS builders
produce bit-identical arrays for the same file.

Files are decoded here (PIL, fully loaded, every decoder failure turned into
:class:`~protorefine_jax.data.errors.CorruptImageError`) and turned into arrays
by :func:`protorefine_jax.features.preprocess.pil_to_array`; the array part
("to RGB + resize") is the one implementation in
:mod:`protorefine_jax.features.preprocess`, so reading a file here and passing
the decoded image to ``features.resize_image`` give the same pixels
(``read_image == resize_image`` rounded to uint8; identical for every
non-float file). Decisions (the spec is silent):

- Images are resized straight to `[S, S]` (no crop, no aspect preservation,
  paper Sec. 6.1) with PIL BILINEAR, which antialiases when shrinking, as
  torchvision's `Resize` on PIL images does in the PatchCore reference code.
- Any colour mode becomes 3-channel RGB uint8. RGBA / LA drop alpha (the stored
  colour is kept, not composited: industrial images carry no meaningful
  transparency); grayscale is replicated; palette / CMYK / ... go through
  PIL's `convert("RGB")`.
- 16-bit files are scaled by their dtype range, not clipped or truncated to
  the high byte: PIL modes `"I;16*"` AND `"I"` (PIL's 32-bit integer container,
  which older Pillow uses for 16-bit grayscale PNG and which 16-bit TIFFs may
  open as) are read as 16-bit samples and mapped with `round(v / 257)`
  (65535 -> 255). A mode `"I"` file holding values outside [0, 65535] (real
  32-bit data) is rejected with a `CorruptImageError`. 32-bit float files
  (mode `"F"`) are taken as floats in [0, 1] (the `float_scale=255` rule of
  `features.preprocess`) and rounded to uint8 after resizing.
- Masks are binarised at their native resolution with `value > threshold`
  (colour masks: max over RGB; alpha ignored), THEN resized with NEAREST
  neighbour so that no interpolated grey level appears. Values are compared on
  the 8-bit scale: 16-bit masks (modes `"I;16*"` / `"I"`) as `v / 257` WITHOUT
  rounding, so a 16-bit class-index mask (1, 2, ...) stays defective under
  the VisA threshold 0; mode `"1"` as 0 / 255; float masks as `v * 255`. The
  threshold is 127 for MVTec-layout masks (documented as 0 / 255; robust to
  antialiased or JPEG-saved masks) and 0 for VisA, whose masks store small
  class indices (1, 2, ...) rather than 255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from protorefine_jax.data.errors import CorruptImageError, DatasetNotFoundError
from protorefine_jax.features.preprocess import (
    UINT16_SCALE,
    image_hw,
    pil_to_array,
    resize_rgb,
    rgb_channels,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MVTEC_MASK_THRESHOLD = 127
VISA_MASK_THRESHOLD = 0


def is_image_file(path: Path) -> bool:
    """Whether `path` has an image extension (case-insensitive) and is not hidden."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _decode(path: Path, what: str) -> np.ndarray:
    """Opens and fully decodes `path` into an array (`preprocess.pil_to_array`).

    Every decoder failure, and an image the array rules reject (mode "I"
    beyond 16 bits), becomes one `CorruptImageError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{what} file {path} does not exist. Fix: restore the file or remove it "
            "from the dataset folder (or its split CSV)."
        )
    try:
        with Image.open(path) as img:
            img.load()  # Image.open is lazy: truncated files only fail here.
            return pil_to_array(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(
            f"Cannot decode {what.lower()} {path}: {e}. Fix: re-extract or re-download "
            "this file (or convert it to an 8- or 16-bit PNG), or delete it from the "
            "dataset folder."
        ) from e


def read_image(path: str | Path, image_size: int | tuple[int, int]) -> np.ndarray:
    """Reads one image as RGB uint8 at the evaluation resolution.

    Args:
      path: image file (any PIL-readable format; gray, RGBA, palette, 16-bit ok).
      image_size: output side `S`, or `(H, W)` for a non-square output.

    Returns:
      `[S, S, 3]` (or `[H, W, 3]`) uint8 RGB: `features.preprocess.resize_rgb` of the decoded
      image (float files rounded to uint8 after the resize).

    Raises:
      DatasetNotFoundError: the file does not exist.
      CorruptImageError: the file cannot be decoded, or its float values are
        outside [0, 1] (the message names it).
    """
    arr = _decode(Path(path), "Image")
    try:
        out = resize_rgb(arr, image_size)
    except ValueError as e:
        raise CorruptImageError(
            f"Cannot use image {path}: {e}. Fix: convert it to an 8- or 16-bit PNG."
        ) from e
    if out.dtype != np.uint8:
        out = np.round(out).astype(np.uint8)
    return out


def _mask_levels(arr: np.ndarray) -> np.ndarray:
    """`[H, W]` mask values on the 8-bit scale (unrounded), max over colour channels."""
    x = rgb_channels(arr)
    if x.dtype == np.bool_:
        level = x.astype(np.float64) * 255.0
    elif x.dtype == np.uint16:
        level = x.astype(np.float64) / UINT16_SCALE
    elif np.issubdtype(x.dtype, np.floating):
        level = x.astype(np.float64) * 255.0
    else:
        level = x.astype(np.float64)
    # Colour / palette masks: a red-on-black mask has luminance 76, so use the
    # brightest channel rather than luminance.
    return level.max(axis=-1)


def read_mask(path: str | Path, image_size: int | tuple[int, int], threshold: int) -> np.ndarray:
    """Reads one ground-truth mask, binarised, at the evaluation resolution.

    Args:
      path: mask file (0 = normal; defect pixels above `threshold`).
      image_size: output side `S`.
      threshold: a pixel is defective when its value on the 8-bit scale is
        `> threshold` (:data:`MVTEC_MASK_THRESHOLD` or
        :data:`VISA_MASK_THRESHOLD`; 16-bit values count as `v / 257`).

    Returns:
      `[S, S]` bool, True on defect pixels.

    Raises:
      DatasetNotFoundError: the file does not exist.
      CorruptImageError: the file cannot be decoded (the message names it).
    """
    path = Path(path)
    arr = _decode(path, "Mask")
    try:
        level = _mask_levels(arr)
    except ValueError as e:
        raise CorruptImageError(f"Cannot use mask {path}: {e}.") from e
    binary = Image.fromarray(((level > threshold) * 255).astype(np.uint8))
    h, w = image_hw(image_size)
    if binary.size != (w, h):
        binary = binary.resize((w, h), Image.Resampling.NEAREST)
    return np.asarray(binary) > 0


def read_images(
    paths: list[Path] | tuple[Path, ...], image_size: int | tuple[int, int]
) -> np.ndarray:
    """Reads a batch of images.

    Args:
      paths: `B` image files.
      image_size: output side `S`.

    Returns:
      `[B, S, S, 3]` uint8 RGB (`[0, S, S, 3]` for an empty list).
    """
    out = np.zeros((len(paths), *image_hw(image_size), 3), np.uint8)
    for i, p in enumerate(paths):
        out[i] = read_image(p, image_size)
    return out
