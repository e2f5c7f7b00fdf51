r"""Few-shot evaluation: datasets x categories x shots x seeds x methods.

Run from the repository root, e.g.

  python -m experiments.eval --flagfile=demo.flags
  python -m experiments.eval --flagfile=mpdd_2shot.flags \
      --data_dir=../shared/data/mpdd --workdir=runs/mpdd2

A bare flagfile name that is not a file in the working directory is looked up
in `experiments/flags/` (where the per-dataset, per-shots files live).

Writes into `--workdir` (which must not exist yet, or be empty):
  results.json        rows (one per dataset, category, method, shots, seed),
                      summary (mean and std over seeds), config, timing
  results.md          the summary as a markdown table (also printed)
  config.json         the resolved configuration
  scores.jsonl        per-image scores, one line per row
  heatmaps/*.png      overlays of anomaly maps on a few test images
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags

from experiments import runner

FLAGS_DIR = Path(__file__).resolve().parent / "flags"

_DATASET = flags.DEFINE_enum(
    "dataset", "mvtec", ["mvtec", "mpdd", "visa", "folder", "synthetic"], "Dataset kind."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Dataset root (holds <category>/train/good, or VisA's split_csv)."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder; must be new or empty. Default: runs/<timestamp>."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Allow writing into a non-empty workdir.")
_CATEGORIES = flags.DEFINE_list("categories", [], "Categories; empty = all found in data_dir.")
_SHOTS = flags.DEFINE_list("shots", ["1", "2", "4"], "Support images per category.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Support-sampling seeds.")
_METHODS = flags.DEFINE_list(
    "methods", ["patchcore", "patchcore+"], "Methods (see experiments/methods.py)."
)
_BACKBONE = flags.DEFINE_string("backbone", "efficientnet_lite0", "PatchCore backbone.")
_AGGREGATION = flags.DEFINE_enum(
    "aggregation", "official", ["official", "simple"], "PatchCore feature aggregation."
)
_PRETRAIN_DIM = flags.DEFINE_integer("pretrain_dim", None, "Official aggregation stage dim.")
_TARGET_DIM = flags.DEFINE_integer("target_dim", None, "Official aggregation output dim.")
_WEIGHTS = flags.DEFINE_string(
    "weights", "", "Backbone weights file ('' = shipped Lite weights; 'random' = random init)."
)
_CLIP_DIR = flags.DEFINE_string("clip_dir", None, "Local HF CLIP folder (WinCLIP methods).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Input side (default 256 CNN, 240 CLIP).")
_ALPHA = flags.DEFINE_float("alpha", None, "Coreset ratio (default: per host and dataset).")
_LAM = flags.DEFINE_float("lam", None, "OT weight lambda (default 0.3 PatchCore+, 0.1 WinCLIP+).")
_EPSILON = flags.DEFINE_float("epsilon", 0.05, "Sinkhorn epsilon relative to the mean cost.")
_RIDGE = flags.DEFINE_float("ridge", 1e-2, "Gram ridge relative to trace(G)/n.")
_LR = flags.DEFINE_float("lr", 1.0, "Relative optax step size.")
_NUM_ITERS = flags.DEFINE_integer("num_iters", 10, "EM iterations N.")
_SINKHORN_ITERS = flags.DEFINE_integer("sinkhorn_iters", 30, "Sinkhorn iterations per E-step.")
_WARM_START = flags.DEFINE_bool("warm_start", True, "Warm-start Sinkhorn across EM steps.")
_M_STEP = flags.DEFINE_enum("m_step", "closed_form", ["closed_form", "optax"], "M-step.")
_OPTIMIZER = flags.DEFINE_enum(
    "optimizer", "preconditioned", ["sgd", "preconditioned"], "Optax M-step optimizer."
)
_INNER_STEPS = flags.DEFINE_integer("inner_steps", 10, "Optax steps per M-step.")
_BANK = flags.DEFINE_enum("bank", "refined", ["refined", "union"], "Scoring bank.")
_PRECISION = flags.DEFINE_enum(
    "precision", "float32", ["float32", "tf32", "bfloat16"], "Feature-product precision."
)
_ONLINE_CAPACITY = flags.DEFINE_integer("online_capacity", 256, "Online ring-buffer rows.")
_ONLINE_ADD = flags.DEFINE_integer("online_add", 16, "Online prototypes added per query.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per compiled batch.")
_NUM_HEATMAPS = flags.DEFINE_integer("num_heatmaps", 4, "Overlay PNGs per category and method.")
_SYNTH_CATEGORIES = flags.DEFINE_list(
    "synthetic_categories", ["fabric", "grain"], "Synthetic dataset categories."
)
_SYNTH_COUNTS = flags.DEFINE_list(
    "synthetic_counts", ["10", "10", "10"], "Synthetic train-good, test-good, test-defect counts."
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def settings_from_flags() -> runner.Settings:
    """The resolved `Settings` of the parsed flags."""
    return runner.Settings(
        dataset=_DATASET.value,
        data_dir=_DATA_DIR.value,
        workdir=_WORKDIR.value,
        overwrite=_OVERWRITE.value,
        categories=tuple(_CATEGORIES.value),
        shots=tuple(int(s) for s in _SHOTS.value),
        seeds=tuple(int(s) for s in _SEEDS.value),
        methods=tuple(_METHODS.value),
        backbone=_BACKBONE.value,
        aggregation=_AGGREGATION.value,
        pretrain_dim=_PRETRAIN_DIM.value,
        target_dim=_TARGET_DIM.value,
        weights=_WEIGHTS.value,
        clip_dir=_CLIP_DIR.value,
        image_size=_IMAGE_SIZE.value,
        alpha=_ALPHA.value,
        lam=_LAM.value,
        epsilon=_EPSILON.value,
        ridge=_RIDGE.value,
        lr=_LR.value,
        num_iters=_NUM_ITERS.value,
        sinkhorn_iters=_SINKHORN_ITERS.value,
        warm_start=_WARM_START.value,
        m_step=_M_STEP.value,
        optimizer=_OPTIMIZER.value,
        inner_steps=_INNER_STEPS.value,
        bank=_BANK.value,
        precision=_PRECISION.value,
        online_capacity=_ONLINE_CAPACITY.value,
        online_add=_ONLINE_ADD.value,
        batch_size=_BATCH_SIZE.value,
        num_heatmaps=_NUM_HEATMAPS.value,
        synthetic_categories=tuple(_SYNTH_CATEGORIES.value),
        synthetic_counts=tuple(int(c) for c in _SYNTH_COUNTS.value),
        progress=_PROGRESS.value,
    )


def resolve_flagfiles(argv: list[str]) -> list[str]:
    """Rewrites `--flagfile=NAME` to `experiments/flags/NAME` when only that exists."""
    out = []
    for arg in argv:
        if arg.startswith("--flagfile="):
            name = arg.split("=", 1)[1]
            if not os.path.exists(name) and (FLAGS_DIR / name).is_file():
                arg = f"--flagfile={FLAGS_DIR / name}"
        out.append(arg)
    return out


def main(argv: list[str]) -> None:
    """Parses flags and runs the evaluation."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        runner.run(settings_from_flags())
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        # Bad input gets its message, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, argv=resolve_flagfiles(sys.argv))
