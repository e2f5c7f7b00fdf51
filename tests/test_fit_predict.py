"""fit / predict end to end on synthetic images (random tiny backbone), errors, export path."""

import csv
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import FAST_FIT, FAST_REFINE, demo_category
from PIL import Image

from protorefine_jax.app import deploy
from protorefine_jax.calibration import RefinementCheck
from protorefine_jax.data import make_synthetic_dataset
from protorefine_jax.io.model_dir import ModelFormatError, ModelMismatchError

REPO = Path(__file__).resolve().parents[1]
FAST = FAST_FIT


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_category(tmp_path_factory)


@pytest.fixture(scope="module")
def model(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "m"
    s = deploy.FitSettings(
        support_dir=str(demo / "train/good"), out=str(out), export=True, refine=FAST_REFINE, **FAST
    )
    meta = deploy.fit_model(s, log=lambda _: None)
    return out, meta


def _predict(model_path, images, out, **kw):
    s = deploy.PredictSettings(
        model=str(model_path), images=str(images), out=str(out), batch_size=4, progress=False, **kw
    )
    return deploy.predict(s, log=lambda _: None)


def test_model_directory_records_what_the_issue_asks(model, demo):
    out, meta = model
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["package_version"] and manifest["format"].startswith("protorefine_jax.model")
    m = manifest["metadata"]
    assert m["backbone"]["weights_sha256"] == "random:PRNGKey(0)"
    assert m["image_size"] == [64, 64]
    assert m["config"]["num_iters"] == 2 and m["config"]["use_refinement"] is True
    assert m["support"]["files"] == ["000.png", "001.png", "002.png"]
    t = m["threshold"]
    assert t["kind"] == "normal_only" and t["source"] == "held_out"
    assert t["num_scores"] == 3 and t["rank"] == 3 and t["false_alarm_bound"] == 0.25
    # Every support image's held-out score is kept; the threshold is the largest (rank n of n).
    held = m["threshold_calibration"]["scores"]
    assert len(held) == 3 and m["threshold_calibration"]["outliers"] == []
    assert t["value"] == pytest.approx(max(held), rel=1e-12)
    assert (out / "state.safetensors").is_file() and (out / "detector.jaxexport").is_file()


def test_predict_writes_csv_jsonl_overlays_report(model, demo, tmp_path):
    bad = tmp_path / "imgs"
    bad.mkdir()
    for p in sorted((demo / "test").rglob("*.png"))[:5]:
        (bad / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    (bad / "zz_truncated.png").write_bytes((demo / "test/good/000.png").read_bytes()[:200])
    summary = _predict(model[0], bad, tmp_path / "out")
    assert summary["scored"] == 5 and summary["unreadable"] == 1
    rows = list(csv.DictReader((tmp_path / "out/predictions.csv").open()))
    assert [r["file"] for r in rows][-1] == "zz_truncated.png"
    assert rows[-1]["decision"] == "unreadable" and "CorruptImageError" in rows[-1]["error"]
    thr = model[1]["threshold"]["value"]
    for r in rows[:-1]:
        assert r["decision"] == ("anomalous" if float(r["score"]) > thr else "good")
        assert float(r["threshold"]) == pytest.approx(thr)
    lines = (tmp_path / "out/predictions.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["file"] == rows[0]["file"]
    assert len(list((tmp_path / "out/overlays").glob("*.png"))) == 5
    page = (tmp_path / "out/report.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 5 and "zz_truncated.png" in page
    with pytest.raises(FileExistsError, match="never overwritten silently"):
        _predict(model[0], bad, tmp_path / "out")
    with pytest.raises(Exception, match="Cannot decode"):
        _predict(model[0], bad, tmp_path / "strict", strict=True)


def test_export_runtime_gives_the_library_scores(model, demo, tmp_path, monkeypatch):
    lib = _predict(model[0], demo / "test", tmp_path / "lib", runtime="library")
    exp = _predict(model[0], demo / "test", tmp_path / "exp", runtime="export")
    assert lib["runtime"] == "library" and exp["runtime"] == "export"
    a = list(csv.DictReader((tmp_path / "lib/predictions.csv").open()))
    b = list(csv.DictReader((tmp_path / "exp/predictions.csv").open()))
    assert [r["file"] for r in a] == [r["file"] for r in b]
    # Same program, fused differently: float32 rounding of the distance expansion.
    np.testing.assert_allclose(
        [float(r["score"]) for r in b], [float(r["score"]) for r in a], rtol=1e-4
    )
    # Model code not importable: `auto` falls back to the exported program.
    monkeypatch.setitem(sys.modules, "protorefine_jax.detectors", None)
    notes = []
    scorer, _ = deploy.open_model(model[0], log=notes.append)
    assert scorer.runtime == "export" and "not importable" in notes[0]


def test_mismatched_settings_and_weights_are_named(model, demo, tmp_path):
    with pytest.raises(ModelMismatchError, match=r"config.lam: model has 0.3, requested 0.5"):
        _predict(model[0], demo / "test", tmp_path / "a", requested=(("lam", 0.5),))
    with pytest.raises(ModelMismatchError, match=r"image_size: model has \[64, 64\]"):
        _predict(model[0], demo / "test", tmp_path / "b", requested=(("image_size", 128),))
    with pytest.raises(ModelMismatchError, match="other backbone weights"):
        _predict(model[0], demo / "test", tmp_path / "c", weights="")  # shipped != random
    with pytest.raises(ModelFormatError, match="not a model directory"):
        _predict(tmp_path, demo / "test", tmp_path / "d")


def test_one_shot_uses_held_out_views_and_calibration_uses_f1(demo, tmp_path):
    s = deploy.FitSettings(
        support_dir=str(demo / "train/good"),
        out=str(tmp_path / "m1"),
        shots=1,
        views=2,
        calibration_dir=str(demo),
        method="patchcore",  # the threshold logic is the same; no refinement to compile
        **FAST,
    )
    meta = deploy.fit_model(s, log=lambda _: None)
    normal = meta["thresholds"]["normal_only"]
    # One image: one held-out score (its quadrants and views), the bound 1/2 stated.
    assert normal["source"] == "held_out" and normal["num_scores"] == 1
    assert normal["false_alarm_bound"] == 0.5 and meta["detector"]["views"] == 2
    assert meta["threshold"]["kind"] == "f1" and meta["threshold"]["num_scores"] == 6
    assert meta["calibration"]["labels"].count(1) == 3
    assert len(meta["support"]["files"]) == 1


def test_fit_errors(demo, tmp_path):
    base = dict(support_dir=str(demo / "train/good"), out=str(tmp_path / "m"), **FAST)
    with pytest.raises(FileNotFoundError, match="no image files"):
        deploy.fit_model(deploy.FitSettings(**{**base, "support_dir": str(tmp_path)}))
    # A mistyped folder is named as missing, not as empty.
    with pytest.raises(FileNotFoundError, match="does not exist; check the path"):
        deploy.fit_model(deploy.FitSettings(**{**base, "support_dir": str(tmp_path / "goood")}))
    with pytest.raises(ValueError, match="unknown --method"):
        deploy.fit_model(deploy.FitSettings(**base, method="patchcore++"))
    with pytest.raises(ValueError, match="--method=winclip needs --clip_dir"):
        deploy.fit_model(deploy.FitSettings(**base, method="winclip"))
    with pytest.raises(ValueError, match=r"--shots must be an integer in \[0,"):
        deploy.fit_model(deploy.FitSettings(**base, shots=-1))
    (tmp_path / "m").mkdir()
    (tmp_path / "m/x").write_text("keep")
    with pytest.raises(FileExistsError, match="never overwritten silently"):
        deploy.fit_model(deploy.FitSettings(**base))
    with pytest.raises(FileNotFoundError, match="good/ AND at least one defect folder"):
        deploy.calibration_set(demo / "train")


def test_padded_batches_keep_one_shape():
    shapes = []

    def fn(x):
        shapes.append(x.shape)
        return x[:, 0, 0, 0].astype(float), x[..., 0].astype(float)

    images = np.arange(10)[:, None, None, None] * np.ones((10, 2, 2, 3), np.uint8)
    out = list(deploy.padded(fn, images, 4))
    assert shapes == [(4, 2, 2, 3)] * 3
    np.testing.assert_array_equal(np.concatenate([o[0] for o in out]), np.arange(10))


def test_list_images_dir_and_glob(tmp_path):
    (tmp_path / "a/b").mkdir(parents=True)
    for name in ("a/1.png", "a/b/2.JPG", "a/.hidden.png", "a/notes.txt"):
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="PNG")
    root, files = deploy.list_images(tmp_path / "a")
    assert [deploy.relative_name(root, f) for f in files] == ["1.png", "b/2.JPG"]
    root, files = deploy.list_images(str(tmp_path / "a/**/*.png"))
    assert [deploy.relative_name(root, f) for f in files] == ["1.png"]


def _readme_commands():
    text = (REPO / "README.md").read_text()
    section = text.split("## Your own images", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def _run(cmd, cwd, subprocess_run):
    """One README command: `.venv/bin/python -m MODULE ARGS` (the install is already done)."""
    argv = shlex.split(cmd)
    assert argv[0] == ".venv/bin/python" and argv[1] == "-m", argv
    if subprocess_run:
        proc = subprocess.run(
            [sys.executable, *argv[1:]],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=3600,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return
    # In this process (one jax start-up instead of three): the modules' own entry points.
    shim = argv[2] in ("experiments.fit", "experiments.predict", "experiments.eval")
    module = importlib.import_module(
        argv[2].replace("experiments.", "protorefine_jax.cli.") if shim else argv[2]
    )
    old = os.getcwd()
    os.chdir(cwd)
    try:
        try:
            assert module.run([argv[2], *argv[3:]]) == 0
        finally:
            module.FLAGS.unparse_flags()
    finally:
        os.chdir(old)


def _readme_run(tmp_path, extra, subprocess_run):
    commands = _readme_commands()
    assert len(commands) == 3 and "pip install" in commands[0]
    install, fit, predict = commands
    demo_cmd = install.split("&&")[-1].strip()  # the demo images, after the install
    _run(demo_cmd + extra["demo"], tmp_path, subprocess_run)
    _run(fit + extra["fit"], tmp_path, subprocess_run)
    _run(predict + extra["predict"], tmp_path, subprocess_run)
    rows = list(csv.DictReader((tmp_path / "runs/fabric/predictions.csv").open()))
    assert rows and all(r["decision"] in ("good", "anomalous") for r in rows)
    assert (tmp_path / "runs/fabric/report.html").is_file()
    return rows


def test_readme_commands_run_end_to_end_fast(tmp_path):
    # The README's commands, with flags appended that make them fast (absl: last wins).
    extra = {
        "demo": " --counts=3,3,3 --image_size=64",
        "fit": " --image_size=64 --weights=random --method=patchcore --batch_size=4",
        "predict": " --batch_size=4 --progress=false",
    }
    rows = _readme_run(tmp_path, extra, subprocess_run=False)
    assert len(rows) == 6


@pytest.mark.slow
def test_readme_commands_as_written(tmp_path):
    rows = _readme_run(tmp_path, {"demo": "", "fit": "", "predict": ""}, subprocess_run=True)
    assert len(rows) == 20
    # The shipped Lite0 features separate the synthetic defects from good images.
    defect = [float(r["score"]) for r in rows if not r["file"].startswith("good/")]
    good = [float(r["score"]) for r in rows if r["file"].startswith("good/")]
    assert np.mean(defect) > np.mean(good)


def test_cli_flags_reach_the_settings_and_bad_input_exits_2(tmp_path, capsys):
    from protorefine_jax.cli import fit as fit_cli
    from protorefine_jax.cli import predict as predict_cli

    try:
        fit_cli.FLAGS(
            ["fit", "--support_dir=a", "--out=b", "--lam=0.5", "--shots=2", "--num_iters=3"]
        )
        s = fit_cli.settings_from_flags()
        assert s.shots == 2 and dict(s.refine) == {"lam": 0.5, "num_iters": 3}
        predict_cli.FLAGS(
            [
                "predict",
                "--model=m",
                "--images=i",
                "--out=o",
                "--lam=0.5",
                "--backbone=efficientnet_lite2",
            ]
        )
        p = predict_cli.settings_from_flags()
        assert dict(p.requested) == {"lam": 0.5, "backbone": "efficientnet_lite2"}
    finally:
        fit_cli.FLAGS.unparse_flags()
        predict_cli.FLAGS.unparse_flags()
    assert fit_cli.run(["fit", f"--support_dir={tmp_path}", f"--out={tmp_path}/m"]) == 2
    assert "no image files" in capsys.readouterr().err
    assert predict_cli.run(["predict", "--model=m"]) == 2
    assert "--model, --images and --out are required" in capsys.readouterr().err
    assert fit_cli.run(["fit", "--no_such_flag=1"]) == 2
    fit_cli.FLAGS.unparse_flags()
    # Every tool's --help is no error (eval's, through absl, exited 1).
    for tool in ("eval", "fit", "predict"):
        done = subprocess.run(
            [sys.executable, "-m", f"experiments.{tool}", "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0 and "--" in done.stdout, (tool, done.stderr[-500:])
    predict_cli.FLAGS.unparse_flags()


def test_fit_calibrates_under_the_settings_it_records(demo, tmp_path):
    """`fit --lam=0.5` stores the calibration measured at lam 0.5, not at the defaults."""
    refine = (("lam", 0.5), ("num_iters", 2), ("sinkhorn_iters", 10))
    s = deploy.FitSettings(
        support_dir=str(demo / "train/good"), out=str(tmp_path / "m"), refine=refine, **FAST
    )
    meta = deploy.fit_model(s, log=lambda _: None)
    assert meta["config"]["lam"] == 0.5
    stored = deploy.model_dir.load_model(tmp_path / "m").state.calibration
    detector, params, config = deploy.build_detector(s)
    files = sorted((demo / "train/good").glob("*.png"))
    images, _, _ = deploy.read_batch(files, s.image_size, strict=True)
    want = detector.fit(params, images, config=config).calibration
    np.testing.assert_allclose(np.asarray(stored), np.asarray(want), rtol=1e-5)
    default = detector.fit(params, images, config=config.replace(lam=0.3)).calibration
    assert not np.allclose(np.asarray(stored), np.asarray(default), rtol=1e-5)
    # Opened, the model scores under the recorded settings.
    scorer, _ = deploy.open_model(tmp_path / "m")
    scorer.score(images[:1])


def test_predict_calibrate_on_stream_learns_from_past_images_only(model, demo, tmp_path):
    images = sorted((demo / "test").rglob("*.png"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(12):  # 12 images: past the warm-up of 8
        p = images[i % len(images)]
        (folder / f"{i:02d}.png").write_bytes(p.read_bytes())
    _predict(model[0], folder, tmp_path / "plain")
    _predict(model[0], folder, tmp_path / "stream", calibrate_on_stream=True)
    plain = [float(r["score"]) for r in csv.DictReader((tmp_path / "plain/predictions.csv").open())]
    stream = [
        float(r["score"]) for r in csv.DictReader((tmp_path / "stream/predictions.csv").open())
    ]
    # Before the warm-up the statistics are the fit's: the plain scores.
    np.testing.assert_allclose(stream[:8], plain[:8], rtol=1e-4, atol=1e-5)
    # After it they have learnt from the images before (which were judged normal).
    assert not np.allclose(stream[8:], plain[8:], rtol=1e-3)
    # The export runtime has no raw halves: refused with the fix.
    with pytest.raises(ValueError, match="--calibrate_on_stream needs"):
        _predict(model[0], folder, tmp_path / "x", calibrate_on_stream=True, runtime="export")


def _pairs_auroc(good, bad):
    wins = sum((b > g) + 0.5 * (b == g) for g in good for b in bad)
    return 100.0 * wins / (len(good) * len(bad))


def test_predict_reads_labels_from_the_folders(model, demo, tmp_path):
    """`good/` beside a folder per defect type: rates, AUROC, wrong decisions; keyed overlays."""
    from protorefine_jax.app import overlays

    out = tmp_path / "out"
    summary = _predict(model[0], demo / "test", out, support_dir=str(demo / "train/good"))
    assert json.loads((out / "summary.json").read_text())["labels"] == json.loads(
        json.dumps(summary["labels"])
    )
    lab = summary["labels"]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert {r["folder"] for r in rows} == {"good", "blob", "scratch", "spot"}
    thr = model[1]["threshold"]["value"]
    for r in rows:
        truth = r["folder"] != "good"
        assert r["label"] == ("defective" if truth else "good")
        assert r["wrong"] == ("yes" if (float(r["score"]) > thr) != truth else "no")
    # The rates and the AUROC, recomputed from predictions.csv.
    for f in lab["per_folder"]:
        mine = [r for r in rows if r["folder"] == f["folder"]]
        flagged = sum(r["decision"] == "anomalous" for r in mine)
        assert (f["images"], f["flagged"]) == (len(mine), flagged)
        assert f["flagged_rate"] == pytest.approx(flagged / len(mine))
    good = [float(r["score"]) for r in rows if r["label"] == "good"]
    bad = [float(r["score"]) for r in rows if r["label"] == "defective"]
    assert lab["image_auroc"] == pytest.approx(_pairs_auroc(good, bad))
    wrong = lab["wrong_decisions"]
    listed = {w["file"] for w in wrong["good_flagged"] + wrong["defective_passed"]}
    assert listed == {r["file"] for r in rows if r["wrong"] == "yes"}
    table = list(csv.DictReader((out / "summary.csv").open()))
    assert [t["folder"] for t in table] == [
        "good",
        "blob",
        "scratch",
        "spot",
        "all good",
        "all defective",
    ]
    page = (out / "report.html").read_text()
    assert 'id="per-folder"' in page and 'value="wrong"' in page and 'class="bar good"' in page
    assert 'id="legend-bar"' in page and "wrong decisions:" in page
    assert page.split('id="support"', 1)[1].count("data:image/jpeg;base64,") == 3
    # Each overlay: image | map, and under it the key (colour bar blue to red).
    png = np.asarray(Image.open(sorted((out / "overlays").glob("*.png"))[0]).convert("RGB"))
    assert png.shape == (64 + overlays.KEY_HEIGHT, overlays.KEY_MIN_WIDTH, 3)
    bar = png[64 + 25].astype(int)
    assert bar[overlays.BAR_LEFT + 1][2] > 100 and bar[overlays.BAR_LEFT + 1][0] == 0
    assert bar[-overlays.BAR_LEFT - 2][0] > 100 and bar[-overlays.BAR_LEFT - 2][2] == 0


def test_predict_labels_off_and_on(model, demo, tmp_path):
    from protorefine_jax.app.predict_labels import LabelLayoutError

    out = tmp_path / "off"
    summary = _predict(model[0], demo / "test", out, labels="off")
    assert "labels" not in summary and not (out / "summary.csv").exists()
    header = (out / "predictions.csv").read_text().splitlines()[0]
    assert header == "file,score,decision,threshold,error"
    page = (out / "report.html").read_text()
    assert 'value="wrong"' not in page and 'id="per-folder"' not in page
    assert 'id="legend-bar"' in page  # the legend is there with or without labels
    assert "Pass --support_dir=" in page  # names and scores, and how to see the images
    # `on` without good/ beside the defect folders: refused before anything is written.
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((demo / "test").rglob("*.png"))[:2]:
        (flat / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    with pytest.raises(LabelLayoutError, match="needs a good/ folder"):
        _predict(model[0], flat, tmp_path / "on", labels="on")
    assert not (tmp_path / "on").exists()
    with pytest.raises(FileNotFoundError, match="--support_dir"):
        _predict(model[0], flat, tmp_path / "on", support_dir=str(tmp_path / "nope"))


def test_predict_cli_labels_and_support_dir_flags():
    from protorefine_jax.cli import predict as predict_cli

    try:
        predict_cli.FLAGS(["predict", "--model=m", "--images=i", "--out=o", "--labels=off"])
        assert predict_cli.settings_from_flags().labels == "off"
        predict_cli.FLAGS.unparse_flags()
        predict_cli.FLAGS(["predict", "--support_dir=s"])
        s = predict_cli.settings_from_flags()
        assert s.labels == "auto" and s.support_dir == "s"
    finally:
        predict_cli.FLAGS.unparse_flags()


def test_label_folder_names_are_escaped_and_never_formulas(model, demo, tmp_path):
    images = tmp_path / "imgs"
    odd = "=1+1<i>"
    for folder, src in (("good", "test/good/000.png"), (odd, "test/blob/000.png")):
        (images / folder).mkdir(parents=True)
        (images / folder / "a.png").write_bytes((demo / src).read_bytes())
    out = tmp_path / "out"
    _predict(model[0], images, out)
    table = (out / "summary.csv").read_text()
    assert "'" + odd in table and "\n" + odd not in table
    assert "'" + odd + "/a.png" in (out / "predictions.csv").read_text()
    page = (out / "report.html").read_text()
    assert "=1+1&lt;i&gt;/" in page and odd not in page
    json.loads((out / "summary.json").read_text(), parse_constant=pytest.fail)


@pytest.fixture(scope="module")
def stray_folder(tmp_path_factory):
    """Five good fabric images and one image of something else (a stray in the good folder)."""
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("stray"), ["fabric"], 5, 1, 1, image_size=64, seed=1
    )
    good = root / "fabric/train/good"
    rng = np.random.default_rng(0)
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::8] = 255  # hard vertical bars: nothing like the fabric
    stripes[..., 1] = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(stripes).save(good / "zz_stray.png")
    return good


def test_fit_leaves_a_named_stray_image_out_of_the_model(stray_folder, tmp_path):
    """The model fitted with the stray present equals the model fitted without it."""
    lines = []
    meta = deploy.fit_model(
        deploy.FitSettings(
            support_dir=str(stray_folder),
            out=str(tmp_path / "auto"),
            drop_outliers=True,
            refine=FAST_REFINE,
            **FAST,
        ),
        log=lines.append,
    )
    assert meta["support"]["left_out"] == ["zz_stray.png"], "\n".join(lines)
    assert "zz_stray.png" not in meta["support"]["files"] and len(meta["support"]["files"]) == 5
    assert meta["support"]["left_out_scores"][0] > max(meta["threshold_calibration"]["scores"])
    said = "\n".join(lines)
    assert "zz_stray.png" in said and "left out of the model" in said
    # The same five images without the stray in the folder: the same threshold and statistics.
    clean = tmp_path / "clean"
    clean.mkdir()
    for f in sorted(stray_folder.glob("0*.png")):
        (clean / f.name).write_bytes(f.read_bytes())
    want = deploy.fit_model(
        deploy.FitSettings(
            support_dir=str(clean), out=str(tmp_path / "m_clean"), refine=FAST_REFINE, **FAST
        ),
        log=lambda _: None,
    )
    assert meta["threshold"]["value"] == want["threshold"]["value"]
    assert meta["threshold_calibration"]["scores"] == want["threshold_calibration"]["scores"]
    # The default: in the bank and the calibration, named, out of the threshold only.
    kept = deploy.fit_model(
        deploy.FitSettings(
            support_dir=str(stray_folder),
            out=str(tmp_path / "kept"),
            refine=FAST_REFINE,
            **FAST,
        ),
        log=lambda _: None,
    )
    assert kept["support"]["left_out"] == [] and "zz_stray.png" in kept["support"]["files"]
    assert kept["threshold_calibration"]["outliers"] == ["zz_stray.png"]
    # predict's report lists the left-out image with why.
    items = deploy.support_items(
        json.loads((tmp_path / "auto/model.json").read_text())["metadata"],
        None,
        (64, 64),
        lambda _: None,
    )
    left = [i for i in items if i.name == "zz_stray.png"]
    assert len(left) == 1 and left[0].outlier and "left out of the model" in left[0].note


def test_fit_with_the_refinement_check_records_it_and_scores_in_its_units(demo, tmp_path):
    """`fit --pseudo_anomalies=4`: the check's outcome is in model.json and the state, and
    predict's scores follow it (host z-scores alone when the refinement is dropped)."""
    s = deploy.FitSettings(
        support_dir=str(demo / "train/good"),
        out=str(tmp_path / "m"),
        refine=FAST_REFINE,
        pseudo_anomalies=4,
        **FAST,
    )
    lines: list[str] = []
    meta = deploy.fit_model(s, log=lines.append)
    check = meta["refinement_check"]
    assert check["pasted"] == 4 and check["images"] >= 1
    assert check["refinement_kept"] == (check["host_better_z"] < 1.96)
    assert any(line.startswith("refinement check: ") for line in lines)
    loaded = deploy.model_dir.load_model(tmp_path / "m").state
    assert float(loaded.calibration.refined_on) == float(check["refinement_kept"])
    assert float(loaded.refinement_check.fused_auroc) == pytest.approx(check["fused_auroc"], 1e-3)
    # The library's own scores under the stored state equal what the opened model gives.
    detector, params, config = deploy.build_detector(s)
    files = sorted((demo / "train/good").glob("*.png"))
    images, _, _ = deploy.read_batch(files, s.image_size, strict=True)
    scorer, _ = deploy.open_model(tmp_path / "m")
    got = np.asarray(scorer.score(images[:2])[0])
    state = loaded._replace(calibrated_under=config)
    want = np.asarray(detector.score(params, state, images[:2], config).image_scores)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Forcing the refinement off gives the host z-score: the check's decision is honoured.
    off = state._replace(calibration=state.calibration._replace(refined_on=np.float32(0.0)))
    host = detector.score(params, state, images[:2], config.replace(use_refinement=False))
    z = (np.asarray(host.image_scores) - float(off.calibration.host_loc)) / float(
        off.calibration.host_scale
    )
    np.testing.assert_allclose(
        np.asarray(detector.score(params, off, images[:2], config).image_scores), z, rtol=1e-4
    )


def test_a_model_whose_refinement_beats_the_host_loads(model):
    """The refinement check's z is negative when the fused score is better: a valid model
    (it was refused as "a finite scalar in [0, 1e6]" before)."""
    model, meta = model
    state = deploy.model_dir.load_model(model).state
    good = RefinementCheck(
        np.float32(76.2), np.float32(89.4), np.float32(2), np.float32(16), np.float32(-2.35)
    )
    dim = meta["detector"]["feature_dim"]
    deploy.check_state(state._replace(refinement_check=good), dim, model)
    bad = good._replace(images=np.float32(-1))
    with pytest.raises(deploy.model_dir.ModelFormatError, match="images must be"):
        deploy.check_state(state._replace(refinement_check=bad), dim, model)
