"""The study script: report rendering from stored cells; a quick real-data run (slow)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from experiments.research import study_cells as sc
from experiments.research import study_report

REPO = Path(__file__).resolve().parents[1]


def fake_store(tmp_path, seeds):
    store = sc.CellStore(tmp_path / "cells.json")
    for i, cell in enumerate(sc.plan(sc.PARTS, seeds)):
        store.cells[cell.key()] = {
            **{m: 50.0 + (i % 7) for m in study_report.METRICS},
            "marginal_error_max": 1e-3,
            "marginal_error_median": 1e-4,
            "seconds": 9.7,
        }
    store.meta["optax"] = {"steps": [1, 10], "queries": 8, "sgd ridge=0.0001": [0.5, 0.1]}
    return store


def test_report_fills_every_placeholder(tmp_path):
    store = fake_store(tmp_path, (0, 1))
    text = study_report.render(store, tmp_path / "fig", (0, 1))
    assert not re.search(r"\{\{\w+\}\}", text)
    assert "(SPEC 90.5)" in text  # SPEC 8 reference beside ours
    assert (tmp_path / "fig" / "sweeps.png").is_file()
    assert (tmp_path / "fig" / "shots.png").is_file()


def test_cell_keys_track_the_full_config():
    a = sc.Cell("main", "bottle", "lite0-simple", 1, 0, "x", sc.full_config({"lam": 0.3}))
    b = sc.Cell("sweeps", "bottle", "lite0-simple", 1, 0, "y", sc.full_config({}))
    c = sc.Cell("main", "bottle", "lite0-simple", 1, 0, "x", sc.full_config({"lam": 0.4}))
    assert a.key() == b.key()  # same computation, other label: shared
    assert a.key() != c.key()


def test_cell_keys_hold_the_ridge_in_force():
    def key(feat, shots, online=False, **fields):
        cfg = sc.full_config(fields)
        return sc.Cell("main", "bottle", feat, shots, 0, "x", cfg, online=online).key()

    # lite0-simple (c=152): n = 51 at 1 shot, 204 at 4 shots.
    assert key("lite0-simple", 1) == key("lite0-simple", 1, ridge_wide=0.5)
    assert key("lite0-simple", 4) == key("lite0-simple", 4, ridge=0.5)
    assert key("lite0-simple", 4) == key("lite0-simple", 4, ridge=0.1, ridge_wide=0.1)
    assert key("lite0-simple", 4) != key("lite0-simple", 4, ridge_wide=0.5)
    # An online bank that fills past c=152 depends on both.
    assert key("lite0-simple", 1, True) != key("lite0-simple", 1, True, ridge_wide=0.5)
    assert key("lite0-official", 1, True) == key("lite0-official", 1, True, ridge_wide=0.5)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
def test_quick_study_runs_end_to_end(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "experiments.research.study",
        "--quick",
        "--seeds=0",
        f"--data_root={SHARED_DATA}",
        f"--cache_dir={tmp_path / 'cache'}",
        f"--cells={tmp_path / 'cells.json'}",
        f"--figures_dir={tmp_path / 'fig'}",
        f"--out={tmp_path / 'RESULTS.md'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## 1. Reproducing SPEC section 8" in (tmp_path / "RESULTS.md").read_text()
