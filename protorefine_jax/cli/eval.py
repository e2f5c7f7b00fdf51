r"""Few-shot evaluation: datasets x categories x shots x seeds x methods.

Run from the repository root, e.g.

  python -m experiments.eval --flagfile=demo.flags
  python -m experiments.eval --flagfile=mpdd_2shot.flags \
      --data_dir=../shared/data/mpdd --workdir=runs/mpdd2

A bare flagfile name that is not a file in the working directory is looked up
in `protorefine_jax/cli/flags/` (where the per-dataset, per-shots files live).

Writes into `--workdir` (which must not exist yet, or be empty; `--overwrite`
replaces the files below of an earlier run, keeps any other file and names it):
  results.json        rows (one per dataset, category, method, shots, seed),
                      summary (mean and std over seeds), config, timing
  results.md          the summary as a markdown table (also printed)
  config.json         the resolved configuration
  scores.jsonl        per-image scores, one line per row
  heatmaps/*.png      overlays of anomaly maps on a few test images
  reports/*.html      one page per category and method (first shot count and seed)

Bad data is refused before the backbone is built and any feature is
extracted, and a refused run leaves no file behind: an unwritable workdir, a
bad category, too few good images, a test set with only good or only
defective images (image AUROC needs both), and with `--require_masks` a
missing or all-zero mask. Without `--require_masks` a defective image whose
mask has no defect pixel counts as defective for the image metrics and is
left out of the pixel metrics, with a warning naming the mask (results rows:
`empty_masks`, `pixel_note`). An unreadable image (permissions) is an error
naming the file. A run that fails after some results keeps them:
`results.json` has `"complete": false` and the `"error"`.

Every flag is a field of `protorefine_jax.app.runner.Settings` (same name, same
default); `main` is a thin wrapper around the importable `runner.run`.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # as a program only: before numpy loads OpenBLAS (cli/__init__)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import dataclasses
import sys
from pathlib import Path

from absl import app, flags

from protorefine_jax import RefineConfig
from protorefine_jax.app import batching, runner
from protorefine_jax.app.deploy import parse_image_size
from protorefine_jax.cli import common as cli
from protorefine_jax.data import imageio
from protorefine_jax.detectors import patchcore

FLAGS_DIR = Path(__file__).resolve().parent / "flags"

HELP = {
    "dataset": "mvtec | mpdd | visa | folder (any MVTec-layout folder) | synthetic (the demo).",
    "data_dir": "Dataset root (holds <category>/train/good, or VisA's split_csv).",
    "data_source": "folder (read the image files) | tfds (prepared TFDS array_record files).",
    "tfds_dir": "--data_source=tfds: folder of the prepared files (prepared there if missing).",
    "require_masks": "Refuse defective test images without a mask, or whose mask has no "
    "defect pixel (default: image metrics for them; pixel metrics over the images with "
    "non-empty masks, null without any; a warning names all-zero masks).",
    "workdir": "Output folder; must be new or empty. Default: runs/<timestamp>.",
    "overwrite": "Allow a non-empty workdir: the files of an earlier run (results.*, "
    "config.json, scores.jsonl, heatmaps/*.png, reports/*.html) are removed once the data "
    "passed its checks; other files are kept and listed.",
    "categories": "Categories; empty = all found in data_dir.",
    "shots": "Support images per category.",
    "seeds": "Support-sampling seeds.",
    "methods": "Methods (app/methods.py: patchcore, patchcore+, winclip, winclip+, ...).",
    "backbone": "PatchCore backbone: efficientnet_lite0 | efficientnet_lite2 | wide_resnet50_2.",
    "aggregation": "PatchCore aggregation: official | simple (default per backbone: "
    + ", ".join(f"{k} {v}" for k, v in patchcore.AGGREGATION.items())
    + "; detectors/patchcore.py).",
    "pretrain_dim": "Official aggregation: per-stage pooled size (default per backbone).",
    "target_dim": "Official aggregation: output size (default per backbone).",
    "weights": "Backbone weights file ('' = shipped Lite weights; 'random' = random init).",
    "clip_dir": "Local Hugging Face CLIP folder (WinCLIP methods; see README).",
    "image_size": f"Input size: one side in pixels (default {patchcore.IMAGE_SIZE} PatchCore; "
    "WinCLIP: the CLIP model's) or HEIGHTxWIDTH (PatchCore; multiples of 16, e.g. 224x544) so "
    "elongated parts keep their aspect ratio.",
    "alpha": f"Coreset ratio (default {patchcore.ALPHA} PatchCore; WinCLIP per dataset, "
    "clip/winclip.py CORESET_ALPHA).",
    "lam": f"OT weight lambda (default {RefineConfig.lam} PatchCore+; WinCLIP+: winclip_config's).",
    "online_capacity": "Online variant: ring-buffer rows.",
    "online_add": "Online variant: prototypes added per query.",
    "batch_size": "Images per compiled batch.",
    "devices": "Local devices each batch is split over (data parallel: parameters and banks "
    "replicated; 0 = all). On CPU, N > 1 runs N XLA host devices, which keeps N cores busy "
    f"(set before JAX starts: {batching.HOST_DEVICES_FLAG}=N is added to XLA_FLAGS); "
    "--batch_size must be a multiple of N. The online variant runs on one device.",
    "num_heatmaps": "Overlay PNGs per category and method (defective images, plus one good).",
    "synthetic_categories": "Synthetic dataset categories (fabric, grain, tiles).",
    "synthetic_counts": "Synthetic train-good, test-good, test-defect image counts.",
    "progress": "Show a progress bar.",
}
# What --help lists first, in this order.
ESSENTIAL = (
    "flagfile",
    "dataset",
    "data_dir",
    "workdir",
    "methods",
    "categories",
    "shots",
    "seeds",
    "image_size",
)


_MAX_IMAGE_PIXELS = flags.DEFINE_integer(
    "max_image_pixels",
    imageio.DEFAULT_MAX_IMAGE_PIXELS,
    "Largest image / mask (width x height) decoded; larger files are refused before "
    "decoding (a small file can decode to gigabytes). Raise it for genuine large images.",
)


def _define(field: dataclasses.Field) -> None:
    """One absl flag for a `Settings` field, typed by its annotation."""
    kind, default, helptext = str(field.type), field.default, HELP[field.name]
    if field.name == "image_size":  # "256" or "224x544"
        flags.DEFINE_string(field.name, default, helptext)
    elif kind.startswith("tuple"):
        flags.DEFINE_list(field.name, [str(v) for v in default], helptext)
    elif kind.startswith("bool"):
        flags.DEFINE_bool(field.name, default, helptext)
    elif kind.startswith("int"):
        flags.DEFINE_integer(field.name, default, helptext)
    elif kind.startswith("float"):
        flags.DEFINE_float(field.name, default, helptext)
    else:
        flags.DEFINE_string(field.name, default, helptext)


# Every `Settings` field is a flag. The refinement fields besides `lam` (whose
# default is the method's) are typed and documented by `RefineConfig`, as in
# fit and predict; the others by their annotation and `HELP`.
for _field in dataclasses.fields(runner.Settings):
    if _field.name not in runner.REFINE_FIELDS:
        _define(_field)
cli.Definers(flags.FLAGS, __name__).refine_flags(runner.REFINE_FIELDS)


def settings_from_flags() -> runner.Settings:
    """The resolved `Settings` of the parsed flags."""
    values = {}
    for field in dataclasses.fields(runner.Settings):
        value = flags.FLAGS[field.name].value
        if field.name == "image_size":
            value = None if value is None else parse_image_size(value)
        elif str(field.type).startswith("tuple[int"):
            value = tuple(int(v) for v in value)
        elif str(field.type).startswith("tuple"):
            value = tuple(value)
        values[field.name] = value
    return runner.Settings(**values)


def resolve_flagfiles(argv: list[str]) -> list[str]:
    """Rewrites `--flagfile=NAME` to `protorefine_jax/cli/flags/NAME` when only that exists."""
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

    cli.quiet_jax_startup(flags.FLAGS["verbosity"].present)  # JAX's "no TPU" line, unless asked

    def evaluate() -> None:
        imageio.set_max_image_pixels(_MAX_IMAGE_PIXELS.value)
        settings = settings_from_flags()
        cli.request_host_devices(settings.devices)  # before anything starts JAX
        runner.run(settings)

    status = cli.report_errors(evaluate)  # bad input: one error line, no traceback
    if status:
        sys.exit(status)


def run(argv: list[str]) -> None:
    """The command line: `--help` (exit 0) or the evaluation (exit 2 on bad input)."""
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):  # help is no error: exit 0
        full = "--helpfull" in argv
        flagfile = {"flagfile": "File of flags, one per line (a bare name: the shipped flagfiles)."}
        print(cli.help_text(flags.FLAGS, __doc__, ESSENTIAL, full=full, special=flagfile))
        sys.exit(0)
    app.run(main, argv=resolve_flagfiles(argv))


if __name__ == "__main__":
    run(sys.argv)
