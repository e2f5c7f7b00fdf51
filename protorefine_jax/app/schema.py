"""Bounds of every setting, shared by the CLI flags of fit / predict and `model.json`.

One table (`FLAGS`) says the type and the range of each numeric or named
setting; the flags are checked against it (`check_flags`) and so is the
`metadata` of a model directory, written by fit and read by predict
(`METADATA`, `check_metadata`): a tampered `model.json` cannot claim an
image size, an iteration count or a threshold that the flags would refuse,
nor smuggle in an unknown key, a non-finite number or a control character.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Mapping
from typing import Any

from protorefine_jax import config as config_lib


class Field:
    """A checker: `check(value, where)` raises ValueError naming `where` and the range."""

    expected = "a value"

    def ok(self, value: Any) -> bool:
        """Whether `value` is in range (leaf fields)."""
        raise NotImplementedError

    def check(self, value: Any, where: str) -> None:
        """Raises ValueError naming `where`, the range and the value unless it is in range."""
        if not self.ok(value):
            raise ValueError(f"{where} must be {self.expected}, got {_show(value)}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__} ({text[:40]}...)"


class Int(Field):
    """An integer (not a bool) in `[lo, hi]`."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi
        self.expected = f"an integer in [{lo}, {hi}]"

    def ok(self, value):
        """See `Field.ok`."""
        return (
            isinstance(value, int) and not isinstance(value, bool) and self.lo <= value <= self.hi
        )


class Float(Field):
    """A finite number in `[lo, hi]`."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi
        self.expected = f"a finite number in [{lo:g}, {hi:g}]"

    def ok(self, value):
        """See `Field.ok`."""
        return (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and self.lo <= value <= self.hi
        )


class Bool(Field):
    """true or false."""

    expected = "true or false"

    def ok(self, value):
        """See `Field.ok`."""
        return isinstance(value, bool)


class Text(Field):
    """A string: valid UTF-8, no control characters, bounded length; a choice or a regex."""

    def __init__(self, choices=None, pattern: str | None = None, max_len: int = 4096):
        self.choices = tuple(choices) if choices is not None else None
        self.pattern = re.compile(pattern) if pattern else None
        self.max_len = max_len
        self.expected = (
            f"one of {list(self.choices)}"
            if self.choices
            else f"text of at most {max_len} characters without control characters"
            + (f" matching {pattern}" if pattern else "")
        )

    def ok(self, value):
        """See `Field.ok`."""
        if not isinstance(value, str) or len(value) > self.max_len:
            return False
        if self.choices is not None:
            return value in self.choices
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate
            return False
        if re.search(r"[\x00-\x1f\x7f]", value):
            return False
        return self.pattern is None or bool(self.pattern.fullmatch(value))


class Optional(Field):
    """null, or a value of `field`."""

    def __init__(self, field: Field):
        self.field = field
        self.expected = f"null or {field.expected}"

    def check(self, value, where):
        """See `Field.check`."""
        if value is not None:
            self.field.check(value, where)


class AnyOf(Field):
    """A value of one of `fields`."""

    def __init__(self, *fields: Field):
        self.fields = fields
        self.expected = " or ".join(f.expected for f in fields)

    def check(self, value, where):
        """See `Field.check`."""
        for field in self.fields:
            try:
                field.check(value, where)
                return
            except ValueError:
                pass
        raise ValueError(f"{where} must be {self.expected}, got {_show(value)}")


class List(Field):
    """A list of `item`s: exactly `length`, or at most `max_len`."""

    def __init__(self, item: Field, length: int | None = None, max_len: int = 1_000_000):
        self.item, self.length, self.max_len = item, length, max_len
        self.expected = f"a list of {length if length else f'at most {max_len}'} items"

    def check(self, value, where):
        """See `Field.check`."""
        if not isinstance(value, list) or len(value) > self.max_len:
            raise ValueError(f"{where} must be {self.expected}, got {_show(value)}")
        if self.length is not None and len(value) != self.length:
            raise ValueError(f"{where} must be {self.expected}, got {_show(value)}")
        for i, v in enumerate(value):
            self.item.check(v, f"{where}[{i}]")


class Dict(Field):
    """A JSON object with these keys (all required unless in `optional`), no others."""

    def __init__(self, fields: Mapping[str, Field], optional: tuple[str, ...] = ()):
        self.fields, self.optional = dict(fields), set(optional)
        self.expected = "an object"

    def check(self, value, where):
        """See `Field.check`."""
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be an object, got {_show(value)}")
        unknown = sorted(str(k) for k in set(value) - set(self.fields))
        if unknown:
            known = sorted(self.fields)
            raise ValueError(f"{where} has unknown keys {unknown[:5]}; known: {known}")
        for key, field in self.fields.items():
            if key in value:
                field.check(value[key], f"{where}.{key}")
            elif key not in self.optional:
                raise ValueError(f"{where} lacks {key!r}")


def _choices(alias) -> Text:
    return Text(choices=typing.get_args(alias))


IMAGE_SIDE = Int(16, 1024)
NAME = Text(pattern=r"[A-Za-z0-9_.+-]{1,64}")
SCORE = Float(-1e30, 1e30)
SHA256 = Text(pattern=r"[0-9a-f]{64}")

# Every setting a flag of fit / predict sets, with its one range.
FLAGS: dict[str, Field] = {
    "batch_size": Int(1, 1024),
    "views": Int(0, 64),
    "pseudo_anomalies": Int(0, 64),
    "shots": Int(0, 100_000),
    "seed": Int(0, 2**31 - 1),
    "max_image_pixels": Int(1, 1_000_000_000),
    "false_alarm_rate": Float(0.0, 1.0),
    "margin": Float(-1.0, 100.0),
    "alpha": Float(1e-6, 1.0),
    "threshold": SCORE,
    "lam": Float(0.0, 1e6),
    "epsilon": Float(1e-9, 1e6),
    "ridge": Float(0.0, 1e6),
    "ridge_wide": Float(0.0, 1e6),
    "lr": Float(0.0, 1e6),
    "num_iters": Int(1, 1000),
    "sinkhorn_iters": Int(1, 10_000),
    "inner_steps": Int(1, 1000),
    "warm_start": Bool(),
    "sinkhorn_mode": _choices(config_lib.SinkhornMode),
    "m_step": _choices(config_lib.MStep),
    "optimizer": _choices(config_lib.Optimizer),
    "bank": _choices(config_lib.BankMode),
    "precision": _choices(config_lib.Precision),
    "products": _choices(config_lib.Products),
    # WinCLIP's category text: the prompts say "a photo of a flawless <object_name>", ...
    "object_name": Text(pattern=r".{1,100}", max_len=100),
}


def check_flags(values: Mapping[str, Any]) -> None:
    """Checks the settings of `values` that `FLAGS` knows (None = unset) against their range.

    Raises:
      ValueError: `--name must be <range>, got <value>.` for the first bad one.
    """
    for name, value in values.items():
        if name in FLAGS and value is not None:
            FLAGS[name].check(value, f"--{name}")


def image_size_ok(hw) -> None:
    """Raises ValueError unless `(height, width)` are within `IMAGE_SIDE`."""
    List(IMAGE_SIDE, length=2).check(list(hw), "--image_size")


_THRESHOLD = Dict(
    {
        "value": SCORE,
        "kind": Text(choices=("normal_only", "f1")),
        "source": Text(choices=("held_out", "leave_one_out", "augmented_views", "calibration")),
        "num_scores": Int(0, 10_000_000),
        "rank": Optional(Int(0, 10_000_000)),
        "margin": FLAGS["margin"],
        "target_false_alarm_rate": Optional(FLAGS["false_alarm_rate"]),
        "false_alarm_bound": Optional(Float(0.0, 1.0)),
        "guaranteed": Bool(),
        "f1": Optional(Float(0.0, 1.0)),
    },
    optional=("rank", "margin", "target_false_alarm_rate", "false_alarm_bound", "guaranteed", "f1"),
)
# The refinement settings fit, predict and eval take as flags (one list for all three).
REFINE_FLAGS = (
    "lam",
    "epsilon",
    "ridge",
    "ridge_wide",
    "lr",
    "num_iters",
    "sinkhorn_iters",
    "sinkhorn_mode",
    "warm_start",
    "m_step",
    "optimizer",
    "inner_steps",
    "bank",
    "precision",
    "products",
)
_REFINE = {name: FLAGS[name] for name in REFINE_FLAGS}
CONFIG = Dict(
    {
        **_REFINE,
        "distance": _choices(config_lib.Distance),
        "use_transport": Bool(),
        "use_refinement": Bool(),
        "calibrated": Bool(),
        "grid_shape": Optional(List(Int(1, 1024), length=2)),
        "image_size": Optional(List(IMAGE_SIDE, length=2)),
        "blur_sigma": Float(0.0, 64.0),
    },
    # Models fitted before the field existed ran the Gram form below 2c rows, as "auto" does.
    optional=("products",),
)
_FILES = List(Text(), max_len=100_000)
_WIDTH = Int(1, 65_536)
_RGB = List(Float(-10.0, 10.0), length=3)
# The CLIP folder a WinCLIP model was fitted on: its architecture (`ClipSpec`, the fields
# of config.json and preprocessor_config.json used), its weights' SHA-256 and the scoring
# settings outside `RefineConfig` (`WinClipConfig`).
CLIP = Dict(
    {
        "dir": Text(),
        "spec": Dict(
            {
                "image_size": IMAGE_SIDE,
                "patch_size": Int(1, 1024),
                "vision_width": _WIDTH,
                "vision_layers": Int(1, 1024),
                "vision_heads": Int(1, 1024),
                "vision_mlp": _WIDTH,
                "text_width": _WIDTH,
                "text_layers": Int(1, 1024),
                "text_heads": Int(1, 1024),
                "text_mlp": _WIDTH,
                "context_length": Int(1, 65_536),
                "vocab_size": Int(1, 10_000_000),
                "embed_dim": _WIDTH,
                "hidden_act": Text(choices=("gelu", "quick_gelu")),
                "layer_norm_eps": Float(0.0, 1.0),
                "image_mean": _RGB,
                "image_std": _RGB,
            }
        ),
        "weights_files": List(NAME, max_len=1000),
        "weights_sha256": SHA256,
        "object_name": FLAGS["object_name"],
        "scoring": Dict(
            {
                "temperature": Float(1e-6, 100.0),
                "window_sizes": List(Int(1, 64), max_len=8),
                "project_patches": Bool(),
                "plain_memory": Text(choices=("full", "coreset")),
                "window_aggregation": Text(choices=("harmonic", "mean")),
                "zero_shot_fusion": Text(choices=("harmonic", "mean")),
                "image_size": List(IMAGE_SIDE, length=2),
                "blur_sigma": Float(0.0, 64.0),
            }
        ),
    }
)
# Methods of each detector family fit writes.
FAMILY_METHODS = {"patchcore": ("patchcore", "patchcore+"), "winclip": ("winclip", "winclip+")}
# `metadata` of model.json as fit writes it; predict reads nothing else.
METADATA = Dict(
    {
        "detector": Dict(
            {
                "family": Text(choices=tuple(FAMILY_METHODS)),
                "method": Text(choices=sum(FAMILY_METHODS.values(), ())),
                "backbone": NAME,
                "aggregation": NAME,
                "feature_dim": _WIDTH,
                "vision_width": _WIDTH,
                "embed_dim": _WIDTH,
                "grid": List(Int(1, 1024), length=2),
                "image_size": AnyOf(IMAGE_SIDE, List(IMAGE_SIDE, length=2)),
                "views": Int(0, 64),
                "pseudo_anomalies": Int(0, 64),
            },
            # PatchCore: backbone, aggregation, feature_dim; WinCLIP: the CLIP widths.
            optional=(
                "backbone",
                "aggregation",
                "feature_dim",
                "vision_width",
                "embed_dim",
                "image_size",
                "views",
                "pseudo_anomalies",
            ),
        ),
        # WinCLIP models only: the CLIP folder (predict takes it again and compares).
        "clip": CLIP,
        # weights: "random", "shipped" or the file fit was given (a label only:
        # predict never opens a path read from model.json); WinCLIP: name "clip", the
        # --clip_dir fit was given and the SHA-256 of its weights (as in "clip").
        "backbone": Dict(
            {
                "name": NAME,
                "weights": Text(),
                "weights_sha256": Text(pattern=r"[0-9a-f]{64}|random:PRNGKey\(0\)"),
            }
        ),
        "image_size": List(IMAGE_SIDE, length=2),
        "alpha": FLAGS["alpha"],
        "config": CONFIG,
        "support": Dict(
            {
                "dir": Text(),
                "files": _FILES,
                "sha256": List(SHA256, max_len=100_000),
                "left_out": _FILES,
                "left_out_sha256": List(SHA256, max_len=100_000),
                "left_out_scores": List(SCORE, max_len=100_000),
            },
            optional=("left_out", "left_out_sha256", "left_out_scores"),
        ),
        "threshold": _THRESHOLD,
        "thresholds": Dict({"normal_only": _THRESHOLD, "f1": _THRESHOLD}, optional=("f1",)),
        "threshold_calibration": Dict(
            {
                "scores": List(SCORE, max_len=100_000),
                "against_others": Optional(List(SCORE, max_len=100_000)),
                "outliers": _FILES,
                "typical": List(SCORE, max_len=100_000),
            },
            optional=("against_others", "outliers", "typical"),
        ),
        "calibration": Optional(
            Dict(
                {
                    "dir": Text(),
                    "files": _FILES,
                    "labels": List(Int(0, 1), max_len=100_000),
                    "scores": List(SCORE, max_len=100_000),
                }
            )
        ),
        # PatchCore+: whether fit kept the refined half (calibration.refinement_check).
        "refinement_check": Dict(
            {
                "host_auroc": Float(0.0, 100.0),
                "fused_auroc": Float(0.0, 100.0),
                "images": Int(1, 1_000_000),
                "pasted": Int(1, 64),
                "host_better_z": Float(-1e6, 1e6),
                "refinement_kept": Bool(),
            }
        ),
        "map_scale": List(SCORE, length=2),
        "fit_seconds": Float(0.0, 1e9),
        "jax": Text(max_len=64),
        "export": Dict({"file": Text(choices=("detector.jaxexport",)), "platforms": List(NAME)}),
    },
    optional=("export", "clip", "refinement_check"),
)


def check_metadata(meta: Any) -> None:
    """Raises ValueError (naming the field and its range) unless `meta` follows `METADATA`."""
    METADATA.check(meta, "model.json: metadata")
    det = meta["detector"]
    where = "model.json: metadata.detector"
    if det["method"] not in FAMILY_METHODS[det["family"]]:
        raise ValueError(f"{where}.method {det['method']!r} is not a {det['family']} method")
    needed = ("backbone", "aggregation", "feature_dim")
    if det["family"] == "winclip":
        needed = ("vision_width", "embed_dim")
        if "clip" not in meta:
            raise ValueError("model.json: metadata lacks 'clip' (a WinCLIP model's CLIP folder)")
    elif "clip" in meta:
        raise ValueError("model.json: metadata.clip belongs to WinCLIP models only")
    for key in needed:
        if key not in det:
            raise ValueError(f"{where} lacks {key!r}")
