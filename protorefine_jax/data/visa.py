"""Reader for VisA (Zou et al. 2022) through its `split_csv/1cls.csv`.

The CSV has columns `object,split,label,image,mask`; `label` is `normal` or
`anomaly`; `image` and `mask` are paths relative to the VisA root, e.g.
`candle/Data/Images/Anomaly/000.JPG` and `candle/Data/Masks/Anomaly/000.png`.
VisA masks hold small class indices rather than 255, so they are binarised with
`> 0` (:data:`~protorefine_jax.data.imageio.VISA_MASK_THRESHOLD`). VisA has no
defect-type folders: anomalous items get the defect type `"anomaly"`.
"""

from __future__ import annotations

import csv
from pathlib import Path

from protorefine_jax.data.errors import (
    DatasetError,
    DatasetNotFoundError,
    EmptyTrainSetError,
    MissingMaskError,
    UnsafeNameError,
)
from protorefine_jax.data.folder import GOOD, CategoryData, TestItem, check_category_name
from protorefine_jax.data.imageio import VISA_MASK_THRESHOLD
from protorefine_jax.io.paths import UnsafePathError, safe_child

VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
_COLUMNS = ("object", "split", "label", "image", "mask")
_ALLOWED = {"split": ("train", "test"), "label": ("normal", "anomaly")}


class VisaSplitError(DatasetError, ValueError):
    """A row of VisA's split CSV has a `split` or `label` outside the allowed values."""


def read_visa_csv(root: str | Path) -> list[dict[str, str]]:
    """Rows of `<root>/split_csv/1cls.csv` as dicts (stripped strings).

    Every row must have `split` in {train, test} and `label` in {normal,
    anomaly} (exact, case-sensitive, after stripping spaces): anything else
    would silently count as a test / normal image.

    Raises:
      DatasetNotFoundError: missing root or CSV, or the CSV lacks a column.
      VisaSplitError: a row has another `split` or `label` (the message names
        the CSV, the line number and the bad value).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"VisA root {root} does not exist or is not a directory. Fix: pass the "
            "extracted VisA folder (with candle/, ..., split_csv/1cls.csv)."
        )
    csv_path = root / VISA_SPLIT_CSV
    if not csv_path.is_file():
        raise DatasetNotFoundError(
            f"VisA split file {csv_path} not found. Fix: pass the extracted VisA root "
            "(the folder with candle/, capsules/, ... and split_csv/1cls.csv)."
        )
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise DatasetNotFoundError(
                f"{csv_path} lacks column(s) {missing}; found {reader.fieldnames}. Fix: "
                f"use VisA's original split_csv/1cls.csv (header {','.join(_COLUMNS)})."
            )
        rows = []
        for row in reader:
            clean = {k: (row[k] or "").strip() for k in _COLUMNS}
            for column, allowed in _ALLOWED.items():
                if clean[column] not in allowed:
                    raise VisaSplitError(
                        f"{csv_path} line {reader.line_num}: {column} is {clean[column]!r}, "
                        f"expected one of {', '.join(allowed)}. Fix: correct this row or use "
                        "VisA's original split_csv/1cls.csv."
                    )
            rows.append(clean)
        return rows


def visa_categories(root: str | Path) -> tuple[str, ...]:
    """Sorted objects listed in the VisA split CSV under `root`."""
    return tuple(sorted({r["object"] for r in read_visa_csv(root)}))


def _listed(root: Path, name: str, column: str) -> Path:
    """`root / name` for a path from the CSV; refuses one that leaves the root."""
    try:
        return safe_child(root, name, f"{column} path in {root / VISA_SPLIT_CSV}")
    except UnsafePathError as e:
        raise UnsafeNameError(f"{e} Fix: list files under the VisA root only.") from e


def load_visa_category(
    root: str | Path,
    category: str,
    image_size: int = 256,
    mask_threshold: int = VISA_MASK_THRESHOLD,
) -> CategoryData:
    """Lists one VisA object from `split_csv/1cls.csv` and checks its files.

    Args:
      root: VisA root (holds `split_csv/1cls.csv` and the object folders).
      category: VisA object, e.g. `"candle"`.
      image_size: evaluation resolution `S`.
      mask_threshold: masks are binarised with `value > mask_threshold` (0).

    Returns:
      :class:`~protorefine_jax.data.folder.CategoryData` whose file names are
      relative to the VisA root.

    Raises:
      DatasetNotFoundError: missing root/CSV, unknown object (lists those in the
        CSV), or an image listed in the CSV is missing.
      EmptyTrainSetError: no `train,normal` row for the object.
      MissingMaskError: an anomalous test row has no mask, or its file is absent.
      VisaSplitError: a CSV row has a `split` / `label` outside the allowed values.
    """
    root = Path(root)
    check_category_name(category)
    rows = read_visa_csv(root)
    objects = sorted({r["object"] for r in rows})
    rows = [r for r in rows if r["object"] == category]
    if not rows:
        raise DatasetNotFoundError(
            f"VisA object '{category}' is not in {root / VISA_SPLIT_CSV}. Objects "
            f"listed there: {', '.join(objects)}. Fix: pass one of these."
        )
    train: list[Path] = []
    test: list[TestItem] = []
    for r in rows:
        image = _listed(root, r["image"], "image")
        if not image.is_file():
            raise DatasetNotFoundError(
                f"Image {image} listed in {root / VISA_SPLIT_CSV} does not exist. Fix: "
                "re-extract VisA so the CSV paths resolve under the root."
            )
        anomalous = r["label"] == "anomaly"
        if r["split"] == "train":
            # Few-shot support comes from normal images only; the 1cls split has
            # no anomalous training rows, but skip any rather than leak one in.
            if not anomalous:
                train.append(image)
            continue
        if not anomalous:
            test.append(TestItem(image, 0, GOOD, None))
            continue
        mask = _listed(root, r["mask"], "mask") if r["mask"] else None
        if mask is None or not mask.is_file():
            shown = mask if mask is not None else "(empty 'mask' column)"
            raise MissingMaskError(
                f"Anomalous VisA test image {image} has no mask: expected {shown}. "
                "Fix: restore the mask file under Data/Masks/Anomaly/ or fix the CSV row."
            )
        test.append(TestItem(image, 1, "anomaly", mask))
    if not train:
        raise EmptyTrainSetError(
            f"VisA object '{category}' has no 'train,normal' row in "
            f"{root / VISA_SPLIT_CSV}. Fix: use the original 1cls split, whose train "
            "split holds the normal images the support set is drawn from."
        )
    return CategoryData(
        category=category,
        root=root,
        image_size=image_size,
        mask_threshold=mask_threshold,
        train_good=tuple(sorted(train)),
        test=tuple(sorted(test, key=lambda t: (t.defect_type, t.path))),
    )
