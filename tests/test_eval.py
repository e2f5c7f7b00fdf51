"""The eval CLI: smoke run on synthetic data with a random backbone, flags, errors."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from conftest import SHARED_DATA

from protorefine_jax import RefineConfig
from protorefine_jax.app import runner, schema
from protorefine_jax.cli import common as cli_common
from protorefine_jax.cli import eval as eval_cli
from protorefine_jax.cli import fit as fit_cli

FLAGS = flags.FLAGS
REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    dataset="synthetic",
    synthetic_categories=["fabric"],
    synthetic_counts=["3", "3", "3"],
    image_size=64,
    weights="random",
    shots=["1", "2"],
    seeds=["0", "1"],
    methods=["patchcore", "patchcore+", "patchcore+online"],
    num_iters=2,
    sinkhorn_iters=10,
    online_capacity=16,
    online_add=4,
    batch_size=4,
    num_heatmaps=2,
    progress=False,
)


@pytest.fixture(autouse=True)
def parsed_flags():
    if not FLAGS.is_parsed():
        FLAGS.mark_as_parsed()


def test_smoke_run_writes_every_result_file(tmp_path):
    workdir = tmp_path / "run"
    with flagsaver.flagsaver(workdir=str(workdir), **TINY):
        eval_cli.main(["eval"])
    results = json.loads((workdir / "results.json").read_text())
    assert len(results["rows"]) == 2 * 2 * 3  # shots x seeds x methods
    row = results["rows"][0]
    for key in (
        "dataset",
        "category",
        "method",
        "shots",
        "seed",
        "image_auroc",
        "pixel_auroc",
        "image_f1_max",
        "pixel_f1_max",
        "aupro",
        "support",
    ):
        assert key in row
    assert row["support"][0].startswith("train/good/")
    assert len(results["summary"]) == 2 * 3
    assert {"image_auroc_mean", "image_auroc_std"} <= set(results["summary"][0])
    assert "patchcore+" in (workdir / "results.md").read_text()
    assert json.loads((workdir / "config.json").read_text())["settings"]["image_size"] == 64
    lines = (workdir / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 12 and len(json.loads(lines[0])["scores"]) == 6
    assert len(list((workdir / "heatmaps").glob("*.png"))) == 3 * 3  # 2 defective + 1 good


def test_existing_workdir_is_never_overwritten(tmp_path):
    (tmp_path / "old.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="never overwritten silently"):
        runner.prepare_workdir(str(tmp_path), overwrite=False)
    assert (tmp_path / "old.txt").read_text() == "keep"


@pytest.mark.parametrize(
    ("settings", "msg"),
    [
        ({"methods": ("winclip+",), "dataset": "synthetic"}, "need --clip_dir"),
        ({"methods": ("patchcore++",), "dataset": "synthetic"}, "unknown method"),
        ({"dataset": "mvtec"}, "--data_dir is required"),
        ({"shots": (0,), "dataset": "synthetic"}, "--shots must be positive"),
    ],
)
def test_bad_settings_fail_before_any_work(settings, msg):
    with pytest.raises(ValueError, match=msg):
        runner.check_settings(runner.Settings(**settings))


def test_missing_data_dir_exits_with_a_message(tmp_path, capsys):
    with flagsaver.flagsaver(
        dataset="mpdd", data_dir=str(tmp_path / "nope"), workdir=str(tmp_path / "w"), progress=False
    ):
        with pytest.raises(SystemExit):
            eval_cli.main(["eval"])
    assert "does not exist" in capsys.readouterr().err


def test_bare_flagfile_names_resolve_to_experiments_flags():
    argv = eval_cli.resolve_flagfiles(["eval", "--flagfile=mpdd_2shot.flags", "--shots=1"])
    assert (
        argv[1] == f"--flagfile={REPO / 'protorefine_jax' / 'cli' / 'flags' / 'mpdd_2shot.flags'}"
    )
    assert argv[2] == "--shots=1"


def test_refinement_flags_are_derived_from_refine_config():
    """Eval's refinement flags (but --lam) typed and documented by RefineConfig, as fit's."""
    defaults = RefineConfig()
    kinds = {bool: "bool", int: "int", str: "string"}
    assert set(runner.REFINE_FIELDS) == set(schema.REFINE_FLAGS) - {"lam"}
    for name in runner.REFINE_FIELDS:
        flag = FLAGS[name]
        want = kinds.get(type(getattr(defaults, name)), "float")
        assert (flag.flag_type(), flag.default) == (want, None), name
        assert flag.help == cli_common.refine_help(name), name
        assert flag.help == fit_cli.FLAGS[name].help, name  # one text for the same setting
        # Settings carries the same field, of the config's type (None: the detector's default).
        field = next(f for f in dataclasses.fields(runner.Settings) if f.name == name)
        assert field.default is None, name
        assert str(field.type) == f"{type(getattr(defaults, name)).__name__} | None", name


@pytest.mark.parametrize(
    "path",
    sorted((REPO / "protorefine_jax" / "cli" / "flags").glob("*.flags")) + [REPO / "demo.flags"],
)
def test_every_flagfile_parses(path):
    with flagsaver.flagsaver():
        FLAGS(["eval", f"--flagfile={path}"])
        settings = eval_cli.settings_from_flags()
    runner.check_settings(
        settings.__class__(**{**settings.__dict__, "data_dir": "x", "clip_dir": "x"})
    )


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "mpdd").is_dir(), reason="../shared/data/mpdd is absent")
def test_mpdd_2shot_flagfile_on_real_images(tmp_path):
    argv = eval_cli.resolve_flagfiles(["eval", "--flagfile=mpdd_2shot.flags"])
    with flagsaver.flagsaver():
        FLAGS(
            argv
            + [
                f"--data_dir={SHARED_DATA / 'mpdd'}",
                f"--workdir={tmp_path / 'r'}",
                "--seeds=0",
                "--progress=false",
            ]
        )
        out = runner.run(eval_cli.settings_from_flags())
    by_method = {r["method"]: r for r in out["rows"]}
    assert set(by_method) == {"patchcore", "patchcore+"}
    assert by_method["patchcore+"]["image_auroc"] > 60.0


def tiny_clip_folder(path):
    """A complete HF CLIP folder with a tiny random model and a tiny BPE vocabulary."""
    import dataclasses

    from test_clip_convert import SPEC

    from protorefine_jax.clip import flax_to_hf_state_dict, random_params, write_clip_folder

    merges = ["h e", "l l", "he ll"]
    spec = dataclasses.replace(SPEC, vocab_size=512 + len(merges) + 2)
    sd = flax_to_hf_state_dict(random_params(spec, seed=0))
    return write_clip_folder(path, sd, spec, "#version: 0.2\n" + "\n".join(merges) + "\n"), spec


def test_winclip_methods_run_from_a_clip_folder(tmp_path):
    folder, spec = tiny_clip_folder(tmp_path / "clip")
    workdir = tmp_path / "run"
    tiny = {
        **TINY,
        "methods": ["winclip", "winclip_coreset", "winclip+"],
        "image_size": spec.image_size,
        "shots": ["1"],
        "num_heatmaps": 1,
    }
    with flagsaver.flagsaver(workdir=str(workdir), clip_dir=str(folder), **tiny):
        eval_cli.main(["eval"])
    results = json.loads((workdir / "results.json").read_text())
    assert {r["method"] for r in results["rows"]} == {"winclip", "winclip_coreset", "winclip+"}
    assert all(0.0 <= r["image_auroc"] <= 100.0 for r in results["rows"])


def test_missing_clip_folder_names_the_missing_files(tmp_path, capsys):
    tiny = {**TINY, "methods": ["winclip+"], "image_size": 240}
    with flagsaver.flagsaver(workdir=str(tmp_path / "w"), clip_dir=str(tmp_path / "none"), **tiny):
        with pytest.raises(SystemExit):
            eval_cli.main(["eval"])
    err = capsys.readouterr().err
    assert "config.json" in err and "model.safetensors" in err and "vocab.json" in err


def test_mixed_hosts_refuse_a_shared_image_size():
    with pytest.raises(ValueError, match="apply to one host"):
        runner.check_settings(
            runner.Settings(
                dataset="synthetic", methods=("patchcore", "winclip"), clip_dir="x", image_size=256
            )
        )


def test_too_few_good_images_fail_before_any_extraction(tmp_path, capsys):
    tiny = {**TINY, "shots": ["4"]}  # 3 train-good images only
    with flagsaver.flagsaver(workdir=str(tmp_path / "w"), **tiny):
        with pytest.raises(SystemExit):
            eval_cli.main(["eval"])
    assert "only 3 good training image" in capsys.readouterr().err


def test_category_mean_row_is_the_std_over_seeds_of_category_means():
    from protorefine_jax.app import report

    rows = []
    for cat, vals in (("a", (80.0, 90.0)), ("b", (60.0, 100.0))):
        for seed, v in enumerate(vals):
            rows.append(
                {
                    "dataset": "d",
                    "category": cat,
                    "method": "m",
                    "shots": 1,
                    "seed": seed,
                    "image_auroc": v,
                    "image_f1_max": v,
                }
            )
    mean = next(r for r in report.summarize(rows) if r["category"] == "mean")
    # Per seed: (80 + 60) / 2 = 70 and (90 + 100) / 2 = 95.
    assert mean["image_auroc_mean"] == pytest.approx(82.5)
    assert mean["image_auroc_std"] == pytest.approx(12.5)


def test_outputs_close_the_scores_file_when_the_run_fails(tmp_path):
    import types

    import numpy as np

    row = {"dataset": "d", "category": "c", "method": "m", "shots": 1, "seed": 0}
    test = {"names": ["a.png"], "labels": np.array([1])}
    with pytest.raises(RuntimeError, match="boom"):
        with runner.Outputs(tmp_path) as out:
            assert not (tmp_path / "scores.jsonl").exists()  # created with the first row
            out.add(row, test, types.SimpleNamespace(image_scores=np.array([0.5])))
            scores = out.scores
            raise RuntimeError("boom")
    assert scores.closed
    assert json.loads((tmp_path / "scores.jsonl").read_text())["files"] == ["a.png"]


def test_calibration_error_and_the_stream_method_are_reported(tmp_path):
    workdir = tmp_path / "run"
    tiny = {**TINY, "shots": ["2"], "seeds": ["0"], "methods": ["patchcore+", "patchcore+stream"]}
    with flagsaver.flagsaver(workdir=str(workdir), **tiny):
        eval_cli.main(["eval"])
    results = json.loads((workdir / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    for method in ("patchcore+", "patchcore+stream"):
        err = rows[method]["calibration_error"]
        assert set(err) == {
            "host_shift",
            "host_iqr_ratio",
            "refined_shift",
            "refined_iqr_ratio",
            "refined_share",
        }
        assert all(np.isfinite(v) for v in err.values())
    # The stream's statistics move with the images it has seen: other numbers than the support's.
    assert rows["patchcore+stream"]["calibration_error"] != rows["patchcore+"]["calibration_error"]
    text = (workdir / "results.md").read_text()
    assert "Calibration error on the normal test images" in text and "patchcore+stream" in text
