"""eval on what users have: image-level labels only, a mix, TFDS as the data source, pages."""

import json
import shutil

import pytest

from protorefine_jax.app import runner
from protorefine_jax.data import MissingMaskError, make_synthetic_dataset

TINY = dict(
    dataset="folder",
    image_size=64,
    weights="random",
    shots=(1,),
    seeds=(0,),
    methods=("patchcore",),
    batch_size=4,
    num_heatmaps=1,
    progress=False,
)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("raw"), ["fabric"], 2, 3, 6, image_size=64, seed=0
    )


def _run(tmp_path, root, name, **kw):
    s = runner.Settings(data_dir=str(root), workdir=str(tmp_path / name), **{**TINY, **kw})
    return runner.run(s)


def test_image_level_labels_only_and_a_mix(raw, tmp_path):
    no_masks = tmp_path / "nomasks"
    shutil.copytree(raw, no_masks)
    shutil.rmtree(no_masks / "fabric/ground_truth")
    with pytest.raises(MissingMaskError, match="has no ground-truth mask"):
        _run(tmp_path, no_masks, "strict", require_masks=True)
    row = _run(tmp_path, no_masks, "image")["rows"][0]
    image_auroc = row["image_auroc"]
    assert row["pixel_auroc"] is None and row["aupro"] is None
    assert "no defective image has a mask" in row["pixel_note"]
    table = (tmp_path / "image/results.md").read_text()
    assert "fabric" in table
    mix = tmp_path / "mix"
    shutil.copytree(raw, mix)
    next((mix / "fabric/ground_truth").rglob("*_mask.png")).unlink()
    row = _run(tmp_path, mix, "mixrun")["rows"][0]
    assert row["image_auroc"] == pytest.approx(image_auroc, rel=1e-9)  # same scores
    assert row["pixel_auroc"] is not None and row["defective_with_mask"] == 5
    assert "5 of 6 defective images" in row["pixel_note"]
    page = (tmp_path / "mixrun/reports/fabric_patchcore_1shot.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 9 and "pixel_note" in page


@pytest.mark.slow  # two eval runs; the data-level equality is in test_tfds_source.py
def test_tfds_source_gives_the_folder_metrics(raw, tmp_path):
    folder = _run(tmp_path, raw, "folder")["rows"][0]
    tfds = _run(tmp_path, raw, "tfds", data_source="tfds", tfds_dir=str(tmp_path / "prep"))
    row = tfds["rows"][0]
    assert row["support"] == folder["support"]
    for key in ("image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro"):
        assert row[key] == pytest.approx(folder[key], rel=1e-6, abs=1e-9), key
    lines = [json.loads(x) for x in (tmp_path / "tfds/scores.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "folder/scores.jsonl").read_text().splitlines()]
    assert lines[0]["files"] == ref[0]["files"]


def test_source_flag_errors(raw, tmp_path):
    with pytest.raises(ValueError, match="--data_source must be folder or tfds"):
        _run(tmp_path, raw, "a", data_source="csv")
    with pytest.raises(ValueError, match="needs --tfds_dir"):
        _run(tmp_path, raw, "b", data_source="tfds")
