"""Decoding and resizing of images and masks at the I/O edge (PIL, numpy).

Everything the models see passes through :func:`read_image` and
:func:`read_mask`, so the folder reader, the VisA reader and the TFDS builders
produce bit-identical arrays for the same file.

Decisions (the spec is silent):

- Images are resized straight to `[S, S]` (no crop, no aspect preservation,
  paper Sec. 6.1) with PIL BILINEAR, which antialiases when shrinking, as
  torchvision's `Resize` on PIL images does in the PatchCore reference code.
- Any colour mode becomes 3-channel RGB uint8. RGBA / LA drop alpha (the stored
  colour is kept, not composited: industrial images carry no meaningful
  transparency); 16-bit grayscale keeps its high byte.
- Masks are binarised at their native resolution with `value > threshold`
  (colour masks: max over RGB), THEN resized with NEAREST neighbour so that no
  interpolated grey level appears. The threshold is 127 for MVTec-layout masks
  (documented as 0 / 255; robust to antialiased or JPEG-saved masks) and 0 for
  VisA, whose masks store small class indices (1, 2, ...) rather than 255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from protorefine_jax.data.errors import CorruptImageError, DatasetNotFoundError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MVTEC_MASK_THRESHOLD = 127
VISA_MASK_THRESHOLD = 0


def is_image_file(path: Path) -> bool:
    """Whether `path` has an image extension (case-insensitive) and is not hidden."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _open(path: Path, what: str) -> Image.Image:
    """Opens and fully decodes `path`, turning every decoder failure into one error."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{what} file {path} does not exist. Fix: restore the file or remove it "
            "from the dataset folder (or its split CSV)."
        )
    try:
        with Image.open(path) as img:
            img.load()  # Image.open is lazy: truncated files only fail here.
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(
            f"Cannot decode {what.lower()} {path}: {e}. Fix: re-extract or re-download "
            "this file, or delete it from the dataset folder."
        ) from e


def _to_uint8_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # PIL's convert("RGB") clips 16-bit values instead of scaling them.
        arr = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
        img = Image.fromarray(arr)
    return img.convert("RGB")


def read_image(path: str | Path, image_size: int) -> np.ndarray:
    """Reads one image as RGB uint8 at the evaluation resolution.

    Args:
      path: image file (any PIL-readable format; gray, RGBA, palette, 16-bit ok).
      image_size: output side `S`.

    Returns:
      `[S, S, 3]` uint8 RGB.

    Raises:
      DatasetNotFoundError: the file does not exist.
      CorruptImageError: the file cannot be decoded (the message names it).
    """
    img = _to_uint8_rgb(_open(Path(path), "Image"))
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def read_mask(path: str | Path, image_size: int, threshold: int) -> np.ndarray:
    """Reads one ground-truth mask, binarised, at the evaluation resolution.

    Args:
      path: mask file (0 = normal; defect pixels above `threshold`).
      image_size: output side `S`.
      threshold: a pixel is defective when its value is `> threshold`
        (:data:`MVTEC_MASK_THRESHOLD` or :data:`VISA_MASK_THRESHOLD`).

    Returns:
      `[S, S]` bool, True on defect pixels.

    Raises:
      DatasetNotFoundError: the file does not exist.
      CorruptImageError: the file cannot be decoded (the message names it).
    """
    img = _open(Path(path), "Mask")
    if img.mode in ("1", "L"):
        arr = np.asarray(img.convert("L"))
    elif img.mode.startswith("I"):
        arr = np.asarray(img, dtype=np.int64)
        if img.mode.startswith("I;16"):
            arr = arr >> 8
    else:
        # Colour / palette masks: a red-on-black mask has luminance 76, so use
        # the brightest channel rather than luminance.
        arr = np.asarray(img.convert("RGB")).max(axis=-1)
    binary = Image.fromarray(((arr > threshold) * 255).astype(np.uint8))
    if binary.size != (image_size, image_size):
        binary = binary.resize((image_size, image_size), Image.Resampling.NEAREST)
    return np.asarray(binary) > 0


def read_images(paths: list[Path] | tuple[Path, ...], image_size: int) -> np.ndarray:
    """Reads a batch of images.

    Args:
      paths: `B` image files.
      image_size: output side `S`.

    Returns:
      `[B, S, S, 3]` uint8 RGB (`[0, S, S, 3]` for an empty list).
    """
    out = np.zeros((len(paths), image_size, image_size, 3), np.uint8)
    for i, p in enumerate(paths):
        out[i] = read_image(p, image_size)
    return out
