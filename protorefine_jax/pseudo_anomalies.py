"""Synthetic defects pasted into good images: what the refinement check scores.

`calibration.refinement_check` asks, at fit time and from the support images
only, whether the refined half of PatchCore+ helps its host tell a defect
from normal variation. The defects it uses come from here: each good image
gets `count` copies, each with one defect of a kind that needs no outside
data (the kinds cycle):

- `cutpaste`: a rectangle (6-16 % of the shorter side per edge) cut from one
  place of the image, flipped both ways, scaled in brightness by 0.8-1.2 and
  pasted at another place (structure that does not belong there);
- `scar`: a thin ellipse (1.5-3.5 px wide, 12-30 % of the side long) of one
  random colour (a scratch, a stray fibre);
- `spot`: a smooth blob (radius 2-5 % of the side) 50-100 grey levels darker
  or brighter (a stain, a pit).

The sizes and intensities were fixed once, before any measurement, to look
like small surface defects at the 256 px inputs the detectors use; they were
not tuned (RESULTS.md, "Calibration that sees new parts").

Pure numpy, deterministic in the seed; no I/O.
"""

from __future__ import annotations

import zlib

import numpy as np

KINDS = ("cutpaste", "scar", "spot", "cutpaste")


def _ellipse(h: int, w: int, cy, cx, ry, rx, angle) -> np.ndarray:
    """`[h, w]` squared normalised radius of each pixel (1 on the ellipse's border)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    c, s = np.cos(angle), np.sin(angle)
    u = ((yy - cy) * c + (xx - cx) * s) / ry
    v = (-(yy - cy) * s + (xx - cx) * c) / rx
    return u * u + v * v


def pseudo_anomalies(image: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` copies of one image, each with one synthetic defect, and the defects' masks.

    Args:
      image: `[H, W, 3]` pixels in [0, 255] (H, W >= 16).
      count: copies `P` (>= 1); the kinds cycle through `KINDS`.
      seed: numpy generator seed.

    Returns:
      `([P, H, W, 3] uint8, [P, H, W] bool)`: the copies and where each defect is.
    """
    img = np.asarray(image, np.float64)
    if img.ndim != 3 or img.shape[-1] != 3 or min(img.shape[:2]) < 16:
        raise ValueError(f"image must be [H, W, 3] with H, W >= 16, got {img.shape}.")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")
    h, w = img.shape[:2]
    side = min(h, w)
    rng = np.random.default_rng(seed)
    out = np.empty((count, h, w, 3), np.uint8)
    masks = np.zeros((count, h, w), bool)
    for i in range(count):
        x = img.copy()
        kind = KINDS[i % len(KINDS)]
        if kind == "cutpaste":
            ph, pw = (max(2, int(rng.uniform(0.06, 0.16) * side)) for _ in range(2))
            sy, sx = rng.integers(0, h - ph), rng.integers(0, w - pw)
            ty, tx = rng.integers(0, h - ph), rng.integers(0, w - pw)
            patch = x[sy : sy + ph, sx : sx + pw][::-1, ::-1] * rng.uniform(0.8, 1.2)
            x[ty : ty + ph, tx : tx + pw] = patch
            masks[i, ty : ty + ph, tx : tx + pw] = True
        elif kind == "scar":
            length, width = rng.uniform(0.12, 0.3) * side, rng.uniform(1.5, 3.5)
            cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
            inside = _ellipse(h, w, cy, cx, width, length / 2, rng.uniform(0, np.pi)) <= 1
            x[inside] = rng.uniform(0, 255, 3)
            masks[i] = inside
        else:
            r = rng.uniform(0.02, 0.05) * side
            cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
            d = _ellipse(h, w, cy, cx, r, r * rng.uniform(0.6, 1.6), rng.uniform(0, np.pi))
            sign = rng.choice([-1.0, 1.0])
            x = x + (np.exp(-d) * (d <= 4))[..., None] * sign * rng.uniform(50, 100)
            masks[i] = d <= 1
        out[i] = np.clip(np.round(x), 0, 255).astype(np.uint8)
    return out, masks


def support_pseudo_anomalies(
    images: np.ndarray, count: int, salt: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`pseudo_anomalies` of each support image, seeded by a checksum of its pixels.

    An image gets the same defects whatever its position in the support set
    and whichever tool fits the detector (as `calibration.nuisance_views`).

    Args:
      images: `[k, H, W, 3]` support images.
      count: copies per image.
      salt: XORed into every seed (another draw of defects).

    Returns:
      `([k, P, H, W, 3] uint8, [k, P, H, W] bool)`.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [k, H, W, 3], got shape {images.shape}.")
    pairs = [
        pseudo_anomalies(im, count, zlib.crc32(np.ascontiguousarray(im).tobytes()) ^ salt)
        for im in images
    ]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
