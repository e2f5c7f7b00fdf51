r"""Fit a detector on a folder of good images and write a model directory.

  python -m experiments.fit --support_dir=parts/good --out=models/parts
  python -m experiments.fit --support_dir=parts/good --out=models/parts --shots=2 \
      --calibration_dir=parts/val --export

Writes `--out` (new or empty; `--overwrite` to replace): `model.json` (the
resolved configuration, backbone and weights SHA-256, image size, package
version, support files, the decision threshold and how it was derived),
`state.safetensors` (every array of the detector's state) and, with
`--export`, `detector.jaxexport` (the compiled detector, bank baked in).

An image far above the others when scored against them (three or more good
images; `threshold.outlying`) is named and left out of the threshold; with
`--drop_outliers` it is left out of the model too (bank, calibration and
threshold fitted on the other images). Not the default: on dev fits where a
genuine good image was named, dropping it cost 8-10 AUROC points on 2 of 3
(RESULTS.md, "Calibration that sees new parts").

WinCLIP / WinCLIP+ (`--method=winclip+ --clip_dir=<Hugging Face CLIP folder>
--object_name=<what the parts are>`): the CLIP model's square input; its
architecture and its weights' SHA-256 go into `model.json` (predict takes
`--clip_dir` again and refuses another model, naming the difference). The
normal-only threshold is of each good image scored by a model of the others
(leave-one-out: at least 2 images), the per-scale calibration of WinCLIP+
from the support images as PatchCore+'s. `--views`, `--backbone`,
`--weights` and `--export` are the PatchCore family's.

The threshold: with only good images, each good image's held-out score in
the model's own units (its quadrants against a bank without them, also for
nuisance views of it: `protorefine_jax.calibration.support_image_scores`), an image
far above the others named and left out (`threshold.outlying`), and the
split-conformal order statistic for `--false_alarm_rate`
(`protorefine_jax.threshold`); with `--calibration_dir` (MVTec test layout:
good/ and defect folders), the F1-optimal threshold on those images instead.
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

_define_string("support_dir", "", "Folder (searched recursively) or glob of good images. Required.")
_define_string("out", "", "Model directory to write (new or empty). Required.")
_define_bool(
    "overwrite",
    False,
    "Allow a non-empty --out: the files of an earlier fit (model.json, state.safetensors, "
    "detector.jaxexport) are replaced; other files are kept and listed.",
)
_define_enum(
    "method",
    "patchcore+",
    sorted(deploy.FIT_METHODS),
    "Detector: patchcore+ (refined) or patchcore; winclip+ or winclip on a CLIP model "
    "(--clip_dir).",
)
_define_string(
    "clip_dir",
    "",
    "WinCLIP methods: a local Hugging Face CLIP folder (config.json, model.safetensors, "
    "vocab.json, merges.txt). Required for winclip / winclip+; nothing is downloaded.",
)
_define_string(
    "object_name",
    "object",
    "WinCLIP methods: what the parts are, in the text prompts ('a photo of a flawless "
    "<object_name>', ...), e.g. ball_screw or 'metal nut'.",
)
_define_enum(
    "backbone",
    "efficientnet_lite0",
    ["efficientnet_lite0", "efficientnet_lite2", "wide_resnet50_2"],
    "Feature backbone (wide_resnet50_2 needs --weights).",
)
_define_enum(
    "aggregation", None, ["official", "simple"], "Feature aggregation (default per backbone)."
)
_define_string("weights", "", "Backbone weights file ('' = shipped Lite weights; 'random').")
_define_string(
    "image_size",
    "256",
    "Input size, HEIGHTxWIDTH (multiples of 16, e.g. 224x544) or one side; fit suggests one "
    "that keeps the shape of non-square images. WinCLIP: the CLIP model's (square) size.",
)
_define_float("alpha", None, "Coreset ratio (default 0.05).")
_define_integer("shots", 0, "Support images to draw (seeded); 0 = every image given.")
_define_integer("seed", 0, "Seed of the --shots draw.")
_define_float(
    "false_alarm_rate",
    0.05,
    "Share of good parts the threshold may flag (reachable with at least 1/rate - 1 good images).",
)
_define_float("margin", 0.0, "Relative margin added to the normal-only threshold.")
_define_integer(
    "views",
    4,
    "Nuisance views of each good image (small shift, rotation, light change) scored in the "
    "calibration and threshold hold-outs; 0: the good images' quadrants only.",
)
_define_integer(
    "pseudo_anomalies",
    16,
    "PatchCore+: copies of (up to 8) good images with one pasted defect each; fit drops the "
    "refined half if PatchCore alone tells them from normal variation significantly better. "
    "0: no check, both halves fused.",
)
_define_string(
    "calibration_dir",
    None,
    "Labelled images (good/ + defect folders): use the F1-optimal threshold on them.",
)
_define_bool(
    "drop_outliers",
    False,
    "Leave a good image that fit names as unlike the others out of the model (bank, calibration "
    "and threshold); default: named and left out of the threshold only.",
)
_define_bool("export", False, "Also write the jax.export artifact (detector.jaxexport).")
_define_integer("batch_size", 8, "Images per compiled batch.")
_define_integer(
    "max_image_pixels",
    imageio.DEFAULT_MAX_IMAGE_PIXELS,
    "Largest image (width x height) decoded; larger files are refused before decoding.",
)
_define_bool("progress", True, "Log progress.")
_define_bool("verbose", False, "Also print diagnostics (memory bank size and ranks) and JAX logs.")
_define.refine_flags(deploy.REFINE_FIELDS)

# What --help lists first, in this order.
ESSENTIAL = (
    "support_dir",
    "out",
    "method",
    "image_size",
    "backbone",
    "clip_dir",
    "shots",
    "false_alarm_rate",
)


def settings_from_flags() -> deploy.FitSettings:
    """`FitSettings` of the parsed flags."""
    names = [f.name for f in deploy.dataclasses.fields(deploy.FitSettings) if f.name != "refine"]
    refine = tuple((n, FLAGS[n].value) for n in deploy.REFINE_FIELDS if FLAGS[n].value is not None)
    values = {n: FLAGS[n].value for n in names}
    if values["method"] in deploy.WINCLIP_METHODS and not FLAGS["image_size"].present:
        values["image_size"] = None  # the CLIP model's input size
    else:
        values["image_size"] = deploy.parse_image_size(values["image_size"])
    if values["method"] in deploy.METHODS:
        image_check.check_multiple(values["image_size"])  # names the nearest valid size
    return deploy.FitSettings(**values, refine=refine)


def run(argv: list[str]) -> int:
    """Parses `argv` into this module's flags and fits; returns the exit status."""
    status = cli.parse(FLAGS, argv, __doc__, ESSENTIAL)
    if status is not None:
        return status
    cli.quiet_jax_startup(FLAGS.verbose)

    def fit() -> None:
        schema.check_flags({"max_image_pixels": FLAGS.max_image_pixels})
        imageio.set_max_image_pixels(FLAGS.max_image_pixels)
        settings = settings_from_flags()
        # Flags first (their ranges), then the images: their sizes against --image_size.
        schema.check_flags({**deploy.dataclasses.asdict(settings), **dict(settings.refine)})
        settings = deploy.resolve_settings(settings)  # WinCLIP: --clip_dir and its size
        if settings.support_dir:
            root, files = deploy.list_images(settings.support_dir)
            if settings.method in deploy.WINCLIP_METHODS:
                notes = image_check.check_square_input(files, settings.image_size, root=root)
            else:
                explicit = FLAGS["image_size"].present
                notes = image_check.check_images(
                    files, settings.image_size, explicit=explicit, for_fit=True, root=root
                )
            image_check.show(notes)
        deploy.fit_model(settings)

    return cli.report_errors(fit)


if __name__ == "__main__":
    sys.exit(run(sys.argv))
