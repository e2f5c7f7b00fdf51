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
- Files are untrusted. Only PNG, JPEG, BMP and TIFF are decoded
  (:data:`IMAGE_FORMATS`, passed to PIL as ``formats=``): PIL otherwise picks
  the decoder from the content, and an EPS file named ``x.png`` would run
  Ghostscript. Anything else is a `CorruptImageError` naming the file.
- An image or mask with more than `max_image_pixels()` pixels (default
  `DEFAULT_MAX_IMAGE_PIXELS`, 50 million, e.g. 7071 x 7071; raise it with
  `set_max_image_pixels`, the `max_pixels=` argument of the readers, or
  `--max_image_pixels` of the CLIs) is refused from its header, before
  decoding, with an `ImageTooLargeError`. The limit is also a memory budget:
  reading costs about :func:`decode_bytes_per_pixel` bytes per pixel (12 for
  8-bit files, 32 for 16-bit / float ones), and a file whose estimate exceeds
  ``max_pixels x 12`` bytes is refused the same way, so a 16-bit file may have
  at most 18.75 million pixels under the default. PIL's process-wide limit is
  left alone; its own `DecompressionBombError` (above about 179 million
  pixels) becomes the same error.
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
# The only decoders PIL may use (chosen by content, whatever the file name).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
MVTEC_MASK_THRESHOLD = 127
VISA_MASK_THRESHOLD = 0
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
_max_pixels = DEFAULT_MAX_IMAGE_PIXELS
# Peak bytes per pixel of reading a file (decode, array, RGB, resize), measured
# per PIL mode: 8-bit modes ~10-12, CMYK ~14, 16-bit / 32-bit modes ~32.
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")
_WIDE_MODES = ("I", "F")
BYTES_PER_PIXEL_8BIT = 12


def decode_bytes_per_pixel(mode: str) -> int:
    """Estimated peak bytes per pixel of reading a file whose PIL mode is `mode`."""
    if mode in _EIGHT_BIT_MODES:
        return BYTES_PER_PIXEL_8BIT
    if mode in _WIDE_MODES or mode.startswith(("I;", "F;")):
        return 32
    return 16


def max_image_pixels() -> int:
    """The default limit of the readers: the largest image (width x height) decoded."""
    return _max_pixels


def set_max_image_pixels(limit: int | None) -> None:
    """Sets the default pixel limit of the readers (None: `DEFAULT_MAX_IMAGE_PIXELS`).

    Only this module's default changes (PIL's own process-wide limit is left
    alone); a reader's `max_pixels=` argument overrides it per call.

    Raises:
      ValueError: a limit below 1.
    """
    global _max_pixels
    _max_pixels = _check_limit(DEFAULT_MAX_IMAGE_PIXELS if limit is None else limit)


def _check_limit(limit) -> int:
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"max_image_pixels must be >= 1 (an integer), got {limit!r}.")
    return int(limit)


def _fix_limit() -> str:
    return (
        "Fix: if the file is genuine, raise the limit (--max_image_pixels, or "
        "protorefine_jax.data.imageio.set_max_image_pixels), or downscale it"
    )


def _too_large(path: Path, what: str, size: str, limit: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{what} {path} is {size}, more than the limit of {limit} pixels "
        f"(refused before decoding: a small file can decode to gigabytes). {_fix_limit()}."
    )


def check_decode_size(img: Image.Image, path: Path, what: str, max_pixels: int) -> None:
    """Refuses an opened (not yet loaded) image from its header size and mode.

    Raises:
      ImageTooLargeError: more than `max_pixels` pixels, or an estimated decode
        cost above `max_pixels x BYTES_PER_PIXEL_8BIT` bytes.
    """
    width, height = img.size
    if width * height > max_pixels:
        raise _too_large(path, what, f"{width} x {height} pixels", max_pixels)
    need = width * height * decode_bytes_per_pixel(img.mode)
    budget = max_pixels * BYTES_PER_PIXEL_8BIT
    if need > budget:
        raise ImageTooLargeError(
            f"{what} {path} is {width} x {height} pixels of PIL mode {img.mode!r}: reading "
            f"it takes about {need / 1e9:.2f} GB, more than the budget of {budget / 1e9:.2f} "
            f"GB that the limit of {max_pixels} pixels allows (8-bit images take "
            f"{BYTES_PER_PIXEL_8BIT} bytes per pixel, 16-bit and float ones "
            f"{decode_bytes_per_pixel('I')}). {_fix_limit()} or convert it to 8-bit."
        )


def unreadable(path: Path, what: str, err: OSError) -> UnreadableFileError:
    """The error for a file or folder this user may not read (names it and the fix)."""
    return UnreadableFileError(
        f"Cannot read {what.lower()} {path}: permission denied ({err.strerror or err}). Fix: "
        f"make it readable by this user (e.g. chmod a+r '{path}'; a folder also needs a+x), "
        "or run as a user who may read the dataset."
    )


def open_image(path: Path, what: str = "Image") -> Image.Image:
    """Opens an image or mask file lazily: the one place such files are opened.

    Only the decoders of :data:`IMAGE_FORMATS` are tried (PIL would otherwise
    choose any decoder by content, e.g. Ghostscript for an EPS file).

    Raises:
      CorruptImageError: the content is none of the allowed formats (names the file).
      OSError: the file cannot be read (e.g. `PermissionError`).
    """
    try:
        return Image.open(path, formats=IMAGE_FORMATS)
    except UnidentifiedImageError as e:
        raise CorruptImageError(
            f"Cannot decode {what.lower()} {path}: its content is not an allowed image "
            f"format ({', '.join(IMAGE_FORMATS)}; other formats are never decoded, whatever "
            "the file name says). Fix: convert it to PNG, or delete it from the dataset folder."
        ) from e


def is_image_file(path: Path) -> bool:
    """Whether `path` has an image extension (case-insensitive) and is not hidden."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _decode(path: Path, what: str, max_pixels: int | None = None) -> np.ndarray:
    """Opens and fully decodes `path` into an array (`preprocess.pil_to_array`).

    The size is checked from the header (`check_decode_size`) before decoding.
    Every decoder failure, and an image the array rules reject (mode "I"
    beyond 16 bits), becomes one `CorruptImageError` naming the file.
    """
    path = Path(path)
    limit = _max_pixels if max_pixels is None else _check_limit(max_pixels)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{what} file {path} does not exist. Fix: restore the file or remove it "
            "from the dataset folder (or its split CSV)."
        )
    try:
        with warnings.catch_warnings():
            # The limit below is ours; PIL's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image(path, what) as img:
                check_decode_size(img, path, what, limit)
                img.load()  # Image.open is lazy: truncated files only fail here.
                return pil_to_array(img)
    except CorruptImageError:
        raise
    except PermissionError as e:
        raise unreadable(path, what, e) from e
    except Image.DecompressionBombError as e:
        raise _too_large(path, what, f"too large for PIL ({e})", limit) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(
            f"Cannot decode {what.lower()} {path}: {e}. Fix: re-extract or re-download "
            "this file (or convert it to an 8- or 16-bit PNG), or delete it from the "
            "dataset folder."
        ) from e


def read_image(
    path: str | Path,
    image_size: int | tuple[int, int],
    resample: str = "bilinear",
    *,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Reads one image as RGB uint8 at the evaluation resolution.

    Args:
      path: image file (any PIL-readable format; gray, RGBA, palette, 16-bit ok).
      image_size: output side `S`, or `(H, W)` for a non-square output.
      resample: `"bilinear"` or `"bicubic"` (CLIP; `resize_rgb`).
      max_pixels: pixel limit of this call (None: `max_image_pixels()`).

    Returns:
      `[S, S, 3]` (or `[H, W, 3]`) uint8 RGB: `features.preprocess.resize_rgb` of the decoded
      image (float files rounded to uint8 after the resize).

    Raises:
      DatasetNotFoundError: the file does not exist.
      UnreadableFileError: this user may not read it (permissions).
      CorruptImageError: the file cannot be decoded, is not an allowed format,
        or its float values are outside [0, 1] (the message names it).
      ImageTooLargeError: more pixels than `max_pixels`, or too many bytes to decode.
    """
    return resize_decoded(decode_image(path, max_pixels=max_pixels), image_size, resample, path)


def decode_image(path: str | Path, *, max_pixels: int | None = None) -> np.ndarray:
    """The first half of :func:`read_image`: the decoded file as an array, not resized.

    Every check of :func:`read_image` (allowed formats, pixel and byte
    budgets, permissions) applies; the array is what `pil_to_array` gives.
    """
    return _decode(Path(path), "Image", max_pixels)


def resize_decoded(
    arr: np.ndarray,
    image_size: int | tuple[int, int],
    resample: str = "bilinear",
    path: str | Path = "",
) -> np.ndarray:
    """The second half of :func:`read_image`: `decode_image`'s array -> `[H, W, 3]` uint8.

    `path` only names the file in the error.
    """
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
    except CorruptImageError:
        raise
    except PermissionError as e:
        raise unreadable(path, "Image", e) from e
    except Image.DecompressionBombError as e:
        raise _too_large(path, "Image", f"too large for PIL ({e})", _max_pixels) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(f"Cannot decode image {path}: {e}.") from e


def read_mask(
    path: str | Path,
    image_size: int | tuple[int, int],
    threshold: int,
    image_path: str | Path | None = None,
    *,
    max_pixels: int | None = None,
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
      max_pixels: pixel limit of this call (None: `max_image_pixels()`).

    Returns:
      `[S, S]` bool, True on defect pixels.

    Raises:
      DatasetNotFoundError: the file does not exist.
      UnreadableFileError: this user may not read it (permissions).
      CorruptImageError: the file cannot be decoded, or its size differs
        from the image's (the message names both files).
      ImageTooLargeError: more pixels than `max_pixels`, or too many bytes to decode.
    """
    path = Path(path)
    arr = _decode(path, "Mask", max_pixels)
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
    *,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Reads a batch of images.

    Args:
      paths: `B` image files.
      image_size: output side `S`.
      resample: `"bilinear"` or `"bicubic"` (CLIP; `resize_rgb`).
      max_pixels: pixel limit of each file (None: `max_image_pixels()`).

    Returns:
      `[B, S, S, 3]` uint8 RGB (`[0, S, S, 3]` for an empty list).
    """
    out = np.zeros((len(paths), *image_hw(image_size), 3), np.uint8)
    for i, p in enumerate(paths):
        out[i] = read_image(p, image_size, resample, max_pixels=max_pixels)
    return out
