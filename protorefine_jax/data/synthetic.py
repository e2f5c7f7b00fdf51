"""Procedural textures with synthetic defects, written in the MVTec folder layout.

The no-download default: `make_synthetic_dataset(tmp)` writes a small dataset
that :func:`~protorefine_jax.data.folder.load_category` reads like MVTec AD.

Categories (textures with per-image jitter, so normal images differ):

- `fabric`: a woven sine pattern; period, orientation and phase jitter.
- `grain`: streaky wood-like low-pass noise, a new random field per image.
- `tiles`: a grid of tiles with per-tile shade and random grid offset.

Defects (`test/<type>/`, exact masks in `ground_truth/<type>/*_mask.png`):

- `scratch`: a thin curved darker or brighter line (1.5-3.5 px wide);
- `blob`: an irregular stain that flattens the texture towards a tint;
- `spot`: a small disc of shifted colour.

A defect changes pixels inside its mask only; the mask is exactly the changed
region (before uint8 rounding). Amplitudes are drawn in [0.35, 1] x
`defect_strength`, so some defects are faint: a good detector lands well above
chance but not at 100 % image AUROC. Each image has its own random stream,
seeded by (seed, category, split, index), so enlarging a split leaves the
existing images unchanged.

Measured difficulty (plain PatchCore, EfficientNet-Lite0 official
aggregation, full bank of the first k train images, 15 good + 15 defective
test images, image AUROC at k = 1 / 2 / 4): fabric 95 / 96 / 92, grain
88 / 93 / 93, tiles 79 / 69 / 73. Per defect type (k = 4) faint blobs on
fabric and spots on grain / tiles are the hard cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

SYNTHETIC_CATEGORIES = ("fabric", "grain", "tiles")
DEFECT_TYPES = ("scratch", "blob", "spot")
_SPLIT_CODES = {"train": 0, "test_good": 1, "test_defect": 2}


class SyntheticSample(NamedTuple):
    """One rendered image.

    Attributes:
      image: `[S, S, 3]` uint8, with the defect (if any).
      clean: `[S, S, 3]` uint8, the same texture without the defect.
      mask: `[S, S]` bool, True where the defect changed the texture.
      defect_type: `"good"` or one of :data:`DEFECT_TYPES`.
    """

    image: np.ndarray
    clean: np.ndarray
    mask: np.ndarray
    defect_type: str


def _smooth_noise(rng: np.random.Generator, s: int, sigma_yx: tuple[float, float]) -> np.ndarray:
    """Unit-variance Gaussian-filtered noise `[s, s]` (periodic, via FFT)."""
    f = np.fft.fftfreq(s)
    fy, fx = f[:, None], f[None, :]
    kernel = np.exp(-2.0 * np.pi**2 * (sigma_yx[0] ** 2 * fy**2 + sigma_yx[1] ** 2 * fx**2))
    field = np.fft.ifft2(np.fft.fft2(rng.standard_normal((s, s))) * kernel).real
    return (field - field.mean()) / (field.std() + 1e-12)


def _palette(t: np.ndarray, c0, c1, rng: np.random.Generator) -> np.ndarray:
    """Maps `t: [s, s]` in ~[0, 1] between two jittered colours -> `[s, s, 3]` float."""
    c0 = np.asarray(c0, np.float64) + rng.uniform(-8, 8, 3)
    c1 = np.asarray(c1, np.float64) + rng.uniform(-8, 8, 3)
    return c0 + t[..., None] * (c1 - c0)


def _texture(category: str, rng: np.random.Generator, s: int) -> np.ndarray:
    """A defect-free texture `[s, s, 3]` float in [0, 255]."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    if category == "fabric":
        period = 12.0 * rng.uniform(0.95, 1.05)
        theta = np.deg2rad(rng.uniform(-4, 4))
        u = xx * np.cos(theta) + yy * np.sin(theta)
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        w = np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
        w *= np.sin(2 * np.pi * v / period + rng.uniform(0, 2 * np.pi))
        t = 0.5 + 0.4 * w + 0.05 * _smooth_noise(rng, s, (30.0, 30.0))
        rgb = _palette(t, (55, 65, 105), (165, 175, 205), rng)
    elif category == "grain":
        field = _smooth_noise(rng, s, (2.5, 14.0))  # streaks along x
        rings = np.sin(3.0 * _smooth_noise(rng, s, (20.0, 60.0)) + 0.8 * field)
        t = 0.5 + 0.2 * field + 0.15 * rings
        rgb = _palette(t, (105, 70, 40), (205, 160, 110), rng)
    elif category == "tiles":
        period = 32
        oy, ox = rng.integers(0, period, 2)
        ty, tx = (yy + oy) // period, (xx + ox) // period
        shades = rng.uniform(0.55, 0.75, (s // period + 2, s // period + 2))
        t = shades[ty.astype(int), tx.astype(int)]
        grout = (((yy + oy) % period) < 3) | (((xx + ox) % period) < 3)
        t = np.where(grout, 0.15, t) + 0.04 * _smooth_noise(rng, s, (1.0, 1.0))
        rgb = _palette(t, (60, 60, 60), (215, 205, 190), rng)
    else:
        raise ValueError(
            f"Unknown synthetic category '{category}'. Known: {', '.join(SYNTHETIC_CATEGORIES)}."
        )
    rgb = rgb * rng.uniform(0.94, 1.06)  # global exposure jitter
    rgb += rng.normal(0.0, 3.0, rgb.shape)  # sensor noise
    return np.clip(rgb, 0, 255)


def _scratch_mask(rng: np.random.Generator, s: int) -> np.ndarray:
    p0 = rng.uniform(0.15 * s, 0.85 * s, 2)
    ang = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.15, 0.45) * s
    p2 = np.clip(p0 + length * np.array([np.sin(ang), np.cos(ang)]), 2, s - 3)
    p1 = (p0 + p2) / 2 + rng.normal(0, 0.15 * length, 2)  # bend
    t = np.linspace(0, 1, 256)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # [256, 2] (y, x)
    half = rng.uniform(0.75, 1.75)
    lo = np.maximum(np.floor(curve.min(0) - 3), 0).astype(int)
    hi = np.minimum(np.ceil(curve.max(0) + 4), s).astype(int)
    yy, xx = np.mgrid[lo[0] : hi[0], lo[1] : hi[1]]
    d2 = (yy[..., None] - curve[:, 0]) ** 2 + (xx[..., None] - curve[:, 1]) ** 2
    mask = np.zeros((s, s), bool)
    mask[lo[0] : hi[0], lo[1] : hi[1]] = d2.min(-1) <= half**2
    return mask


def _blob_mask(rng: np.random.Generator, s: int, radius: tuple[float, float]) -> np.ndarray:
    r0 = rng.uniform(*radius) * s / 256
    cy, cx = rng.uniform(r0 + 4, s - r0 - 4, 2)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    ang = np.arctan2(yy - cy, xx - cx)
    # A few random harmonics make the outline irregular rather than a disc.
    wobble = sum(
        rng.uniform(-0.2, 0.2) * np.cos(k * ang + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    return np.hypot(yy - cy, xx - cx) <= r0 * (1.0 + wobble)


def _apply_defect(
    clean: np.ndarray, defect: str, rng: np.random.Generator, strength: float
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the defective image `[s, s, 3]` float and its mask `[s, s]` bool."""
    s = clean.shape[0]
    amp = rng.uniform(0.35, 1.0) * strength
    img = clean.copy()
    if defect == "scratch":
        mask = _scratch_mask(rng, s)
        sign = rng.choice([-1.0, 1.0])
        img[mask] = img[mask] + sign * amp * 70.0
    elif defect == "blob":
        mask = _blob_mask(rng, s, (6.0, 16.0))
        tint = clean[mask].mean(0) + rng.normal(0, 25.0, 3)
        img[mask] = (1 - 0.8 * amp) * img[mask] + 0.8 * amp * tint
    elif defect == "spot":
        mask = _blob_mask(rng, s, (3.0, 7.0))
        direction = rng.normal(0, 1, 3)
        direction /= np.linalg.norm(direction)
        img[mask] = img[mask] + amp * 60.0 * direction
    else:
        raise ValueError(f"Unknown defect type '{defect}'. Known: {', '.join(DEFECT_TYPES)}.")
    return np.clip(img, 0, 255), mask


def render(
    category: str,
    split: str,
    index: int,
    seed: int = 0,
    image_size: int = 256,
    defect_strength: float = 1.0,
) -> SyntheticSample:
    """Renders one image deterministically.

    Args:
      category: one of :data:`SYNTHETIC_CATEGORIES`.
      split: `"train"`, `"test_good"` or `"test_defect"`.
      index: image index within the split; for `"test_defect"` the defect type
        is `DEFECT_TYPES[index % 3]`.
      seed: dataset seed.
      image_size: side `S`.
      defect_strength: scales every defect amplitude (1.0 default).

    Returns:
      :class:`SyntheticSample` with `[S, S, 3]` images and an `[S, S]` mask.
    """
    if category not in SYNTHETIC_CATEGORIES:
        raise ValueError(
            f"Unknown synthetic category '{category}'. Known: {', '.join(SYNTHETIC_CATEGORIES)}."
        )
    if split not in _SPLIT_CODES:
        raise ValueError(f"Unknown split '{split}'. Known: {', '.join(_SPLIT_CODES)}.")
    key = [seed, SYNTHETIC_CATEGORIES.index(category), _SPLIT_CODES[split], index]
    rng = np.random.default_rng(np.random.SeedSequence(key))
    clean = _texture(category, rng, image_size)
    if split != "test_defect":
        out = np.round(clean).astype(np.uint8)
        return SyntheticSample(out, out, np.zeros((image_size,) * 2, bool), "good")
    defect = DEFECT_TYPES[index % len(DEFECT_TYPES)]
    img, mask = _apply_defect(clean, defect, rng, defect_strength)
    return SyntheticSample(
        np.round(img).astype(np.uint8), np.round(clean).astype(np.uint8), mask, defect
    )


def make_synthetic_dataset(
    root: str | Path,
    categories: Sequence[str] = ("fabric", "grain"),
    num_train: int = 10,
    num_test_good: int = 10,
    num_test_defect: int = 10,
    image_size: int = 256,
    seed: int = 0,
    defect_strength: float = 1.0,
) -> Path:
    """Writes a synthetic dataset in the MVTec layout under `root`.

    Args:
      root: output folder (created; existing files of the same names are
        overwritten).
      categories: subset of :data:`SYNTHETIC_CATEGORIES`.
      num_train: images in `train/good`.
      num_test_good: images in `test/good`.
      num_test_defect: defective images, spread round-robin over
        `test/{scratch,blob,spot}` with masks in `ground_truth/`.
      image_size: side `S` of the PNGs.
      seed: dataset seed; the output is a deterministic function of the args.
      defect_strength: scales every defect amplitude.

    Returns:
      `root` as a Path (pass it to `load_category(root, category)`).
    """
    root = Path(root)
    for category in categories:
        cat = root / category
        for split, count in (("train", num_train), ("test_good", num_test_good)):
            folder = cat / ("train/good" if split == "train" else "test/good")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                sample = render(category, split, i, seed, image_size, defect_strength)
                Image.fromarray(sample.image).save(folder / f"{i:03d}.png", compress_level=1)
        for i in range(num_test_defect):
            sample = render(category, "test_defect", i, seed, image_size, defect_strength)
            name = f"{i // len(DEFECT_TYPES):03d}"
            img_dir = cat / "test" / sample.defect_type
            gt_dir = cat / "ground_truth" / sample.defect_type
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(sample.image).save(img_dir / f"{name}.png", compress_level=1)
            mask = sample.mask.astype(np.uint8) * 255
            Image.fromarray(mask).save(gt_dir / f"{name}_mask.png", compress_level=1)
    return root
