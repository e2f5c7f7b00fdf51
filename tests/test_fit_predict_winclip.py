"""fit / predict with WinCLIP(+) on a tiny random CLIP folder: end to end, errors, mismatches."""

import csv
import json

import numpy as np
import pytest
from helpers import FAST_FIT, demo_category
from helpers import FAST_REFINE as PATCHCORE_REFINE
from test_eval import tiny_clip_folder

from protorefine_jax.app import deploy, schema
from protorefine_jax.cli import fit as fit_cli
from protorefine_jax.cli import predict as predict_cli

FAST_REFINE = ("--num_iters=2", "--sinkhorn_iters=10")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_category(tmp_path_factory)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder, spec = tiny_clip_folder(tmp_path_factory.mktemp("clip") / "tiny")
    return folder, spec


def _fit(demo, clip, out, method):
    argv = [
        "fit",
        f"--support_dir={demo / 'train/good'}",
        f"--out={out}",
        f"--method={method}",
        f"--clip_dir={clip[0]}",
        "--object_name=fabric",
        "--batch_size=4",
        "--noprogress",
        *FAST_REFINE,
    ]
    assert fit_cli.run(argv) == 0
    return out


@pytest.fixture(scope="module")
def model(demo, clip, tmp_path_factory):
    # Plain WinCLIP: ~15 s here; WinCLIP+ (a refined, calibrated fit per held-out image) is
    # the slow test below.
    return _fit(demo, clip, tmp_path_factory.mktemp("models") / "w", "winclip")


def _predict_argv(model, images, out, *extra):
    return [
        "predict",
        f"--model={model}",
        f"--images={images}",
        f"--out={out}",
        "--batch_size=4",
        "--noprogress",
        *extra,
    ]


def test_fit_records_the_clip_folder_and_a_threshold_from_the_support(model, clip):
    meta = json.loads((model / "model.json").read_text())["metadata"]
    folder, spec = clip
    assert meta["detector"]["family"] == "winclip" and meta["detector"]["method"] == "winclip"
    assert meta["image_size"] == [spec.image_size, spec.image_size]
    assert meta["clip"]["spec"]["vision_width"] == spec.vision_width
    assert meta["clip"]["weights_files"] == ["model.safetensors"]
    sha = deploy.model_dir.file_sha256(folder / "model.safetensors")
    assert meta["clip"]["weights_sha256"] == sha == meta["backbone"]["weights_sha256"]
    assert meta["clip"]["object_name"] == "fabric"
    assert meta["config"]["use_refinement"] is False and meta["config"]["num_iters"] == 2
    # Leave-one-out scores of the 3 good images; the threshold is their largest (rank 3 of 3).
    held = meta["threshold_calibration"]["scores"]
    t = meta["threshold"]
    assert len(held) == 3 and t["source"] == "held_out" and t["num_scores"] == 3
    assert t["value"] == pytest.approx(max(held), rel=1e-12)
    schema.check_metadata(meta)
    assert not (model / deploy.EXPORT_FILE).exists()


def test_predict_on_a_winclip_model_writes_predictions(model, demo, clip, tmp_path):
    out = tmp_path / "p"
    assert predict_cli.run(_predict_argv(model, demo / "test", out, f"--clip_dir={clip[0]}")) == 0
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 6 and all(r["error"] == "" for r in rows)
    thr = json.loads((model / "model.json").read_text())["metadata"]["threshold"]["value"]
    for r in rows:
        assert np.isfinite(float(r["score"]))
        assert r["decision"] == ("anomalous" if float(r["score"]) > thr else "good")
        assert r["label"] == ("good" if r["folder"] == "good" else "defective")
    assert (out / "report.html").is_file() and len(list((out / "overlays").glob("*.png"))) == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 6 and summary["labels"]["image_auroc"] is not None


def test_predict_scores_match_the_library_detector(model, demo, clip, tmp_path):
    """predict's scores are WinClip.score of the state fit saved, on bicubic-resized images."""
    from protorefine_jax.detectors.winclip import WinClip

    scorer, manifest = deploy.open_model(model, clip_dir=str(clip[0]))
    files = sorted((demo / "test").rglob("*.png"))
    size = manifest["metadata"]["image_size"][0]
    images, _, _ = deploy.read_batch(files, size, strict=True, resample="bicubic")
    got = scorer.score(images)[0]
    detector, params = WinClip.from_folder(str(clip[0]))
    state = deploy.model_dir.load_model(model).state
    config = detector.config(use_refinement=False, num_iters=2, sinkhorn_iters=10)
    want = detector.score(params, state._replace(calibrated_under=config), images, config)
    np.testing.assert_allclose(got, np.asarray(want.image_scores), rtol=1e-5, atol=1e-6)


def test_predict_refuses_another_clip_folder_naming_the_difference(model, demo, tmp_path, capsys):
    import dataclasses

    from test_clip_convert import SPEC

    from protorefine_jax.clip import flax_to_hf_state_dict, random_params, write_clip_folder

    other, spec = tiny_clip_folder(tmp_path / "other")
    sd = flax_to_hf_state_dict(random_params(spec, seed=1))  # same architecture, other weights
    (other / "model.safetensors").unlink()
    write_clip_folder(other, sd, spec, "#version: 0.2\nh e\nl l\nhe ll\n")
    argv = _predict_argv(model, demo / "test", tmp_path / "p", f"--clip_dir={other}")
    assert predict_cli.run(argv) == 2
    err = capsys.readouterr().err
    assert "clip.weights_sha256: model has" in err and "--clip_dir=<the CLIP folder" in err
    assert not (tmp_path / "p").exists()
    # Another architecture: the field is named.
    wide = dataclasses.replace(SPEC, vocab_size=spec.vocab_size, embed_dim=24)
    sd = flax_to_hf_state_dict(random_params(wide, seed=0))
    third = write_clip_folder(tmp_path / "third", sd, wide, "#version: 0.2\nh e\nl l\nhe ll\n")
    argv = _predict_argv(model, demo / "test", tmp_path / "p", f"--clip_dir={third}")
    assert predict_cli.run(argv) == 2
    assert "clip.spec.embed_dim: model has 16, --clip_dir has 24" in capsys.readouterr().err


def test_predict_without_clip_dir_says_how(model, demo, tmp_path, capsys):
    assert predict_cli.run(_predict_argv(model, demo / "test", tmp_path / "p")) == 2
    err = capsys.readouterr().err
    assert "pass --clip_dir=<that CLIP folder on this machine>" in err
    argv = _predict_argv(model, demo / "test", tmp_path / "p", "--runtime=export", "--clip_dir=x")
    assert predict_cli.run(argv) == 2
    assert "has no exported program" in capsys.readouterr().err


def test_fit_winclip_errors_name_the_fix(demo, clip, tmp_path, capsys):
    base = ["fit", f"--support_dir={demo / 'train/good'}", f"--out={tmp_path / 'm'}"]
    cases = [
        (["--method=winclip+"], "--method=winclip+ needs --clip_dir"),
        (["--method=winclip", f"--clip_dir={tmp_path / 'none'}"], "missing config.json"),
        (["--method=winclip+", f"--clip_dir={clip[0]}", "--export"], "Drop --export"),
        (["--method=winclip+", f"--clip_dir={clip[0]}", "--image_size=64"], "takes 32x32 px"),
        (["--method=winclip+", f"--clip_dir={clip[0]}", "--weights=random"], "Drop --weights"),
        (["--method=winclip+", f"--clip_dir={clip[0]}", "--shots=1"], "at least 2 good images"),
    ]
    for extra, message in cases:
        assert fit_cli.run(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not (tmp_path / "m").exists()


def test_patchcore_model_refuses_clip_dir(demo, tmp_path):
    out = tmp_path / "pc"
    s = deploy.FitSettings(
        support_dir=str(demo / "train/good"), out=str(out), refine=PATCHCORE_REFINE, **FAST_FIT
    )
    deploy.fit_model(s, log=lambda _: None)
    with pytest.raises(ValueError, match="--clip_dir is for WinCLIP models"):
        deploy.open_model(out, clip_dir="x")


@pytest.mark.slow
def test_winclip_plus_fit_and_predict_end_to_end(demo, clip, tmp_path):
    model = _fit(demo, clip, tmp_path / "plus", "winclip+")
    meta = json.loads((model / "model.json").read_text())["metadata"]
    assert meta["detector"]["method"] == "winclip+" and meta["config"]["use_refinement"] is True
    state = deploy.model_dir.load_model(model).state
    assert len(state.calibration) == 3  # one per few-shot scale: patches, 2x2 and 3x3 windows
    out = tmp_path / "p"
    assert predict_cli.run(_predict_argv(model, demo / "test", out, f"--clip_dir={clip[0]}")) == 0
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 6 and all(np.isfinite(float(r["score"])) for r in rows)
    assert (out / "report.html").is_file()
