"""Named datasets: standard category lists and one entry point for every reader.

`"mvtec"`, `"mpdd"` and `"folder"` use the MVTec-layout reader
(:func:`~protorefine_jax.data.folder.load_category`); `"visa"` uses the CSV
reader (:func:`~protorefine_jax.data.visa.load_visa_category`). For the three
named benchmarks an unknown category is rejected before touching the disk (a
typo should not read as "folder missing"); `"folder"` accepts whatever
category folders exist under the root.
"""

from __future__ import annotations

from pathlib import Path

from protorefine_jax.data.errors import UnknownCategoryError
from protorefine_jax.data.folder import CategoryData, discover_categories, load_category
from protorefine_jax.data.visa import load_visa_category, visa_categories

MVTEC_CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
MPDD_CATEGORIES = (
    "bracket_black",
    "bracket_brown",
    "bracket_white",
    "connector",
    "metal_plate",
    "tubes",
)
VISA_CATEGORIES = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)
KNOWN_CATEGORIES: dict[str, tuple[str, ...]] = {
    "mvtec": MVTEC_CATEGORIES,
    "mpdd": MPDD_CATEGORIES,
    "visa": VISA_CATEGORIES,
}
DATASETS = ("mvtec", "mpdd", "visa", "folder")


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise UnknownCategoryError(
            f"Unknown dataset '{dataset}'. Known datasets: {', '.join(DATASETS)}. Fix: use "
            "'folder' for any directory in the MVTec layout."
        )


def check_category(dataset: str, category: str) -> None:
    """Raises if `category` is not a standard category of the named `dataset`.

    Raises:
      UnknownCategoryError: unknown dataset, or a category outside the standard
        list (the message lists the known ones). `"folder"` accepts any name.
    """
    _check_dataset(dataset)
    known = KNOWN_CATEGORIES.get(dataset)
    if known is not None and category not in known:
        raise UnknownCategoryError(
            f"Unknown {dataset} category '{category}'. Known {dataset} categories: "
            f"{', '.join(known)}. Fix: pick one of these, or use dataset 'folder' for "
            "a custom folder."
        )


def list_categories(dataset: str, root: str | Path | None = None) -> tuple[str, ...]:
    """Categories of a dataset.

    Args:
      dataset: one of :data:`DATASETS`.
      root: dataset folder. Required for `"folder"` (categories are the
        sub-folders holding `train/good`); for a named benchmark, restricts the
        standard list to the categories present under `root` (standard order).

    Returns:
      Category names (possibly empty when `root` holds none of them).

    Raises:
      UnknownCategoryError: unknown dataset.
      ValueError: `"folder"` without `root`.
      DatasetNotFoundError: `root` does not exist.
    """
    _check_dataset(dataset)
    if dataset == "folder":
        if root is None:
            raise ValueError(
                "Dataset 'folder' has no fixed category list. Fix: pass root=<folder "
                "holding <category>/train/good>."
            )
        return discover_categories(root)
    known = KNOWN_CATEGORIES[dataset]
    if root is None:
        return known
    present = set(visa_categories(root) if dataset == "visa" else discover_categories(root))
    return tuple(c for c in known if c in present)


def load_dataset_category(
    dataset: str,
    root: str | Path,
    category: str,
    image_size: int = 256,
    require_masks: bool = True,
) -> CategoryData:
    """Lists one category of a named dataset (see :data:`DATASETS`).

    Args:
      dataset: `"mvtec"`, `"mpdd"`, `"visa"` or `"folder"`.
      root: dataset folder (the VisA root for `"visa"`).
      category: category / object name.
      image_size: evaluation resolution `S`.
      require_masks: MVTec layout: False keeps defective images without a
        mask (image-level labels only; `load_category`).

    Returns:
      :class:`~protorefine_jax.data.folder.CategoryData` (lazy).

    Raises:
      UnknownCategoryError: unknown dataset or category (lists known ones).
      DatasetError: see :func:`~protorefine_jax.data.folder.load_category` and
        :func:`~protorefine_jax.data.visa.load_visa_category`.
    """
    check_category(dataset, category)
    if dataset == "visa":
        return load_visa_category(root, category, image_size=image_size)
    return load_category(root, category, image_size=image_size, require_masks=require_masks)
