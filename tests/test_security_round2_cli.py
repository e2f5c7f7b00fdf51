"""Untrusted files, second round: model directories, globs, file names, output folders.

One tiny model is fitted per module (its support folder holds a file name
that is not valid UTF-8); every other case is a tampered copy of its
model.json or state, built at test time.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protorefine_jax.app import deploy, html_report, report
from protorefine_jax.cli import fit as fit_cli
from protorefine_jax.cli import predict as predict_cli
from protorefine_jax.data import make_synthetic_dataset
from protorefine_jax.io import model_dir, paths
from protorefine_jax.io.model_dir import ModelFormatError, ModelMismatchError

REPO = Path(__file__).resolve().parents[1]
FAST = dict(image_size=64, weights="random", batch_size=4, progress=False, method="patchcore")
BAD_NAME = b"part_\xff.png"
FORMULA = "=1+cmd|calc!A0.png"


def _non_utf8_ok(folder: Path) -> bool:
    try:
        (Path(os.fsdecode(os.path.join(os.fsencode(folder), BAD_NAME)))).write_bytes(b"")
    except (OSError, UnicodeError):
        return False
    os.unlink(os.path.join(os.fsencode(folder), BAD_NAME))
    return True


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("demo"), ["fabric"], 3, 2, 1, image_size=64, seed=0
    )
    return root / "fabric"


@pytest.fixture(scope="module")
def images(demo, tmp_path_factory):
    """Three images to score: a plain name, a spreadsheet formula and a non-UTF-8 name."""
    folder = tmp_path_factory.mktemp("incoming")
    src = sorted((demo / "test").rglob("*.png"))
    (folder / "plain.png").write_bytes(src[0].read_bytes())
    (folder / FORMULA).write_bytes(src[1].read_bytes())
    if _non_utf8_ok(folder):
        with open(os.path.join(os.fsencode(folder), BAD_NAME), "wb") as f:
            f.write(src[2].read_bytes())
    return folder


@pytest.fixture(scope="module")
def model(demo, tmp_path_factory):
    support = tmp_path_factory.mktemp("support")
    for p in sorted((demo / "train/good").glob("*.png"))[:2]:
        shutil.copy(p, support / p.name)
    if _non_utf8_ok(support):  # fit must not store the name as a lone surrogate
        with open(os.path.join(os.fsencode(support), BAD_NAME), "wb") as f:
            f.write((demo / "train/good/002.png").read_bytes())
    out = tmp_path_factory.mktemp("models") / "m"
    s = deploy.FitSettings(support_dir=str(support), out=str(out), **FAST)
    deploy.fit_model(s, log=lambda _: None)
    return out


@pytest.fixture(autouse=True)
def unparse():
    yield
    fit_cli.FLAGS.unparse_flags()
    predict_cli.FLAGS.unparse_flags()


def _copy(model: Path, tmp_path: Path, edit=None, text: str | None = None) -> Path:
    out = tmp_path / "tampered"
    shutil.copytree(model, out)
    if edit is not None:
        manifest = json.loads((out / "model.json").read_text())
        edit(manifest)
        text = json.dumps(manifest)  # allow_nan: a tamperer may write NaN
    if text is not None:
        (out / "model.json").write_text(text)
    return out


def _set(path: str, value):
    def edit(manifest):
        node = manifest
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[k]
        if value is _DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return edit


_DELETE = object()


def _predict_cli(model: Path, images: Path, out: Path, *extra: str) -> list[str]:
    argv = ["predict", f"--model={model}", f"--images={images}", f"--out={out}"]
    return argv + ["--noprogress", *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- 3: tampered model directories


@pytest.mark.parametrize(
    "edit, match",
    [
        (_set("metadata.image_size", [4096, 4096]), r"image_size\[0\] must be an integer in \[16"),
        (_set("metadata.image_size", [32768, 32768]), r"image_size\[0\] must be an integer"),
        (_set("metadata.config.num_iters", 10**9), r"num_iters must be an integer in \[1, 1000\]"),
        (_set("metadata.config.sinkhorn_iters", 10**9), r"sinkhorn_iters must be an integer"),
        (_set("metadata.config.lam", 1e300), r"config.lam must be a finite number"),
    ],
)
def test_tampered_sizes_and_iteration_counts_are_refused_on_open(model, tmp_path, edit, match):
    with pytest.raises(ModelFormatError, match=match):
        deploy.open_model(_copy(model, tmp_path, edit), runtime="library")


def test_weights_path_in_model_json_is_never_opened_nor_hashed(model, tmp_path, monkeypatch):
    hashed = []
    real = model_dir.file_sha256

    def spy(path, *args, **kwargs):
        hashed.append(str(path))
        if str(path) in ("/dev/zero", "/etc/passwd"):
            raise AssertionError(f"hashed {path}, a path read from model.json")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(model_dir, "file_sha256", spy)
    for claimed in ("/dev/zero", "/etc/passwd"):

        def edit(m, claimed=claimed):
            m["metadata"]["backbone"].update(weights=claimed, weights_sha256="ab" * 32)

        shutil.rmtree(tmp_path / "tampered", ignore_errors=True)
        with pytest.raises(ModelMismatchError, match="never opened") as e:
            deploy.open_model(_copy(model, tmp_path, edit), runtime="library")
        assert "--weights=" in str(e.value)
    assert not {"/dev/zero", "/etc/passwd"} & set(hashed)


def test_listed_file_that_is_a_symlink_out_of_the_folder_is_refused(model, tmp_path):
    out = _copy(model, tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.move(out / "state.safetensors", outside)
    (out / "state.safetensors").symlink_to(outside)
    with pytest.raises(ModelFormatError, match="missing or not a plain file"):
        model_dir.load_model(out)


# ---------------------------------------------------------------- 4: symlink loops in globs


def test_symlink_loop_in_a_glob_lists_once_and_ends(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x.png").write_bytes(b"")
    for name in "abc":
        (d / name).symlink_to(".")
    code = (
        "import sys; from protorefine_jax.io import paths;"
        "print(len(paths.list_files(sys.argv[1])[1]))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, f"{d}/**/*.png"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0 and run.stdout.strip() == "1", run.stderr[-2000:]


def test_listing_has_a_bound_with_a_clear_error(tmp_path, monkeypatch):
    for i in range(10):
        (tmp_path / f"{i}.png").write_bytes(b"")
    monkeypatch.setattr(paths, "MAX_LISTED_PATHS", 5)
    with pytest.raises(paths.TooManyFilesError, match="more than 5 paths.*narrower"):
        deploy.list_images(f"{tmp_path}/*.png")


# ---------------------------------------------- 5 and 9: file names in every written text


def test_odd_file_names_are_written_as_valid_utf8_and_never_as_formulas(model, images, tmp_path):
    manifest = (model / "model.json").read_bytes().decode("utf-8", "strict")
    assert "\\udcff" not in manifest  # no lone surrogate in model.json
    non_utf8 = any(b"\xff" in n for n in os.listdir(os.fsencode(images)))
    out = tmp_path / "out"
    s = deploy.PredictSettings(
        model=str(model), images=str(images), out=str(out), batch_size=4, progress=False
    )
    summary = deploy.predict(s, log=lambda _: None)
    assert summary["scored"] == 2 + non_utf8
    text = (out / "predictions.csv").read_bytes().decode("utf-8", "strict")
    rows = list(csv.DictReader(text.splitlines()))
    names = {r["file"] for r in rows}
    assert "'" + FORMULA in names and FORMULA not in names
    if non_utf8:
        assert "part_\\xff.png" in names
    for line in (out / "predictions.jsonl").read_bytes().decode("utf-8", "strict").splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in predictions.jsonl"))
    (out / "report.html").read_bytes().decode("utf-8", "strict")
    assert not list(out.rglob(".*.tmp"))


def test_output_write_is_atomic(tmp_path, monkeypatch):
    paths.write_output(tmp_path, "predictions.csv", "old\n")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        paths.write_output(tmp_path, "predictions.csv", "new, but never complete\n")
    assert (tmp_path / "predictions.csv").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]


def test_csv_cells_that_start_a_formula_are_quoted():
    text = paths.csv_text(
        ["file", "score"],
        [{"file": c + "x", "score": 1.5} for c in ("=", "+", "-", "@", "\t", "\r", "a")],
    )
    cells = [r["file"] for r in csv.DictReader(text.splitlines(keepends=True))]
    assert cells == ["'=x", "'+x", "'-x", "'@x", "'\tx", "'\rx", "ax"]


# ---------------------------------------------------- 6: writes through symlinked sub-folders


def test_predict_never_writes_through_a_symlinked_overlays_folder(model, images, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "overlays").symlink_to(elsewhere)
    s = deploy.PredictSettings(
        model=str(model),
        images=str(images),
        out=str(runs),
        overwrite=True,
        batch_size=4,
        progress=False,
    )
    with pytest.raises(paths.UnsafeOutputError, match="is a symlink"):
        deploy.predict(s, log=lambda _: None)
    assert not any(elsewhere.iterdir())


def test_eval_never_writes_through_symlinked_heatmaps_or_reports(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    for sub in ("heatmaps", "reports"):
        (work / sub).symlink_to(elsewhere)
    img = np.zeros((1, 8, 8, 3), np.uint8)
    amap = np.zeros((1, 8, 8), np.float32)
    with pytest.raises(paths.UnsafeOutputError, match="is a symlink"):
        report.save_overlays(
            work / "heatmaps", "p", img, amap, amap > 0, ["a.png"], (0.0, 1.0), root=work
        )
    with pytest.raises(paths.UnsafeOutputError, match="is a symlink"):
        html_report.write_eval_report(
            work / "reports" / "p.html",
            title="t",
            names=["a.png", "b.png"],
            labels=np.array([0, 1]),
            scores=np.array([0.1, 0.9]),
            maps=np.zeros((2, 8, 8), np.float32),
            load_images=lambda idx: np.zeros((len(idx), 8, 8, 3), np.uint8),
            metrics={},
            settings={},
            root=work,
        )
    with pytest.raises(paths.UnsafeOutputError, match="is a symlink"):
        report.write_json(work / "reports" / "x.json", {"a": 1}, root=work)
    assert not any(elsewhere.iterdir())


# ------------------------------------------------------- 7 and 8: one error line, no traceback


def _deep(model: Path) -> str:
    return "[" * 100_000 + "]" * 100_000


def _tamper_state(model: Path, tmp_path: Path, **calibration) -> Path:
    out = _copy(model, tmp_path)
    loaded = model_dir.load_model(out)
    cal = loaded.state.calibration._replace(**calibration)
    state = loaded.state._replace(calibration=cal)
    for name in ("model.json", "state.safetensors"):
        (out / name).unlink()
    model_dir.save_model(out, state, loaded.manifest["metadata"])
    return out


@pytest.mark.parametrize(
    "tamper, match",
    [
        (lambda m, t: _copy(m, t, _set("metadata", [1, 2])), "lacks the object 'metadata'"),
        (lambda m, t: _copy(m, t, _set("metadata.image_size", _DELETE)), "lacks 'image_size'"),
        (
            lambda m, t: _copy(m, t, _set("files", ["state.safetensors"])),
            "lacks the object 'files'",
        ),
        (lambda m, t: _copy(m, t, _set("metadata.config.evil", 1)), r"unknown keys \['evil'\]"),
        (lambda m, t: _copy(m, t, _set("metadata.threshold", _DELETE)), "lacks 'threshold'"),
        (lambda m, t: _copy(m, t, _set("metadata.map_scale", 5)), "map_scale must be a list"),
        (lambda m, t: _copy(m, t, text=_deep(m)), "nested too deeply"),
        (lambda m, t: _copy(m, t, _set("metadata.threshold.value", float("nan"))), "holds NaN"),
        (lambda m, t: _tamper_state(m, t, host_loc=np.zeros(3, np.float32)), "host_loc must be"),
        (lambda m, t: _tamper_state(m, t, host_scale=np.float32(0)), "scales > 0"),
    ],
    ids=[
        "metadata-list",
        "no-image-size",
        "files-list",
        "unknown-config-key",
        "no-threshold",
        "int-map-scale",
        "deep-nesting",
        "nan-threshold",
        "calibration-shape",
        "calibration-scale-0",
    ],
)
def test_tampered_model_json_is_one_error_line(model, images, tmp_path, capsys, tamper, match):
    bad = tamper(model, tmp_path)
    assert predict_cli.run(_predict_cli(bad, images, tmp_path / "out")) == 2
    assert re.search(match, _one_error_line(capsys))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flag, match",
    [
        ("--max_image_pixels=0", r"--max_image_pixels must be an integer in \[1,"),
        ("--batch_size=100000000", r"--batch_size must be an integer in \[1, 1024\]"),
        ("--views=100000000", r"--views must be an integer in \[0, 64\]"),
        ("--margin=nan", "--margin must be a finite number"),
        ("--image_size=4096", r"--image_size\[0\] must be an integer in \[16, 1024\]"),
        ("--num_iters=1000000000", r"--num_iters must be an integer in \[1, 1000\]"),
    ],
)
def test_fit_flags_out_of_range_are_one_error_line(tmp_path, capsys, flag, match):
    # An empty support folder: the flags must be refused before the images are looked for.
    argv = ["fit", f"--support_dir={tmp_path}", f"--out={tmp_path}/m", flag]
    assert fit_cli.run(argv) == 2
    assert re.search(match, _one_error_line(capsys))


@pytest.mark.parametrize(
    "flag, match",
    [
        ("--threshold=nan", "--threshold must be a finite number"),
        ("--threshold=inf", "--threshold must be a finite number"),
        ("--batch_size=100000000", r"--batch_size must be an integer in \[1, 1024\]"),
        ("--max_image_pixels=0", r"--max_image_pixels must be an integer in \[1,"),
    ],
)
def test_predict_flags_out_of_range_are_one_error_line(
    model, images, tmp_path, capsys, flag, match
):
    assert predict_cli.run(_predict_cli(model, images, tmp_path / "out", flag)) == 2
    assert re.search(match, _one_error_line(capsys))


def test_state_classes_are_named_not_any_under_the_package(model):
    structure = {
        "type": "namedtuple",
        "class": "protorefine_jax.threshold:Threshold",
        "fields": {"value": {"type": "scalar", "value": 1.0}},
    }
    with pytest.raises(ModelFormatError, match="outside the allowed classes"):
        model_dir.decode_tree(structure, {})


def test_json_written_is_strict():
    with pytest.raises(ValueError):
        paths.json_text({"score": float("inf")})
    assert paths.json_text({"score": float("nan")}, null_nonfinite=True) == '{"score": null}'
    digest = hashlib.sha256(b"").hexdigest()
    assert paths.json_text({"\udcff": digest}) == json.dumps({"\\xff": digest})
