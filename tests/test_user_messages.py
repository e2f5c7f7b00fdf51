"""Issue 27, items 3-6: messages that advise, shapes not taken silently, help, rounded tables."""

import dataclasses
import importlib
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protorefine_jax import RefineConfig
from protorefine_jax.app import deploy, report, schema
from protorefine_jax.bank import MemoryBank
from protorefine_jax.cli import fit as fit_cli
from protorefine_jax.cli import predict as predict_cli

REPO = Path(__file__).resolve().parents[1]


def _images(folder: Path, sizes: dict[tuple[int, int], int]) -> Path:
    """PNG files of the given (width, height) sizes and counts (seeded noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    i = 0
    for (w, h), count in sizes.items():
        for _ in range(count):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}_{w}x{h}.png")
            i += 1
    return folder


def _run_fit(argv, capsys):
    try:
        status = fit_cli.run(["fit", *argv])
    finally:
        fit_cli.FLAGS.unparse_flags()
    out = capsys.readouterr()
    return status, out.out, out.err


# --------------------------------------------------------------------------- item 3: advice


def _module(name: str):
    """A module new with issue 27 (imported per test: the other tests run without it)."""
    package = (
        "protorefine_jax.cli"
        if name in ("fit", "predict", "eval", "common")
        else "protorefine_jax.app"
    )
    return importlib.import_module(f"{package}.{name}")


def _bank(n: int, c: int, degenerate: bool) -> MemoryBank:
    return MemoryBank(np.zeros((n, c), np.float32), np.arange(n), n, n, degenerate)


def test_degenerate_bank_is_advice_usable_and_what_to_do():
    advice = _module("advice")
    shipped = advice.bank_advice([_bank(204, 152, True)], RefineConfig())
    assert len(shipped) == 1
    line = shipped[0]
    assert line.startswith("note: ") and "usable" in line and "nothing to do" in line
    assert "ridge_wide=0.1" in line  # n >= c: the wide ridge is what applies
    for jargon in ("DEGENERATE", "W0", "rank("):
        assert jargon not in line
    # A ridge below the one found safe: a warning with the fix.
    low = advice.bank_advice([_bank(204, 152, True)], RefineConfig(ridge_wide=1e-4))
    assert low[0].startswith("warning: ") and "fit again without --ridge_wide" in low[0]
    narrow = advice.bank_advice([_bank(100, 152, True)], RefineConfig(ridge=1e-4))
    assert "--ridge=0.0001" in narrow[0]
    # A detector config holding its RefineConfig (WinClipConfig.refine) is read through it.
    wrapped = advice.bank_advice(
        [_bank(204, 152, True)], types.SimpleNamespace(refine=RefineConfig())
    )
    assert wrapped == shipped
    # Nothing to say: a bank that does not span, or plain PatchCore.
    assert advice.bank_advice([_bank(204, 152, False)], RefineConfig()) == []
    assert advice.bank_advice([_bank(204, 152, True)], RefineConfig(use_refinement=False)) == []


def test_fit_log_gives_advice_and_keeps_ranks_for_verbose(tmp_path):
    # alpha=1 keeps every support patch: the bank spans the support features (degenerate).
    support = _images(tmp_path / "good", {(40, 40): 2})
    base = dict(
        support_dir=str(support),
        image_size=32,
        weights="random",
        batch_size=2,
        progress=False,
        alpha=1.0,
        views=0,
        refine=(("num_iters", 1), ("sinkhorn_iters", 2)),
    )
    lines: list[str] = []
    deploy.fit_model(deploy.FitSettings(out=str(tmp_path / "m1"), **base), log=lines.append)
    text = "\n".join(lines)
    assert "DEGENERATE" not in text and "rank(M)" not in text
    assert "The model is usable as is; nothing to do." in text
    lines.clear()
    s = deploy.FitSettings(out=str(tmp_path / "m2"), verbose=True, **base)
    deploy.fit_model(s, log=lines.append)
    assert any(line.startswith("diagnostics: ") and "rank(M)" in line for line in lines)


def test_cli_stderr_has_no_jax_platform_noise(tmp_path):
    # eval starts JAX (two host devices), then refuses the batch size: a fast run that still
    # initialises every backend JAX knows, where "Unable to initialize backend 'tpu'" was logged.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = str(REPO)
    cmd = [
        sys.executable,
        "-m",
        "experiments.eval",
        "--dataset=synthetic",
        "--synthetic_categories=fabric",
        "--synthetic_counts=2,2,2",
        "--shots=1",
        "--seeds=0",
        "--devices=2",
        "--batch_size=3",
        f"--workdir={tmp_path / 'w'}",
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2 and "does not split over 2 devices" in done.stderr, done.stderr
    assert "Unable to initialize backend" not in done.stderr, done.stderr
    assert "xla_bridge" not in done.stderr, done.stderr


# --------------------------------------------------------------------------- item 4: shapes


def test_suggested_size_keeps_the_aspect():
    image_check = _module("image_check")
    # ball_screw: 565 wide x 230 high. HEIGHTxWIDTH, multiples of 16, short side <= 256.
    assert image_check.suggest_size(565, 230) == (224, 544)
    assert image_check.suggest_size(230, 565) == (544, 224)
    assert image_check.suggest_size(1024, 1024) == (256, 256)
    h, w = image_check.suggest_size(565, 230)
    assert h % 16 == 0 and w % 16 == 0 and abs(w / h - 565 / 230) < 0.05


def test_fit_suggests_an_image_size_for_a_non_square_folder(tmp_path, capsys):
    support = _images(tmp_path / "good", {(565, 230): 3})
    # A weights file that does not exist stops the fit right after the images were looked at.
    argv = [f"--support_dir={support}", f"--out={tmp_path / 'm'}", "--weights=/no/such.pth"]
    status, out, err = _run_fit(argv, capsys)
    assert status == 2 and "checkpoint file not found" in err
    assert "565 wide x 230 high" in out and "256x256" in out
    assert "--image_size=224x544 (height x width)" in out
    assert "works" in out  # usable as it is; the flag keeps the shape


def test_fit_refuses_a_swapped_image_size_with_the_fix(tmp_path, capsys):
    support = _images(tmp_path / "good", {(565, 230): 2})
    argv = [f"--support_dir={support}", f"--out={tmp_path / 'm'}", "--image_size=544x224"]
    status, _, err = _run_fit(argv, capsys)
    assert status == 2
    assert "look swapped" in err and "Fix: --image_size=224x544." in err
    assert not (tmp_path / "m").exists()


def test_predict_warns_when_the_model_size_is_swapped_for_the_images(tmp_path):
    image_check = _module("image_check")
    files = sorted(_images(tmp_path / "imgs", {(565, 230): 2}).iterdir())
    notes = image_check.check_images(files, (544, 224), explicit=True, for_fit=False)
    assert len(notes) == 1 and notes[0].startswith("warning: ")
    assert "look swapped" in notes[0] and "--image_size=224x544" in notes[0]


def test_mixed_sizes_are_listed_with_counts(tmp_path):
    image_check = _module("image_check")
    folder = _images(tmp_path / "imgs", {(565, 230): 3, (1130, 460): 1, (230, 565): 2})
    files = sorted(folder.iterdir())
    notes = image_check.check_images(files, (224, 544), explicit=True, for_fit=True, root=folder)
    assert len(notes) == 1
    note = notes[0]
    assert "3 sizes (width x height)" in note
    assert "565x230 (3 images)" in note
    assert "230x565 (2 images, e.g. 004_230x565.png)" in note
    assert "1130x460 (1 image, e.g. 003_1130x460.png)" in note
    # 1130x460 has the majority's shape; 230x565 does not, and is named as the odd one.
    assert "230x565 has another shape" in note and "1130x460 has" not in note
    same = _images(tmp_path / "same", {(565, 230): 2, (1130, 460): 1})
    (only,) = image_check.check_images(
        sorted(same.iterdir()), (224, 544), explicit=True, for_fit=True
    )
    assert "same shape, so this is fine" in only


def test_a_refused_image_size_names_the_nearest_valid_one(tmp_path, capsys):
    support = _images(tmp_path / "good", {(565, 230): 2})
    argv = [f"--support_dir={support}", f"--out={tmp_path / 'm'}", "--image_size=230x565"]
    status, _, err = _run_fit(argv, capsys)
    assert status == 2
    assert "multiples of 16" in err and "Nearest valid: --image_size=224x560." in err
    try:
        status = predict_cli.run(
            ["predict", "--model=m", "--images=i", "--out=o", "--image_size=250"]
        )
    finally:
        predict_cli.FLAGS.unparse_flags()
    assert status == 2 and "Nearest valid: --image_size=256." in capsys.readouterr().err


# --------------------------------------------------------------------------- item 5: --help


def _docstring_first_words(name: str) -> str:
    """The first words of `name`'s entry in RefineConfig's docstring, read independently."""
    m = re.search(rf"^ {{6}}{name}: (.*)$", RefineConfig.__doc__, re.MULTILINE)
    assert m, name
    return " ".join(m.group(1).replace("`", "").split()[:4])


def _help(module, argv0: str, capsys) -> str:
    try:
        assert module.run([argv0, "--help"]) == 0
    finally:
        module.FLAGS.unparse_flags()
    return capsys.readouterr().out


@pytest.mark.parametrize("tool", ["fit", "predict"])
def test_help_puts_essentials_first_and_explains_refinement_flags(tool, capsys):
    module = {"fit": fit_cli, "predict": predict_cli}[tool]
    text = _help(module, tool, capsys)
    essential = text[text.index("Essential flags:") : text.index("Other flags:")]
    rest = text[text.index("Other flags:") :]
    lines = [line for line in essential.splitlines()[1:] if line.strip()]
    assert [re.match(r"  --(?:\[no\])?(\w+)", line).group(1) for line in lines] == list(
        module.ESSENTIAL
    )  # in order, one line each
    if tool == "fit":
        assert "--method=patchcore|patchcore+|winclip|winclip+" in essential
        assert "--backbone=efficientnet_lite0|efficientnet_lite2|wide_resnet50_2" in essential
    else:
        assert "--overlays=all|anomalous|none" in essential
    assert "--sinkhorn_mode=log|absorbed" in rest and "--bank=refined|union" in rest
    assert "(unset: default)" not in text and "RefineConfig.lam (unset" not in text
    flat = " ".join(text.split())
    for name in schema.REFINE_FLAGS:
        words = _docstring_first_words(name)
        assert words[:1].upper() + words[1:] in flat, (name, words)
        # derived, not retyped: the flag's help is the docstring's
        assert words.lower() in module.FLAGS[name].help.lower()


def test_eval_help_exits_0_with_essentials_first():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "experiments.eval", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout[done.stdout.index("Essential flags:") :]  # the docstring comes first
    essential = text[: text.index("Other flags:")]
    assert essential.splitlines()[1].startswith("  --flagfile  ")
    for name in ("--dataset", "--data_dir", "--workdir", "--methods", "--shots", "--seeds"):
        assert f"\n  {name}" in essential, name
    assert "--backbone" not in essential and "\n  --backbone\n" in text
    assert "the shipped default; see its docstring" not in text
    assert "Weight of the transport term" in text or "Entropic regularisation" in text


# --------------------------------------------------------------------------- item 6: numbers


def _rows():
    rows = []
    for method, base in (("patchcore", 98.75406283856988), ("patchcore+", 99.3312345)):
        for seed in range(3):
            rows.append(
                dict(
                    dataset="mpdd",
                    category="metal_plate",
                    method=method,
                    shots=2,
                    seed=seed,
                    image_auroc=base + 0.1 * seed,
                    pixel_auroc=97.0 + seed,
                    image_f1_max=90.0,
                    pixel_f1_max=None,
                    aupro=80.123456789,
                )
            )
    return rows


def test_results_table_is_rounded_with_a_delta_column_and_json_keeps_precision():
    summary = report.summarize(_rows())
    # Full precision in what results.json stores.
    pc = next(s for s in summary if s["method"] == "patchcore")
    assert pc["image_auroc_mean"] == pytest.approx(98.85406283856988, abs=1e-12)
    table = report.markdown_table(summary, ["patchcore", "patchcore+"])
    assert not re.search(r"\d\.\d{2,}", table)  # one decimal everywhere
    head = table.splitlines()[0]
    assert head.rstrip(" |").endswith("Δ image_auroc vs patchcore")
    pc_row = next(line for line in table.splitlines() if "| patchcore |" in line)
    plus_row = next(line for line in table.splitlines() if "| patchcore+ | 3 |" in line)
    assert "98.9 ± 0.1" in pc_row and pc_row.rstrip(" |").endswith("ref")
    # Difference of the unrounded means: 99.4312 - 98.8541 = +0.577.
    assert plus_row.rstrip(" |").endswith("+0.6")
    assert "Difference vs patchcore" in table
    diff = table.splitlines()[-1]
    assert diff.startswith("| mpdd | metal_plate | 2 | patchcore+ | +0.6 | +0.0 | +0.0 | - | +0.0")
    # The method order is the run's, not the alphabet's.
    reverse = report.markdown_table(summary, ["patchcore+", "patchcore"])
    assert "Δ image_auroc vs patchcore+" in reverse and "-0.6" in reverse


def test_rounded_metrics_for_pages():
    out = report.rounded_metrics({"image_auroc": 98.75406283856988, "pixel_note": "x", "n": 3})
    assert out == {"image_auroc": 98.8, "pixel_note": "x", "n": 3}


def test_readme_timing_note_matches_the_flagfile_seeds():
    readme = (REPO / "README.md").read_text()
    flagfile = (REPO / "protorefine_jax/cli/flags/mpdd_2shot.flags").read_text()
    seeds = re.search(r"^--seeds=(.*)$", flagfile, re.MULTILINE).group(1).split(",")
    assert "run above with 3 seeds" not in readme
    m = re.search(r"(\d) of the flagfile's (\d) seeds", readme)
    assert m and int(m.group(2)) == len(seeds) == 5


def test_fit_settings_know_verbose():
    assert "verbose" in {f.name for f in dataclasses.fields(deploy.FitSettings)}
