r"""Score a folder of images with a fitted model; write predictions and report.html.

  python -m experiments.predict --model=models/parts --images=incoming/ --out=runs/today
  python -m experiments.predict --model=models/parts --images='incoming/**/*.png' --out=runs/x

Writes `--out` (new or empty; `--overwrite` to replace): `predictions.csv`
and `predictions.jsonl` (file, image score, decision, the threshold used,
and the reason for images that could not be read), `overlays/*.png`
(image | anomaly map), `report.html` (open it in a browser; works offline)
and `summary.json`. Unreadable images are listed and skipped
(`--strict` makes them fatal). Each overlay carries a key: the colour bar in
the model's score units (blue: typical of the good images, red: at or above
the threshold) with the threshold and the image's score marked.

When `--images` is a folder with `good/` beside a folder per defect type
(MVTec layout, `--labels`), the folder names are the labels: `summary.csv`
(flagged rate per folder), `summary.json` (also AUROC and the wrong
decisions) and the report (two-colour histogram, a wrong-decisions filter)
say how the decisions fared. `--support_dir` shows the good images the model
was fitted on in the report.

The model's own settings are used. Settings given here (`--backbone`,
`--image_size`, `--lam`, ...) are checked against the model, and any
difference is an error naming it; `--weights` says where this machine keeps
the backbone weights (their SHA-256 must match). `--runtime=export` runs the
exported program alone (`fit --export`); `auto` does so when the detector
code cannot be imported. A WinCLIP model (`fit --method=winclip+`) needs
`--clip_dir`, the CLIP folder on this machine: its architecture and its
weights' SHA-256 must be those the model was fitted on (a path recorded in
the model is never opened); it runs through the package only.
"""

from __future__ import annotations

import sys

from absl import flags

from protorefine_jax.app import deploy, image_check, schema
from protorefine_jax.cli import common as cli
from protorefine_jax.data import imageio

# Own flag registry: fit, predict and eval define flags of the same names and
# may be imported together (tests, notebooks).
FLAGS = flags.FlagValues()
_define = cli.Definers(FLAGS, __name__)
_define_string, _define_bool, _define_integer = _define.string, _define.bool, _define.integer
_define_float, _define_enum = _define.float, _define.enum

_define_string("model", "", "Model directory written by experiments.fit. Required.")
_define_string("images", "", "Folder (searched recursively) or glob of images. Required.")
_define_string("out", "", "Output folder (new or empty). Required.")
_define_bool(
    "overwrite",
    False,
    "Allow a non-empty --out: the files of an earlier predict (predictions.*, report.html, "
    "summary.json, overlays/*.png) are removed first; other files are kept and listed.",
)
_define_integer("batch_size", 8, "Images per compiled batch.")
_define_enum(
    "runtime",
    "auto",
    ["auto", "library", "export"],
    "How to run the model: the package (library), the exported program alone (export), or "
    "auto (library when importable).",
)
_define_string("weights", None, "Backbone weights file on this machine (default: as fitted).")
_define_string(
    "clip_dir",
    None,
    "WinCLIP models: the CLIP folder on this machine the model was fitted on (required; its "
    "config and weights' SHA-256 are checked against the model).",
)
_define_bool("strict", False, "Fail on the first unreadable image instead of listing it.")
_define_float("threshold", None, "Decision threshold instead of the model's.")
_define_enum("overlays", "all", ["all", "anomalous", "none"], "Which overlay PNGs to write.")
_define_integer(
    "max_image_pixels",
    imageio.DEFAULT_MAX_IMAGE_PIXELS,
    "Largest image (width x height) decoded; larger files are refused before decoding.",
)
_define_bool("progress", True, "Show a progress bar.")
_define_bool(
    "calibrate_on_stream",
    False,
    "Opt-in (calibrated PatchCore+, library runtime): the score statistics also learn from the "
    "images scored so far, in file order, after 8 images; images above the normal-only "
    "threshold are not learnt from. Scores then depend on the images before them.",
)
_define_enum(
    "labels",
    "auto",
    ["auto", "on", "off"],
    "Labels from the folders: good/ is good, every folder beside it (one per defect type, the "
    "MVTec test layout; also <category>/test/good) defective. With labels: the flagged rate "
    "per folder, AUROC and the wrong decisions (summary.csv, summary.json, report.html). "
    "auto: when every image lies in such a folder; on: required (error otherwise); off: never.",
)
_define_string(
    "support_dir",
    None,
    "The folder of good images the model was fitted on: report.html shows them as thumbnails "
    "with their held-out scores (files matched by the names and SHA-256 in model.json). "
    "Without it, the report lists their names and scores.",
)
_define_string("method", None, "Checked against the model.")
_define_string("backbone", None, "Checked against the model.")
_define_string("aggregation", None, "Checked against the model.")
_define_string("image_size", None, "Checked against the model (256 or HEIGHTxWIDTH).")
_define_bool("verbose", False, "Also print JAX's start-up logs.")
_define.refine_flags(deploy.REFINE_FIELDS, prefix="Checked against the model. ")

# What --help lists first, in this order.
ESSENTIAL = ("model", "images", "out", "clip_dir", "threshold", "overlays", "runtime")
CHECKED = ("method", "backbone", "aggregation", "image_size", *deploy.REFINE_FIELDS)


def settings_from_flags() -> deploy.PredictSettings:
    """`PredictSettings` of the parsed flags."""
    names = [f.name for f in deploy.dataclasses.fields(deploy.PredictSettings)]
    values = {n: FLAGS[n].value for n in names if n != "requested"}
    requested = tuple((n, FLAGS[n].value) for n in CHECKED if FLAGS[n].value is not None)
    return deploy.PredictSettings(**values, requested=requested)


def check_images(s: deploy.PredictSettings) -> None:
    """Prints notes on the images' sizes against the model's (`image_check`).

    A model it cannot read is left to `deploy.predict`, which says what is wrong.
    """
    from protorefine_jax.io import model_dir

    root, files = deploy.list_images(s.images)
    try:
        meta = model_dir.read_manifest(s.model)["metadata"]
        size = deploy.parse_image_size(meta["image_size"])
        square = meta["detector"]["family"] == "winclip"
    except (*cli.INPUT_ERRORS, KeyError, TypeError):
        return
    if square:  # the CLIP model's input: no size to choose
        notes = image_check.check_square_input(files, image_check.image_hw(size)[0], root=root)
    else:
        notes = image_check.check_images(files, size, explicit=True, for_fit=False, root=root)
    image_check.show(notes)


def run(argv: list[str]) -> int:
    """Parses `argv` into this module's flags and predicts; returns the exit status."""
    status = cli.parse(FLAGS, argv, __doc__, ESSENTIAL)
    if status is not None:
        return status
    cli.quiet_jax_startup(FLAGS.verbose)

    def predict() -> None:
        s = settings_from_flags()
        if not (s.model and s.images and s.out):
            raise ValueError("--model, --images and --out are required.")
        schema.check_flags({"max_image_pixels": FLAGS.max_image_pixels})
        imageio.set_max_image_pixels(FLAGS.max_image_pixels)
        if FLAGS.image_size is not None:  # checked against the model; a bad one names the fix
            image_check.check_multiple(deploy.parse_image_size(FLAGS.image_size))
        check_images(s)
        deploy.predict(s)

    return cli.report_errors(predict)


if __name__ == "__main__":
    sys.exit(run(sys.argv))
