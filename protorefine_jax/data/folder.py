"""Reader for datasets in the MVTec-AD folder layout (MVTec AD, MPDD, user folders).

Layout (0 = normal, 255 = defect in masks)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect_type>/<name>.png
    <root>/<category>/ground_truth/<defect_type>/<name>_mask.png

:func:`load_category` only lists and checks files (cheap: no pixel is decoded);
pixels are decoded lazily, in batches, by :meth:`CategoryData.load_images` and
:meth:`CategoryData.test_batches`. A missing mask is caught at listing time,
a corrupt image when it is first decoded (the error names the file).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from protorefine_jax.data.errors import (
    DatasetNotFoundError,
    EmptyTrainSetError,
    MissingMaskError,
    OneClassTestSetError,
    UnsafeNameError,
)
from protorefine_jax.data.imageio import (
    MVTEC_MASK_THRESHOLD,
    is_image_file,
    read_images,
    read_mask,
    unreadable,
)
from protorefine_jax.features.preprocess import image_hw
from protorefine_jax.io.paths import UnsafePathError, check_relative, json_safe_text

GOOD = "good"


class TestItem(NamedTuple):
    """One test image.

    Attributes:
      path: image file.
      label: 0 normal, 1 anomalous.
      defect_type: `"good"` for normal images, else the defect folder name.
      mask_path: ground-truth mask file; None for normal images (and for
        defective ones without a mask, read with `require_masks=False`).
    """

    __test__ = False  # not a pytest test class, despite the name

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None

    @property
    def mask_known(self) -> bool:
        """Whether the ground-truth mask is known (good images: empty; defective: a file)."""
        return self.label == 0 or self.mask_path is not None


class TestBatch(NamedTuple):
    """A decoded batch of test images.

    Attributes:
      images: `[B, S, S, 3]` uint8 RGB.
      masks: `[B, S, S]` bool (all False for normal images).
      labels: `[B]` int32, 0 normal / 1 anomalous.
      items: the `B` :class:`TestItem` s, for file names and defect types.
    """

    __test__ = False  # not a pytest test class, despite the name

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    items: tuple[TestItem, ...]


class CategoryFiles:
    """Label, defect-type and name helpers shared by the category readers.

    Needs `category`, `root` and `test` (a sequence of `TestItem`); `CategoryData` and
    `tfds_source.TfdsCategory` both provide them.
    """

    @property
    def test_labels(self) -> np.ndarray:
        """`[T]` int32 image labels of the test set (0 normal, 1 anomalous)."""
        return np.asarray([t.label for t in self.test], np.int32)

    @property
    def defect_types(self) -> tuple[str, ...]:
        """Sorted defect types present in the test set (without `"good"`)."""
        return tuple(sorted({t.defect_type for t in self.test if t.label == 1}))

    def check_both_classes(self) -> None:
        """Raises unless the test set holds good AND defective images.

        Image AUROC and F1-max are undefined on one class; the evaluation
        calls this when it lists the files, before any feature extraction.

        Raises:
          OneClassTestSetError: only good or only defective test images
            (names the category, its folder, the counts and the fix).
        """
        labels = self.test_labels
        bad = int(np.count_nonzero(labels))
        if 0 < bad < labels.size:
            return
        has = "good" if bad == 0 else "defective"
        lacks = "defective" if bad == 0 else "good"
        raise OneClassTestSetError(
            f"The test set of category '{self.category}' ({self.root}) holds only {has} images "
            f"({labels.size}) and no {lacks} one; image AUROC and F1-max need both, so the "
            f"run is refused before any feature extraction. Fix: add {lacks} test images "
            "(MVTec layout: test/good/ for good ones, test/<defect_type>/ with masks in "
            "ground_truth/<defect_type>/ for defective ones), or leave this category out "
            "(--categories). To set a decision threshold from good images only, use "
            "experiments.fit."
        )

    def name(self, path: Path) -> str:
        r"""File name relative to :attr:`root` (POSIX), as stored with results.

        Always valid UTF-8 (:func:`~protorefine_jax.io.paths.json_safe_text`):
        bytes of a non-UTF-8 file name appear as ``\xNN``.
        """
        return json_safe_text(Path(path).relative_to(self.root).as_posix())


@dataclasses.dataclass(frozen=True)
class CategoryData(CategoryFiles):
    """File lists of one category, decoded lazily at `image_size`.

    Attributes:
      category: category name.
      root: folder that reported file names are relative to (the category
        folder for the MVTec layout, the dataset root for VisA).
      image_size: evaluation resolution `S` of images and masks.
      mask_threshold: masks are binarised with `value > mask_threshold`.
      train_good: sorted defect-free training images (the few-shot pool).
      test: test images, sorted by (defect type, file name).
      resample: image resize filter, `"bilinear"` (CNN backbones) or
        `"bicubic"` (CLIP / WinCLIP, as anomalib); masks are always nearest.
    """

    category: str
    root: Path
    image_size: int
    mask_threshold: int
    train_good: tuple[Path, ...]
    test: tuple[TestItem, ...]
    resample: str = "bilinear"

    def load_images(self, paths: Sequence[Path]) -> np.ndarray:
        """Decodes images (e.g. a support set).

        Args:
          paths: `B` image files.

        Returns:
          `[B, S, S, 3]` uint8 RGB.
        """
        return read_images(tuple(paths), self.image_size, self.resample)

    def load_masks(self, items: Sequence[TestItem]) -> np.ndarray:
        """Decodes the masks of test items; normal items get an all-False mask.

        Args:
          items: `B` test items.

        Returns:
          `[B, S, S]` bool.
        """
        out = np.zeros((len(items), *image_hw(self.image_size)), bool)
        for i, item in enumerate(items):
            if item.mask_path is not None:
                out[i] = read_mask(
                    item.mask_path, self.image_size, self.mask_threshold, image_path=item.path
                )
        return out

    def test_batches(self, batch_size: int) -> Iterator[TestBatch]:
        """Yields the test set in order, `batch_size` images at a time (last may be short)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        for start in range(0, len(self.test), batch_size):
            items = self.test[start : start + batch_size]
            yield TestBatch(
                images=self.load_images([t.path for t in items]),
                masks=self.load_masks(items),
                labels=np.asarray([t.label for t in items], np.int32),
                items=items,
            )


def _images_in(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    except PermissionError as e:
        raise unreadable(folder, "Folder", e) from e


def discover_categories(root: str | Path) -> tuple[str, ...]:
    """Sorted names of the sub-folders of `root` that contain `train/good`.

    Raises:
      DatasetNotFoundError: `root` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"Dataset root {root} does not exist or is not a directory. Fix: pass the "
            "folder that holds the category folders (<root>/<category>/train/good/*.png)."
        )
    return tuple(sorted(p.name for p in root.iterdir() if (p / "train" / GOOD).is_dir()))


def _find_mask(gt_dir: Path, image: Path) -> Path | None:
    expected = gt_dir / f"{image.stem}_mask.png"
    if expected.is_file():
        return expected
    # Some exports keep the image's own extension for masks (e.g. .bmp, .tif).
    if gt_dir.is_dir():
        for cand in sorted(gt_dir.glob(f"{image.stem}_mask.*")):
            if is_image_file(cand):
                return cand
    return None


def check_category_name(category: str) -> str:
    """Returns `category` if it is one plain folder name (no separator, no `..`).

    Raises:
      UnsafeNameError: the name would leave the dataset root, or is not a
        single folder name.
    """
    try:
        return check_relative(category, "Category", single=True)
    except UnsafePathError as e:
        raise UnsafeNameError(
            f"{e} Fix: pass the name of a category folder directly under the dataset root."
        ) from e


def load_category(
    root: str | Path,
    category: str,
    image_size: int = 256,
    mask_threshold: int = MVTEC_MASK_THRESHOLD,
    require_masks: bool = True,
) -> CategoryData:
    """Lists one category of an MVTec-layout dataset and checks its files.

    Args:
      root: dataset folder holding `<category>/train/good` etc.
      category: category folder name (e.g. `"bottle"`, `"metal_plate"`).
      image_size: evaluation resolution `S` (256 PatchCore+, 240 WinCLIP+).
      mask_threshold: masks are binarised with `value > mask_threshold`
        (default 127; see :mod:`protorefine_jax.data.imageio`).
      require_masks: a defective image without a mask is an error (True) or
        kept with `mask_path=None` (image-level labels only; its mask is then
        unknown, not empty: see `TestItem.mask_known`).

    Returns:
      The :class:`CategoryData`; nothing is decoded yet.

    Raises:
      UnsafeNameError: `category` is not a single folder name (`..`, `/`).
      DatasetNotFoundError: missing root, category (lists those found) or `test`.
      EmptyTrainSetError: `train/good` is missing or holds no image.
      MissingMaskError: a defective test image has no mask (names image and
        the expected mask path).
    """
    root = Path(root)
    check_category_name(category)
    found = discover_categories(root)
    cat_dir = root / category
    if not cat_dir.is_dir():
        listing = ", ".join(found) if found else "none (no <category>/train/good folder)"
        raise DatasetNotFoundError(
            f"Category '{category}' not found: {cat_dir} does not exist. Categories "
            f"found under {root}: {listing}. Fix: pass one of these, or point the root "
            "at the folder that holds the category folders."
        )
    good_dir = cat_dir / "train" / GOOD
    train_good = tuple(_images_in(good_dir)) if good_dir.is_dir() else ()
    if not train_good:
        raise EmptyTrainSetError(
            f"No good training image in {good_dir} (missing or empty folder). Fix: put "
            f"the defect-free images of '{category}' in {good_dir}/*.png; the few-shot "
            "support set is drawn from there."
        )
    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise DatasetNotFoundError(
            f"No test folder {test_dir}. Fix: put test images in {test_dir}/good/ and "
            f"{test_dir}/<defect_type>/, with masks in {cat_dir}/ground_truth/<defect_type>/."
        )
    test: list[TestItem] = []
    missing: list[tuple[Path, Path]] = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect_type = type_dir.name
        for img in _images_in(type_dir):
            if defect_type == GOOD:
                test.append(TestItem(img, 0, GOOD, None))
                continue
            gt_dir = cat_dir / "ground_truth" / defect_type
            mask = _find_mask(gt_dir, img)
            if mask is None and not require_masks:
                test.append(TestItem(img, 1, defect_type, None))
            elif mask is None:
                missing.append((img, gt_dir / f"{img.stem}_mask.png"))
            else:
                test.append(TestItem(img, 1, defect_type, mask))
    if missing:
        img, expected = missing[0]
        raise MissingMaskError(
            f"Defective test image {img} has no ground-truth mask: expected {expected} "
            f"({len(missing)} defective image(s) without a mask in total). Fix: add the "
            "mask (0 = normal, 255 = defect, same name with '_mask.png'), or move the "
            "image out of the test folder."
        )
    if not test:
        raise DatasetNotFoundError(
            f"No test image under {test_dir}. Fix: put normal test images in "
            f"{test_dir}/good/ and defective ones in {test_dir}/<defect_type>/."
        )
    return CategoryData(
        category=category,
        root=cat_dir,
        image_size=image_size,
        mask_threshold=mask_threshold,
        train_good=train_good,
        test=tuple(test),
    )
