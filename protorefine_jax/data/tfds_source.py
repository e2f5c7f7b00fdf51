"""A prepared TFDS category (`tfds_builders`) behind the folder reader's interface.

`load_tfds_category` prepares (once) the category's array_record files with
`tfds_builders.prepare_category` and returns a `TfdsCategory`, which offers
what the evaluation uses from `folder.CategoryData` (`train_good`, `test`,
`load_images`, `test_batches`, `name`, ...) from the prepared arrays. File
names and orders are those of the folder reader, so seeded support sets and
metrics are the same as with `--data_source=folder` (tests/test_tfds_source.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from protorefine_jax.data.errors import DatasetNotFoundError
from protorefine_jax.data.folder import GOOD, CategoryFiles, TestBatch, TestItem


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsCategory(CategoryFiles):
    """One category read from prepared TFDS files (see the module docstring).

    Attributes:
      category: category name.
      root: the folder names are relative to (as `CategoryData.root`).
      image_size: side `S` of the prepared arrays.
      train_good: `root / filename` of the train split, sorted.
      test: test items in the folder reader's order; `mask_path` is a
        placeholder path for defective images (the mask is in the arrays).
      arrays: filename -> `(image [S, S, 3] uint8, mask [S, S] bool)`.
    """

    category: str
    root: Path
    image_size: int
    train_good: tuple[Path, ...]
    test: tuple[TestItem, ...]
    arrays: dict[str, tuple[np.ndarray, np.ndarray]]
    mask_threshold: int = 127
    resample: str = "bilinear"

    def _get(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        key = self.name(path)
        if key not in self.arrays:
            raise DatasetNotFoundError(
                f"{key} is not in the prepared TFDS data of {self.category!r}; re-prepare it "
                "(delete the --tfds_dir folder of this category) after changing the dataset."
            )
        return self.arrays[key]

    def load_images(self, paths: Sequence[Path]) -> np.ndarray:
        """`[B, S, S, 3]` uint8 images of `paths`."""
        if self.resample != "bilinear":
            raise ValueError(
                f"the TFDS files hold bilinearly resized images; this detector resizes with "
                f"{self.resample!r} (WinCLIP). Use --data_source=folder."
            )
        s = self.image_size
        out = np.zeros((len(paths), s, s, 3), np.uint8)
        for i, p in enumerate(paths):
            out[i] = self._get(p)[0]
        return out

    def load_masks(self, items: Sequence[TestItem]) -> np.ndarray:
        """`[B, S, S]` bool masks of test items."""
        s = self.image_size
        out = np.zeros((len(items), s, s), bool)
        for i, item in enumerate(items):
            out[i] = self._get(item.path)[1]
        return out

    def test_batches(self, batch_size: int) -> Iterator[TestBatch]:
        """The test set in order, `batch_size` images at a time."""
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


def _folder_order(filename: str) -> tuple[str, str]:
    """The folder reader's order: defect-type folder, then path."""
    parts = filename.split("/")
    return (parts[-2] if len(parts) > 1 else "", filename)


def load_tfds_category(
    dataset: str, root: str | Path, category: str, data_dir: str | Path, image_size: int = 256
) -> TfdsCategory:
    """Prepares (once, into `data_dir`) and reads one category through TFDS.

    Args:
      dataset: `"mvtec"`, `"mpdd"` or `"folder"` (MVTec layout).
      root: the extracted dataset (TFDS's manual directory).
      category: category name.
      data_dir: where the array_record files live (`--tfds_dir`).
      image_size: side `S`.

    Returns:
      The `TfdsCategory`.
    """
    from protorefine_jax.data import tfds_builders  # imports tensorflow_datasets

    if not isinstance(image_size, int):
        raise ValueError(
            f"--data_source=tfds prepares square images (one side S); got image_size "
            f"{image_size}. Use --data_source=folder for HEIGHTxWIDTH sizes."
        )
    if dataset == "visa":
        raise ValueError(
            "--data_source=tfds reads MVTec-layout datasets (mvtec, mpdd, folder); VisA's "
            "builder keys files by the CSV's paths: use --data_source=folder for VisA."
        )
    builder = tfds_builders.prepare_category(dataset, root, category, data_dir, image_size)
    train = tfds_builders.read_split(builder, "train")
    test = tfds_builders.read_split(builder, "test")
    cat_root = Path(root) / category
    arrays = {}
    for split in (train, test):
        for name, img, mask in zip(split["filename"], split["image"], split["mask"], strict=True):
            arrays[str(name)] = (img, mask)
    items = []
    order = sorted(range(len(test["filename"])), key=lambda i: _folder_order(test["filename"][i]))
    for i in order:
        name, label, kind = str(test["filename"][i]), int(test["label"][i]), test["defect_type"][i]
        path = cat_root / name
        items.append(
            TestItem(path, label, GOOD if label == 0 else str(kind), None if label == 0 else path)
        )
    return TfdsCategory(
        category=category,
        root=cat_root,
        image_size=image_size,
        train_good=tuple(sorted(cat_root / str(n) for n in train["filename"])),
        test=tuple(items),
        arrays=arrays,
    )
