"""VisA reader (split_csv/1cls.csv) on a generated tree."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protorefine_jax import data
from protorefine_jax.data.visa import VisaSplitError

H, W = 24, 40  # VisA images are not square: the reader resizes without crop


def write_visa_tree(root: Path, missing_mask: bool = False) -> Path:
    """Two objects; candle has 3 train normals, 2 test normals, 2 anomalies.

    Masks store class indices (1, 2), as VisA's do, not 255.
    """
    rows = ["object,split,label,image,mask"]
    rng = np.random.default_rng(0)
    for obj, n_train in (("candle", 3), ("pcb1", 1)):
        img_dir = root / obj / "Data" / "Images"
        mask_dir = root / obj / "Data" / "Masks" / "Anomaly"
        for sub in ("Normal", "Anomaly"):
            (img_dir / sub).mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n_train + 2):
            name = f"{i:04d}.JPG"
            img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            Image.fromarray(img).save(img_dir / "Normal" / name)
            split = "train" if i < n_train else "test"
            rows.append(f"{obj},{split},normal,{obj}/Data/Images/Normal/{name},")
        for i in range(2):
            img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            Image.fromarray(img).save(img_dir / "Anomaly" / f"{i:03d}.JPG")
            mask = np.zeros((H, W), np.uint8)
            mask[4:12, 8 : 8 + 8 * (i + 1)] = i + 1
            if not (missing_mask and obj == "candle" and i == 1):
                Image.fromarray(mask).save(mask_dir / f"{i:03d}.png")
            rows.append(
                f"{obj},test,anomaly,{obj}/Data/Images/Anomaly/{i:03d}.JPG,"
                f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            )
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_visa_listing_and_masks(tmp_path):
    root = write_visa_tree(tmp_path / "visa")
    assert data.visa_categories(root) == ("candle", "pcb1")
    d = data.load_dataset_category("visa", root, "candle", image_size=16)
    assert [d.name(p) for p in d.train_good] == [
        f"candle/Data/Images/Normal/{i:04d}.JPG" for i in range(3)
    ]
    assert d.test_labels.tolist() == [1, 1, 0, 0]
    assert {t.defect_type for t in d.test} == {"anomaly", "good"}
    batch = next(d.test_batches(batch_size=8))
    assert batch.images.shape == (4, 16, 16, 3)
    # Index-valued masks (1, 2) survive the > 0 threshold; resized to 16x16.
    ref = np.zeros((H, W), np.uint8)
    ref[4:12, 8:16] = 255
    expected = np.asarray(Image.fromarray(ref).resize((16, 16), Image.Resampling.NEAREST)) > 0
    np.testing.assert_array_equal(batch.masks[0], expected)
    assert batch.masks[1].sum() > batch.masks[0].sum() > 0
    assert not batch.masks[2:].any()
    assert data.list_categories("visa", root) == ("candle", "pcb1")


def test_visa_errors(tmp_path):
    root = write_visa_tree(tmp_path / "visa", missing_mask=True)
    expected = root / "candle/Data/Masks/Anomaly/001.png"
    with pytest.raises(data.MissingMaskError, match=re.escape(f"expected {expected}") + ".*Fix"):
        data.load_visa_category(root, "candle")
    with pytest.raises(
        data.DatasetNotFoundError, match=r"VisA object 'cashew' is not in .*: candle, pcb1\. Fix"
    ):
        data.load_visa_category(root, "cashew")
    with pytest.raises(data.DatasetNotFoundError, match=r"split file .*1cls\.csv not found.*Fix"):
        data.load_visa_category(root / "candle", "candle")
    with pytest.raises(data.DatasetNotFoundError, match=r"VisA root .* does not exist.*Fix"):
        data.load_visa_category(tmp_path / "nope", "candle")


@pytest.mark.parametrize(
    "column,bad",
    [("label", "Anomaly"), ("label", "good"), ("label", ""), ("split", "val"), ("split", "Train")],
)
def test_visa_bad_split_or_label_names_row(tmp_path, column, bad):
    root = write_visa_tree(tmp_path / "visa")
    csv_path = root / "split_csv" / "1cls.csv"
    lines = csv_path.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[5].split(",")  # line 6 of the file (line 1 is the header)
    row[header.index(column)] = bad
    lines[5] = ",".join(row)
    csv_path.write_text("\n".join(lines) + "\n")
    pattern = re.escape(f"{csv_path} line 6: {column} is {bad!r}") + ".*expected one of"
    with pytest.raises(VisaSplitError, match=pattern):
        data.visa_categories(root)
    with pytest.raises(data.DatasetError, match=pattern):
        data.load_visa_category(root, "candle")
    with pytest.raises(ValueError, match=pattern):
        data.load_visa_category(root, "pcb1")  # any bad row fails the whole CSV
