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
  class indices (1, 2, ...) rather than 255. Masks are compared in their own
  integer dtype (uint8 / uint16 / bool; float32 only for float files), never
  widened to float64.
- A mask must have the pixel size of its image (`read_mask(..., image_path=)`,
  used by every reader): a mismatch is a `CorruptImageError` naming both
  files, not a silent stretch.
- Files are untrusted: an image or mask with more than `max_image_pixels()`
  pixels (default `DEFAULT_MAX_IMAGE_PIXELS`, 50 million, e.g. 7071 x 7071;
  raise it with `set_max_image_pixels` or `--max_image_pixels` of
  `experiments.eval`) is refused from its header, before decoding, with an
  `ImageTooLargeError`; PIL's own `DecompressionBombError` becomes the same
  error.
- A file this user may not read (permissions) is an `UnreadableFileError`
  naming it and the fix (chmod), not a "cannot decode" error: the file may
  well be intact. Every file is opened by :func:`open_image`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from protorefine_jax.data.errors import (
    CorruptImageError,
    DatasetNotFoundError,
    ImageTooLargeError,
    UnreadableFileError,
)
from protorefine_jax.features.preprocess import (
    UINT16_SCALE,
    image_hw,
    pil_to_array,
    resize_rgb,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MVTEC_MASK_THRESHOLD = 127
VISA_MASK_THRESHOLD = 0
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
_max_pixels = DEFAULT_MAX_IMAGE_PIXELS


def max_image_pixels() -> int:
    """The largest image (width x height) the readers decode."""
    return _max_pixels


def set_max_image_pixels(limit: int | None) -> None:
    """Sets the pixel limit of every image / mask decode (None: the default).

    Also sets PIL's own decompression-bomb limit to the same value, so PIL
    does not refuse what this limit allows.

    Raises:
      ValueError: a limit below 1.
    """
    global _max_pixels
    limit = DEFAULT_MAX_IMAGE_PIXELS if limit is None else int(limit)
    if limit < 1:
        raise ValueError(f"max_image_pixels must be >= 1, got {limit}.")
    _max_pixels = limit
    Image.MAX_IMAGE_PIXELS = max(limit, Image.MAX_IMAGE_PIXELS or 0)


def _too_large(path: Path, what: str, size: str) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{what} {path} is {size}, more than the limit of {_max_pixels} pixels "
        "(refused before decoding: a small file can decode to gigabytes). Fix: if the "
        "file is genuine, raise the limit (--max_image_pixels, or "
        "protorefine_jax.data.imageio.set_max_image_pixels), or downscale it."
    )


def unreadable(path: Path, what: str, err: OSError) -> UnreadableFileError:
    """The error for a file or folder this user may not read (names it and the fix)."""
    return UnreadableFileError(
        f"Cannot read {what.lower()} {path}: permission denied ({err.strerror or err}). Fix: "
        f"make it readable by this user (e.g. chmod a+r '{path}'; a folder also needs a+x), "
        "or run as a user who may read the dataset."
    )


def open_image(path: Path) -> Image.Image:
    """`PIL.Image.open(path)`: the one place image and mask files are opened."""
    return Image.open(path)


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
        with warnings.catch_warnings():
            # The limit below is ours; PIL's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image(path) as img:
                width, height = img.size
                if width * height > _max_pixels:
                    raise _too_large(path, what, f"{width} x {height} pixels")
                img.load()  # Image.open is lazy: truncated files only fail here.
                return pil_to_array(img)
    except ImageTooLargeError:
        raise
    except PermissionError as e:
        raise unreadable(path, what, e) from e
    except Image.DecompressionBombError as e:
        raise _too_large(path, what, f"too large for PIL ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(
            f"Cannot decode {what.lower()} {path}: {e}. Fix: re-extract or re-download "
            "this file (or convert it to an 8- or 16-bit PNG), or delete it from the "
            "dataset folder."
        ) from e


def read_image(
    path: str | Path, image_size: int | tuple[int, int], resample: str = "bilinear"
) -> np.ndarray:
    """Reads one image as RGB uint8 at the evaluation resolution.

    Args:
      path: image file (any PIL-readable format; gray, RGBA, palette, 16-bit ok).
      image_size: output side `S`, or `(H, W)` for a non-square output.
      resample: `"bilinear"` or `"bicubic"` (CLIP; `resize_rgb`).

    Returns:
      `[S, S, 3]` (or `[H, W, 3]`) uint8 RGB: `features.preprocess.resize_rgb` of the decoded
      image (float files rounded to uint8 after the resize).

    Raises:
      DatasetNotFoundError: the file does not exist.
      UnreadableFileError: this user may not read it (permissions).
      CorruptImageError: the file cannot be decoded, or its float values are
        outside [0, 1] (the message names it).
    """
    arr = _decode(Path(path), "Image")
    try:
        out = resize_rgb(arr, image_size, resample=resample)
    except ValueError as e:
        raise CorruptImageError(
            f"Cannot use image {path}: {e}. Fix: convert it to an 8- or 16-bit PNG."
        ) from e
    if out.dtype != np.uint8:
        out = np.round(out).astype(np.uint8)
    return out


def _mask_defect(arr: np.ndarray, threshold: int) -> np.ndarray:
    """`[H, W]` bool: value on the 8-bit scale (unrounded) `> threshold` in any channel.

    Compared in the file's own dtype: uint8 `v > t`; uint16 `v / 257 > t`,
    i.e. `v > 257 t`; bool `255 > t`; float `255 v > t` in float32.
    """
    x = arr[..., None] if arr.ndim == 2 else arr
    if x.ndim != 3 or x.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"expected a mask [H, W] or [H, W, 1|2|3|4], got shape {arr.shape}")
    if x.shape[-1] in (2, 4):
        x = x[..., :-1]  # alpha ignored; gray is not replicated (one byte per pixel)
    if x.dtype == np.bool_:
        hit = x if threshold < 255 else np.zeros_like(x)
    elif x.dtype == np.uint16:
        hit = x > threshold * UINT16_SCALE
    elif np.issubdtype(x.dtype, np.floating):
        hit = x.astype(np.float32, copy=False) * np.float32(255.0) > threshold
    elif x.dtype == np.uint8:
        hit = x > threshold
    else:
        raise ValueError(f"unsupported mask dtype {x.dtype}")
    # Colour / palette masks: a red-on-black mask has luminance 76, so use the
    # brightest channel rather than luminance.
    return hit.any(axis=-1)


def image_pixel_size(path: str | Path) -> tuple[int, int]:
    """`(width, height)` of an image file from its header (nothing decoded).

    Raises:
      DatasetNotFoundError / CorruptImageError: as `read_image`.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"Image file {path} does not exist.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image(path) as img:
                return img.size
    except PermissionError as e:
        raise unreadable(path, "Image", e) from e
    except Image.DecompressionBombError as e:
        raise _too_large(path, "Image", f"too large for PIL ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(f"Cannot decode image {path}: {e}.") from e


def read_mask(
    path: str | Path,
    image_size: int | tuple[int, int],
    threshold: int,
    image_path: str | Path | None = None,
) -> np.ndarray:
    """Reads one ground-truth mask, binarised, at the evaluation resolution.

    Args:
      path: mask file (0 = normal; defect pixels above `threshold`).
      image_size: output side `S`.
      threshold: a pixel is defective when its value on the 8-bit scale is
        `> threshold` (:data:`MVTEC_MASK_THRESHOLD` or
        :data:`VISA_MASK_THRESHOLD`; 16-bit values count as `v / 257`).
      image_path: the image the mask belongs to; its pixel size (read from
        the header) must equal the mask's.

    Returns:
      `[S, S]` bool, True on defect pixels.

    Raises:
      DatasetNotFoundError: the file does not exist.
      UnreadableFileError: this user may not read it (permissions).
      CorruptImageError: the file cannot be decoded, or its size differs
        from the image's (the message names both files).
      ImageTooLargeError: more pixels than `max_image_pixels()`.
    """
    path = Path(path)
    arr = _decode(path, "Mask")
    if image_path is not None:
        width, height = image_pixel_size(image_path)
        if arr.shape[:2] != (height, width):
            raise CorruptImageError(
                f"Mask {path} is {arr.shape[1]} x {arr.shape[0]} pixels but its image "
                f"{image_path} is {width} x {height}; a mask must have its image's size "
                "(it is not stretched). Fix: re-export the mask at the image's size, or "
                "pair the image with its own mask."
            )
    try:
        defect = _mask_defect(arr, threshold)
    except ValueError as e:
        raise CorruptImageError(f"Cannot use mask {path}: {e}.") from e
    del arr
    binary = Image.fromarray(defect.view(np.uint8) * np.uint8(255))
    h, w = image_hw(image_size)
    if binary.size != (w, h):
        binary = binary.resize((w, h), Image.Resampling.NEAREST)
    return np.asarray(binary) > 0


def read_images(
    paths: list[Path] | tuple[Path, ...],
    image_size: int | tuple[int, int],
    resample: str = "bilinear",
) -> np.ndarray:
    """Reads a batch of images.

    Args:
      paths: `B` image files.
      image_size: output side `S`.
      resample: `"bilinear"` or `"bicubic"` (CLIP; `resize_rgb`).

    Returns:
      `[B, S, S, 3]` uint8 RGB (`[0, S, S, 3]` for an empty list).
    """
    out = np.zeros((len(paths), *image_hw(image_size), 3), np.uint8)
    for i, p in enumerate(paths):
        out[i] = read_image(p, image_size, resample)
    return out
