"""Looks at the images before `fit` and `predict` use them: sizes, shapes, `--image_size`.

Only image headers are read (`imageio.image_pixel_size`, the package's safe
opener; nothing is decoded). What a user is told:

- a folder of non-square images fitted at the default square size: the
  `--image_size` (height x width, multiples of 16) that keeps their shape;
- an `--image_size` whose height and width look swapped for these images:
  refused by `fit` with the fix, a warning in `predict` (the model's size is
  fixed);
- several sizes in one folder: each size with its count (and an example file
  of the rarer ones), and whether their shapes differ;
- an `--image_size` the backbone cannot take (sides not multiples of 16): the
  nearest one it can.

Image sizes are written width x height, as image viewers show them;
`--image_size` is always height x width, and the messages say which is which.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from pathlib import Path

from protorefine_jax.data.imageio import image_pixel_size
from protorefine_jax.features.preprocess import image_hw

# Sides of PatchCore inputs: the stride-16 feature grid must be exact (features/extractor.py).
MULTIPLE = 16
# The default input side; a suggested size keeps its short side at most this (same cost).
DEFAULT_SIDE = 256
MAX_SIDE = 1024  # schema.IMAGE_SIDE
# Resizing that changes the width:height ratio by more than this is called out.
DISTORTION = 1.1
# Sizes whose aspect ratios differ by less than this count as one shape.
SAME_SHAPE = 1.02
# Headers read at most (a huge folder is sampled at its first files).
MAX_SURVEYED = 5000


def nearest_multiple(x: float, m: int = MULTIPLE) -> int:
    """The multiple of `m` nearest `x` (at least `m`)."""
    return max(m, int(round(x / m)) * m)


def size_text(hw: Sequence[int]) -> str:
    """`(224, 544)` -> `"224x544"`; a square -> its side."""
    h, w = image_hw(hw)
    return str(h) if h == w else f"{h}x{w}"


def check_multiple(size, flag: str = "--image_size") -> None:
    """Raises ValueError naming the nearest valid size unless both sides are multiples of 16."""
    h, w = image_hw(size)
    if h % MULTIPLE == 0 and w % MULTIPLE == 0:
        return
    near = (min(nearest_multiple(h), MAX_SIDE), min(nearest_multiple(w), MAX_SIDE))
    raise ValueError(
        f"{flag}={size_text((h, w))} cannot be used: the backbone needs height and width "
        f"that are multiples of {MULTIPLE}. Nearest valid: {flag}={size_text(near)}."
    )


def suggest_size(width: int, height: int) -> tuple[int, int]:
    """`(H, W)`, multiples of 16, with the aspect ratio of a `width x height` image.

    The short side is the image's own, rounded to a multiple of 16, but at
    most `DEFAULT_SIDE` (so the cost stays near the default's); the long side
    follows the aspect ratio (rounded to a multiple of 16, at most
    `MAX_SIDE`). A 565 x 230 image (width x height) gives 224x544.
    """
    short, long = min(width, height), max(width, height)
    aspect = long / short
    s = min(DEFAULT_SIDE, nearest_multiple(short))
    if s * aspect > MAX_SIDE:
        s = nearest_multiple(MAX_SIDE / aspect)
    lg = min(MAX_SIDE, nearest_multiple(s * aspect))
    return (s, lg) if height <= width else (lg, s)


def distortion(width: int, height: int, hw: Sequence[int]) -> float:
    """How much resizing a `width x height` image to `hw` (H, W) changes its shape (>= 1)."""
    h, w = image_hw(hw)
    d = (width / height) / (w / h)
    return max(d, 1 / d)


def survey(files: Sequence[Path]) -> dict[tuple[int, int], list[Path]]:
    """`{(width, height): files}` from the headers, most common size first.

    Files whose header cannot be read are left out (reading them later names
    the problem); at most `MAX_SURVEYED` files are looked at.
    """
    sizes: dict[tuple[int, int], list[Path]] = collections.defaultdict(list)
    for f in files[:MAX_SURVEYED]:
        try:
            sizes[tuple(image_pixel_size(f))].append(f)
        except Exception:  # noqa: BLE001 - an unreadable header: reading the file names it
            continue
    return dict(sorted(sizes.items(), key=lambda kv: -len(kv[1])))


def _shape(width: int, height: int) -> str:
    ratio = max(width, height) / min(width, height)
    kind = "square" if ratio < SAME_SHAPE else ("landscape" if width > height else "portrait")
    return kind if kind == "square" else f"{kind}, {ratio:.2f}:1"


def _name(root: Path | None, f: Path) -> str:
    if root is None:
        return f.name
    try:
        return f.relative_to(root).as_posix()
    except ValueError:
        return f.name


def mixed_sizes_note(
    sizes: dict[tuple[int, int], list[Path]], hw: Sequence[int], root: Path | None = None
) -> str | None:
    """The note listing several image sizes of one folder (None for a single size)."""
    if len(sizes) < 2:
        return None
    (w0, h0), _ = next(iter(sizes.items()))
    listed = []
    other_shape = []
    for i, ((w, h), fs) in enumerate(sizes.items()):
        if i == 6:
            listed.append(f"... {len(sizes) - 6} more sizes")
            break
        entry = f"{w}x{h} ({len(fs)} image{'s' if len(fs) != 1 else ''}"
        if i:
            entry += f", e.g. {_name(root, fs[0])}"
        listed.append(entry + ")")
        if distortion(w, h, (h0, w0)) >= SAME_SHAPE:
            other_shape.append(f"{w}x{h}")
    text = (
        f"note: the images come in {len(sizes)} sizes (width x height): {'; '.join(listed)}. "
        f"All are resized to {size_text(hw)} (height x width). "
    )
    if not other_shape:
        return text + "They have the same shape, so this is fine."
    return text + (
        f"{', '.join(other_shape)} {'has' if len(other_shape) == 1 else 'have'} another shape than "
        f"the most common {w0}x{h0}, so those images are stretched differently, which can raise "
        "their scores. Check those images (rotated? "
        "cropped? another camera?) and keep one shape per model."
    )


def check_images(
    files: Sequence[Path],
    image_size,
    *,
    explicit: bool,
    for_fit: bool,
    root: Path | None = None,
) -> list[str]:
    """Notes about these images at `image_size`; raises ValueError for a swapped fit size.

    Args:
      files: the image files.
      image_size: `S` or `(H, W)`: the size the images will be resized to.
      explicit: whether the user gave `image_size` (fit: `--image_size`
        given; predict: always the model's).
      for_fit: `fit` (a swapped size is refused, a square default gets a
        suggestion) or `predict` (the model's size is fixed: warnings).
      root: the folder names are shown relative to.

    Returns:
      Lines to show the user (possibly none).
    """
    sizes = survey(files)
    if not sizes:
        return []
    hw = image_hw(image_size)
    th, tw = hw
    (w, h), _ = next(iter(sizes.items()))
    notes = []
    d = distortion(w, h, hw)
    suggestion = suggest_size(w, h)
    image_text = f"{w} wide x {h} high ({_shape(w, h)})"
    if d >= DISTORTION and th != tw and (h > w) != (th > tw) and (w != h):
        swapped = (tw, th)
        if distortion(w, h, swapped) < d:
            if for_fit and all((hh > ww) == (h > w) for ww, hh in sizes if ww != hh):
                raise ValueError(
                    f"--image_size={size_text(hw)} is height x width ({th} high, {tw} wide), but "
                    f"the images are {image_text}: they would be squeezed {d:.1f}:1 out of "
                    f"shape. Height and width look swapped. Fix: --image_size="
                    f"{size_text(swapped)}."
                )
            where = "--image_size" if for_fit else "the model's image size"
            notes.append(
                f"warning: {where} {size_text(hw)} is {th} high x {tw} wide, but most images are "
                f"{image_text}: they are squeezed {d:.1f}:1 out of shape, so their scores are "
                "not reliable. Height and width look swapped: "
                + (
                    f"use --image_size={size_text(swapped)}."
                    if for_fit
                    else f"fit the model again with --image_size={size_text(suggestion)}, or "
                    "check that these images are not rotated."
                )
            )
    elif d >= DISTORTION and not explicit and for_fit:
        notes.append(
            f"note: the images are {image_text} and will be resized to {th}x{tw}, "
            f"{d:.1f}:1 out of shape. The model works this way (every image is "
            "resized alike), but detail along the long side is squeezed. To keep the shape, "
            f"fit with --image_size={size_text(suggestion)} (height x width)."
        )
    elif d >= DISTORTION and not for_fit:
        notes.append(
            f"note: the images are {image_text}; the model works at {th}x{tw} (height x "
            f"width), so they are resized {d:.1f}:1 out of shape. That is fine if the model's "
            "good images had this shape too (they were resized alike); a model fitted with "
            f"--image_size={size_text(suggestion)} keeps the shape and its detail."
        )
    mixed = mixed_sizes_note(sizes, hw, root)
    if mixed:
        notes.append(mixed)
    return notes


def check_square_input(files: Sequence[Path], side: int, root: Path | None = None) -> list[str]:
    """Notes about these images for a detector with a fixed square input (WinCLIP's CLIP).

    No size can be chosen (the CLIP model's input is `side` x `side`), so a
    non-square folder gets a note that it is resized out of shape, and mixed
    sizes are listed; nothing is refused.
    """
    sizes = survey(files)
    if not sizes:
        return []
    (w, h), _ = next(iter(sizes.items()))
    notes = []
    d = distortion(w, h, (side, side))
    if d >= DISTORTION:
        notes.append(
            f"note: the images are {w} wide x {h} high ({_shape(w, h)}); the CLIP model takes "
            f"{side}x{side}, so they are resized {d:.1f}:1 out of shape. The model works this "
            "way (every image is resized alike), but detail along the long side is squeezed; "
            "for elongated parts a PatchCore model (--method=patchcore+ --image_size=HxW) "
            "keeps the shape."
        )
    mixed = mixed_sizes_note(sizes, (side, side), root)
    if mixed:
        notes.append(mixed)
    return notes


def show(notes: Sequence[str], log: Callable[[str], None] = print) -> None:
    """Prints each note (one paragraph each)."""
    for line in notes:
        log(line)
