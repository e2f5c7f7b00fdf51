"""Bad data at the CLI (issue 13): every case refused with a message naming the file and
the fix, or handled in a documented way, and nothing written half-way without saying so.

Tests run as root in CI, where chmod does not stop reading or writing: there the
permission error is simulated at the one function that opens image files
(`imageio.open_image`) or creates / probes a folder; as another user a real chmod is used.
"""

import errno
import json
import os
import pathlib
import shutil
import types

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from PIL import Image

from protorefine_jax.app import deploy, runner
from protorefine_jax.cli import eval as eval_cli
from protorefine_jax.data import imageio, load_category, make_synthetic_dataset
from protorefine_jax.data.errors import (
    EmptyMaskError,
    OneClassTestSetError,
    UnreadableFileError,
)
from protorefine_jax.io.paths import UnwritableDirError, clear_outputs, open_output_dir
from protorefine_jax.metrics import evaluate

ROOT = os.geteuid() == 0
FAST = dict(image_size=64, weights="random", batch_size=4, progress=False)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    # fabric: train/good 3, test/good 3, one defective image each in blob, scratch, spot.
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("pristine"), ["fabric"], 3, 3, 3, image_size=64, seed=0
    )


@pytest.fixture
def data(pristine, tmp_path):
    """A fresh copy of the tiny dataset, free to damage."""
    return shutil.copytree(pristine, tmp_path / "data")


def settings(data, workdir, **kw):
    base = dict(
        dataset="folder",
        data_dir=str(data),
        workdir=str(workdir),
        categories=("fabric",),
        shots=(1,),
        seeds=(0,),
        methods=("patchcore",),
        num_heatmaps=3,
        **FAST,
    )
    return runner.Settings(**{**base, **kw})


@pytest.fixture
def no_extraction(monkeypatch):
    """Makes building a backbone (the step before any extraction) a test failure."""

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was built: the check came too late")

    monkeypatch.setattr(runner, "make_host", refuse)
    monkeypatch.setattr(deploy, "build_detector", refuse)


@pytest.fixture(autouse=True)
def parsed_flags():
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _fail_open_for(monkeypatch, target):
    """As root: `imageio.open_image(target)` raises the PermissionError a chmod 000 gives."""
    real = imageio.open_image

    def fake(path, *args, **kwargs):
        if pathlib.Path(path) == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(imageio, "open_image", fake)


@pytest.fixture
def unreadable(monkeypatch):
    """`make(path)`: the file cannot be read by this process (real chmod or simulated)."""
    changed = []

    def make(path):
        if ROOT:
            _fail_open_for(monkeypatch, path)
        else:
            path.chmod(0)
            changed.append(path)

    yield make
    for path in changed:
        path.chmod(0o644)


@pytest.fixture
def read_only(monkeypatch):
    """`make(folder)`: nothing can be created in `folder` (real chmod or simulated)."""
    changed = []

    def make(folder):
        if not ROOT:
            folder.chmod(0o555)
            changed.append(folder)
            return
        real_mkdir, real_open = pathlib.Path.mkdir, os.open

        def mkdir(self, *args, **kwargs):
            if self.parent == folder and not self.exists():
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        def open_(path, *args, **kwargs):
            if pathlib.Path(path).parent == folder:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
        monkeypatch.setattr(os, "open", open_)

    yield make
    for folder in changed:
        folder.chmod(0o755)


# --------------------------------------------------------------------------- masks


def _zero_mask(data, defect="blob"):
    mask = data / "fabric" / "ground_truth" / defect / "000_mask.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(mask)
    return mask


def test_all_zero_mask_counts_defective_and_is_left_out_of_pixel_metrics(
    data, tmp_path, caplog, monkeypatch
):
    """Default: the image is defective for the image metrics; its mask is not used."""
    _zero_mask(data)
    seen = []
    real = runner.metrics_of

    def spy(test, result):  # keeps the maps the runner scored, for the reference below
        seen.append((test["masks"].copy(), result.maps.copy(), result.image_scores.copy()))
        return real(test, result)

    monkeypatch.setattr(runner, "metrics_of", spy)
    out = runner.run(settings(data, tmp_path / "run"))
    row = out["rows"][0]
    assert row["empty_masks"] == ["ground_truth/blob/000_mask.png"]
    assert row["defective_images"] == 3 and row["defective_with_mask"] == 2
    assert row["pixel_images"] == 5
    assert row["pixel_note"].endswith("left out: 1 with an all-zero mask (empty_masks)")
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "ground_truth/blob/000_mask.png" in warned and "--require_masks" in warned
    # Image metrics over all 6 images, the blob one labelled defective.
    line = json.loads((tmp_path / "run/scores.jsonl").read_text())
    blob = line["files"].index("test/blob/000.png")
    assert line["labels"][blob] == 1
    labels = np.array(line["labels"])
    want = evaluate(labels, np.array(line["scores"]))
    assert row["image_auroc"] == pytest.approx(want["image_auroc"], abs=1e-9)
    # Pixel metrics: those of the other 5 images; the blob image's pixels are not
    # counted as normal ones.
    (masks, maps, scores), keep = seen[0], np.arange(len(labels)) != blob
    assert not masks[blob].any()
    ref = evaluate(labels[keep], scores[keep], masks[keep], maps[keep])
    for key in ("pixel_auroc", "pixel_f1_max", "aupro"):
        assert row[key] == pytest.approx(ref[key], abs=1e-9)
    wrong = evaluate(labels, scores, masks, maps)  # what counting it as normal would give
    assert wrong["pixel_auroc"] != pytest.approx(ref["pixel_auroc"], abs=1e-6)


def test_every_mask_all_zero_gives_null_pixel_metrics_with_the_reason(data, caplog):
    """No model needed: the runner's mask handling on the listed data and fake maps."""
    cat = load_category(data, "fabric", 64)
    labels = cat.test_labels
    test = {
        "labels": labels,
        "masks": np.zeros((len(labels), 64, 64), bool),  # every defective mask empty
        "mask_known": np.ones(len(labels), bool),
    }
    with pytest.raises(EmptyMaskError, match="ground_truth/blob/000_mask.png"):
        runner.exclude_empty_masks(cat, dict(test, mask_known=test["mask_known"].copy()), True)
    runner.exclude_empty_masks(cat, test, require_masks=False)
    assert test["mask_known"].tolist() == (labels == 0).tolist()
    rng = np.random.default_rng(0)
    result = types.SimpleNamespace(
        image_scores=rng.random(len(labels)), maps=rng.random((len(labels), 64, 64))
    )
    metrics = runner.metrics_of(test, result)
    assert metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert metrics["pixel_note"] == (
        "no defective image has a usable mask (3 with an all-zero mask (empty_masks)): "
        "pixel metrics need masks"
    )
    assert metrics["empty_masks"] == [
        f"ground_truth/{t}/000_mask.png" for t in ("blob", "scratch", "spot")
    ]
    ref = evaluate(labels, result.image_scores)
    assert metrics["image_auroc"] == pytest.approx(ref["image_auroc"], abs=1e-12)
    assert "3 defective test image(s) have a mask with no defect pixel" in caplog.text


@pytest.mark.parametrize("values", ["zeros", "0/1"])
def test_all_zero_mask_with_require_masks_is_refused_before_extraction(
    data, tmp_path, no_extraction, values
):
    mask = _zero_mask(data)
    if values == "0/1":  # a mask saved 0/1 instead of 0/255 reads as empty
        m = np.zeros((64, 64), np.uint8)
        m[20:40, 20:40] = 1
        Image.fromarray(m).save(mask)
    with pytest.raises(EmptyMaskError) as err:
        runner.run(settings(data, tmp_path / "run", require_masks=True))
    msg = str(err.value)
    assert str(mask) in msg and "test/blob/000.png" in msg
    assert "Fix: re-export the mask with the defect at 255" in msg
    assert not (tmp_path / "run").exists()  # the refused run left nothing


# --------------------------------------------------------------------------- unreadable


def test_unreadable_image_and_mask_are_named_with_the_fix(data, unreadable):
    image = data / "fabric/test/good/001.png"
    mask = data / "fabric/ground_truth/spot/000_mask.png"
    unreadable(image)
    unreadable(mask)
    with pytest.raises(UnreadableFileError, match="permission denied") as err:
        imageio.read_image(image, 64)
    assert str(image) in str(err.value) and "chmod a+r" in str(err.value)
    assert isinstance(err.value, PermissionError)  # not "cannot decode: re-download"
    with pytest.raises(UnreadableFileError, match=f"Cannot read mask {mask}.*Fix: make it"):
        imageio.read_mask(mask, 64, imageio.MVTEC_MASK_THRESHOLD)


def test_unreadable_folder_is_named_with_the_fix(data, monkeypatch):
    folder = data / "fabric/train/good"
    if ROOT:
        real = pathlib.Path.iterdir

        def iterdir(self):
            if self == folder:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)
    else:
        folder.chmod(0o300)  # listable no more
    try:
        with pytest.raises(UnreadableFileError, match=f"Cannot read folder {folder}.*a\\+x"):
            load_category(data, "fabric")
    finally:
        folder.chmod(0o755)


def test_eval_cli_names_an_unreadable_test_image(data, tmp_path, unreadable, capsys):
    image = data / "fabric/test/good/001.png"
    unreadable(image)
    workdir = tmp_path / "run"
    with flagsaver.flagsaver(
        dataset="folder",
        data_dir=str(data),
        workdir=str(workdir),
        shots=["1"],
        seeds=["0"],
        methods=["patchcore"],
        image_size="64",
        weights="random",
        batch_size=4,
        progress=False,
    ):
        with pytest.raises(SystemExit) as code:
            eval_cli.main(["eval"])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert f"error: Cannot read image {image}: permission denied" in err and "chmod" in err
    assert not workdir.exists()  # failed before any result: nothing left behind


# --------------------------------------------------------------------------- read-only out


@pytest.mark.parametrize("where", ["new folder in a read-only one", "existing read-only folder"])
def test_read_only_workdir_is_refused_before_reading_any_data(
    data, tmp_path, read_only, monkeypatch, where
):
    parent = tmp_path / "ro"
    parent.mkdir()
    workdir = parent / "run" if where.startswith("new") else parent
    read_only(parent)

    def no_listing(*args, **kwargs):
        raise AssertionError("data was read before the workdir was checked")

    monkeypatch.setattr(runner, "load_data", no_listing)
    with pytest.raises(UnwritableDirError) as err:
        runner.run(settings(data, workdir))
    msg = str(err.value)
    assert f"--workdir {workdir} cannot be written" in msg
    assert "nothing was computed" in msg and "Fix: pass a --workdir in a folder you may" in msg
    assert isinstance(err.value, PermissionError)


def test_read_only_out_of_fit_and_predict_is_refused_first(
    data, tmp_path, read_only, no_extraction
):
    parent = tmp_path / "ro"
    parent.mkdir()
    read_only(parent)
    fit = deploy.FitSettings(
        support_dir=str(data / "fabric/train/good"), out=str(parent / "m"), **FAST
    )
    with pytest.raises(UnwritableDirError, match=f"--out {parent / 'm'} cannot be written"):
        deploy.fit_model(fit, log=lambda _: None)
    predict = deploy.PredictSettings(
        model=str(tmp_path / "no_model"), images=str(data / "fabric/test"), out=str(parent / "p")
    )
    # The output folder is checked before the model is even opened.
    with pytest.raises(UnwritableDirError, match=f"--out {parent / 'p'} cannot be written"):
        deploy.predict(predict, log=lambda _: None)


def test_output_dir_probe_finds_a_read_only_file_system(tmp_path, monkeypatch):
    real = os.open

    def erofs(path, *args, **kwargs):
        if pathlib.Path(path).parent == tmp_path:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", erofs)
    with pytest.raises(UnwritableDirError, match="read-only file system"):
        open_output_dir(tmp_path, "--workdir", overwrite=False)


# --------------------------------------------------------------------------- one class


@pytest.mark.parametrize("keep", ["good", "defective"])
def test_one_class_test_set_is_refused_before_extraction(data, tmp_path, no_extraction, keep):
    test = data / "fabric/test"
    for sub in test.iterdir():
        if (sub.name == "good") != (keep == "good"):
            shutil.rmtree(sub)
    lacks = "defective" if keep == "good" else "good"
    with pytest.raises(OneClassTestSetError) as err:
        runner.run(settings(data, tmp_path / "run"))
    msg = str(err.value)
    assert f"category 'fabric' ({data / 'fabric'}) holds only {keep} images (3)" in msg
    assert f"no {lacks} one" in msg and f"Fix: add {lacks} test images" in msg
    assert not (tmp_path / "run").exists()  # no empty workdir, no empty scores.jsonl


def test_one_class_calibration_folder_is_refused_before_fit(data, tmp_path, no_extraction):
    shutil.rmtree(data / "fabric/test/good")
    s = deploy.FitSettings(
        support_dir=str(data / "fabric/train/good"),
        out=str(tmp_path / "m"),
        calibration_dir=str(data / "fabric"),
        **FAST,
    )
    with pytest.raises(FileNotFoundError, match="needs good/ AND at least one defect folder"):
        deploy.fit_model(s, log=lambda _: None)
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- overwrite


def test_overwrite_replaces_every_file_of_the_earlier_run(data, tmp_path, caplog):
    workdir = tmp_path / "run"
    runner.run(settings(data, workdir))
    first = {p.name for p in (workdir / "heatmaps").iterdir()}
    (workdir / "notes.txt").write_text("mine")
    (workdir / "heatmaps" / "my_drawing.txt").write_text("mine too")
    # Second run on a smaller test set: two defect types and one good image fewer.
    for sub in ("blob", "scratch"):
        shutil.rmtree(data / "fabric/test" / sub)
        shutil.rmtree(data / "fabric/ground_truth" / sub)
    (data / "fabric/test/good/002.png").unlink()
    with pytest.raises(FileExistsError, match="never overwritten silently"):
        runner.run(settings(data, workdir))
    runner.run(settings(data, workdir, overwrite=True))
    # The second run's overlays only: its one defective image and one good image.
    heatmaps = {p.name for p in (workdir / "heatmaps").glob("*.png")}
    prefix = "fabric_patchcore_1shot_test_"
    assert heatmaps == {prefix + "spot_000.png", prefix + "good_000.png"}
    assert len(first) == 4 and first - heatmaps  # blob, scratch: gone
    assert [p.name for p in (workdir / "reports").iterdir()] == ["fabric_patchcore_1shot.html"]
    assert len(json.loads((workdir / "results.json").read_text())["rows"]) == 1
    lines = (workdir / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["files"] == [
        "test/good/000.png",
        "test/good/001.png",
        "test/spot/000.png",
    ]
    # Files eval does not write are kept, and named.
    assert (workdir / "notes.txt").read_text() == "mine"
    assert (workdir / "heatmaps" / "my_drawing.txt").read_text() == "mine too"
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "kept 2 file(s)" in warned and "notes.txt" in warned


def test_refused_overwrite_keeps_the_earlier_run(data, tmp_path, no_extraction):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "scores.jsonl").write_text("earlier\n")
    # Building the backbone fails (no_extraction: as a bad weights file would).
    with pytest.raises(AssertionError, match="backbone was built"):
        runner.run(settings(data, workdir, overwrite=True))
    assert (workdir / "scores.jsonl").read_text() == "earlier\n"
    shutil.rmtree(data / "fabric/test/good")  # refused: only defective images
    with pytest.raises(OneClassTestSetError):
        runner.run(settings(data, workdir, overwrite=True))
    assert (workdir / "scores.jsonl").read_text() == "earlier\n"


def test_clear_outputs_removes_only_the_tools_files(tmp_path):
    for name in ("a.json", "heatmaps/x.png", "heatmaps/sub/y.png", "heatmaps/z.txt", "b.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "empty_user_folder").mkdir()
    removed, kept = clear_outputs(tmp_path, ("a.json", "heatmaps/*.png", "reports/*.html"))
    assert removed == ["a.json", "heatmaps/x.png"]
    assert kept == ["b.json", "heatmaps/sub/y.png", "heatmaps/z.txt"]
    assert (tmp_path / "empty_user_folder").is_dir()


def test_predict_and_fit_overwrite_leave_no_stale_file(data, tmp_path):
    images = tmp_path / "imgs"
    shutil.copytree(data / "fabric/test", images)
    model = tmp_path / "m"
    fit = dict(support_dir=str(data / "fabric/train/good"), out=str(model), method="patchcore")
    (model).mkdir()
    (model / deploy.EXPORT_FILE).write_bytes(b"an earlier fit --export")  # stale artifact
    deploy.fit_model(deploy.FitSettings(**fit, overwrite=True, **FAST), log=lambda _: None)
    assert not (model / deploy.EXPORT_FILE).exists()
    out = tmp_path / "pred"

    def predict(**kw):
        s = deploy.PredictSettings(
            model=str(model), images=str(images), out=str(out), batch_size=4, progress=False, **kw
        )
        return deploy.predict(s, log=lambda _: None)

    assert predict()["scored"] == 6
    assert len(list((out / "overlays").glob("*.png"))) == 6
    shutil.rmtree(images / "good")
    summary = predict(overwrite=True)
    assert summary["scored"] == 3 and summary["complete"]
    overlays = sorted(p.name for p in (out / "overlays").glob("*.png"))
    assert len(overlays) == 3 and all("good" not in name for name in overlays)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    # A refused predict (--strict, an unreadable first image) leaves no folder behind.
    (images / "a_truncated.png").write_bytes(b"\x89PNG\r\n")
    out = tmp_path / "strict"
    with pytest.raises(Exception, match="Cannot decode image .*a_truncated.png"):
        predict(strict=True)
    assert not out.exists()


# --------------------------------------------------------------------------- half-way


def test_run_failing_after_results_says_so(tmp_path, monkeypatch):
    data = make_synthetic_dataset(
        tmp_path / "two", ["fabric", "grain"], 3, 2, 2, image_size=64, seed=0
    )
    real = runner.run_category

    def second_fails(s, dataset, root, category, *args):
        if category == "grain":
            raise RuntimeError("disk gone")
        return real(s, dataset, root, category, *args)

    monkeypatch.setattr(runner, "run_category", second_fails)
    s = settings(data, tmp_path / "run", categories=("fabric", "grain"))
    with pytest.raises(RuntimeError, match="disk gone"):
        runner.run(s)
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert results["complete"] is False and results["error"] == "RuntimeError: disk gone"
    assert [r["category"] for r in results["rows"]] == ["fabric"]
    lines = (tmp_path / "run/scores.jsonl").read_text().splitlines()
    assert [json.loads(x)["category"] for x in lines] == ["fabric"]
