r"""The reproduction study behind RESULTS.md: does refinement help, when, and why.

One command regenerates every table and figure of RESULTS.md:

  python -m experiments.research.study --data_root=../shared/data

Stages (each resumable; nothing is recomputed that is already stored):
  1. features: patch features of every support image any seed draws and of
     every test image, per dataset x backbone x aggregation, cached as .npz
     under --cache_dir (outside the repository; the images are licensed).
  2. cells: one "cell" = metrics of one (dataset, features, shots, seed,
     method config). Stored in --cells (JSON, committed) under a key that
     holds the full resolved config, so a changed default recomputes.
  3. report: RESULTS.md from experiments/research/results_template.md plus the tables
     and figures (PNG, --figures_dir) computed from the cells.

`--report_only` redoes stage 3 from the committed cells, in seconds.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # as a program only: before numpy loads OpenBLAS (experiments/__init__)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json
import platform
import time
from pathlib import Path

import jax
from absl import app, flags

from experiments.research import study_cells, study_report

_DATA_ROOT = flags.DEFINE_string("data_root", "../shared/data", "Folder with mpdd/ and mvtec/.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", "runs/study_cache", "Feature cache (not committed).")
_CELLS = flags.DEFINE_string("cells", "results/study_cells.json", "Stored cell results.")
_FIGURES = flags.DEFINE_string("figures_dir", "results", "Where the PNG figures go.")
_OUT = flags.DEFINE_string("out", "RESULTS.md", "The report.")
_PARTS = flags.DEFINE_list("parts", list(study_cells.PARTS), "Which experiments to run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Support seeds.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rebuild RESULTS.md from --cells.")
_QUICK = flags.DEFINE_bool(
    "quick", False, "Tiny smoke configuration (1 seed, 1 shot, 8 test images per category)."
)


def main(argv: list[str]) -> None:
    """Runs the requested stages."""
    del argv
    cells_path = Path(_CELLS.value)
    store = study_cells.CellStore(cells_path)
    seeds = tuple(int(s) for s in _SEEDS.value)
    if not _REPORT_ONLY.value:
        plan = study_cells.plan(tuple(_PARTS.value), seeds, quick=_QUICK.value)
        cache = study_cells.FeatureCache(Path(_DATA_ROOT.value), Path(_CACHE_DIR.value), seeds)
        start = time.time()
        study_cells.run_plan(plan, cache, store, tuple(_PARTS.value), quick=_QUICK.value)
        store.meta["last_run"] = {
            "seconds": round(time.time() - start, 1),
            "machine": f"{platform.machine()}, {platform.platform()}",
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
        }
        store.save()
    text = study_report.render(store, Path(_FIGURES.value), seeds)
    Path(_OUT.value).write_text(text)
    print(f"wrote {_OUT.value} ({len(store.cells)} cells) and figures in {_FIGURES.value}/")
    print(json.dumps(store.meta.get("last_run", {})))


if __name__ == "__main__":
    app.run(main)
