"""Fit once, predict anywhere: the logic behind `experiments.fit` and `experiments.predict`.

`fit_model` builds a library detector (`protorefine_jax.detectors`) from a
folder of good images, derives its decision threshold
(`protorefine_jax.threshold`), and writes a model directory
(`protorefine_jax.io.model_dir`), optionally with the `jax.export` artifact
of the whole compiled detector. `open_model` reads one back, checks that it
matches what the caller asks for, and returns a `Scorer`: the library
detector, or the exported program alone when the model code cannot be
imported. `predict` scores a folder of images in fixed-size batches and
writes the predictions, the overlays and `report.html`.

Nothing here parses flags; the two CLIs are thin wrappers.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from protorefine_jax import threshold as threshold_lib
from protorefine_jax.app import advice, html_report, predict_labels, runner, schema
from protorefine_jax.app.overlays import (
    encode_png,
    jet,
    normalise,
    side_by_side,
    thumbnail,
    with_key,
)
from protorefine_jax.app.prefetch import NO_STAGES, Stages, ordered_map
from protorefine_jax.data.errors import DatasetError
from protorefine_jax.data.imageio import decode_image, is_image_file, read_image, resize_decoded
from protorefine_jax.features.preprocess import image_hw
from protorefine_jax.io import model_dir
from protorefine_jax.io.paths import (
    OutputDir,
    clear_outputs,
    csv_text,
    json_safe_text,
    json_text,
    list_files,
    open_output_dir,
    safe_child,
    safe_filename,
    write_output,
)
from protorefine_jax.padding import fixed_batches

EXPORT_FILE = "detector.jaxexport"
# The files fit writes into --out, and predict; what --overwrite replaces (other files are kept).
FIT_OUTPUTS = (model_dir.MANIFEST, model_dir.ARRAYS, EXPORT_FILE)
PREDICT_OUTPUTS = (
    "predictions.csv",
    "predictions.jsonl",
    "report.html",
    "summary.json",
    "summary.csv",
    "overlays/*.png",
)
METHODS = {"patchcore": False, "patchcore+": True}  # PatchCore family: name -> use_refinement
WINCLIP_METHODS = {"winclip": False, "winclip+": True}  # on a CLIP folder (--clip_dir)
FIT_METHODS = {**METHODS, **WINCLIP_METHODS}
# RefineConfig fields fit and predict take as flags: the eval's, and lam.
REFINE_FIELDS = ("lam", *runner.REFINE_FIELDS)
# Errors reading one image that predict records and skips (a flag makes them fatal).
IMAGE_ERRORS = (DatasetError, OSError, ValueError)


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """Everything `fit_model` needs; `experiments.fit` fills it from flags."""

    support_dir: str = ""
    out: str = ""
    overwrite: bool = False
    method: str = "patchcore+"
    backbone: str = "efficientnet_lite0"
    aggregation: str | None = None
    weights: str = ""
    # None: the method's own (PatchCore 256; WinCLIP the CLIP model's square input).
    image_size: int | tuple[int, int] | None = 256
    alpha: float | None = None
    shots: int = 0
    seed: int = 0
    false_alarm_rate: float = 0.05
    margin: float = 0.0
    views: int = 4
    pseudo_anomalies: int = 16  # calibration.refinement_check (0: none)
    calibration_dir: str | None = None
    export: bool = False
    batch_size: int = 8
    progress: bool = True
    verbose: bool = False
    drop_outliers: bool = False
    clip_dir: str = ""
    object_name: str = "object"
    refine: tuple[tuple[str, Any], ...] = ()


# --------------------------------------------------------------------------- images


def parse_image_size(text: str | int | Sequence[int]) -> int | tuple[int, int]:
    """`"256"` -> 256 (square); `"224x544"` (height x width) -> (224, 544)."""
    if not isinstance(text, str):
        h, w = image_hw(text)
        return h if h == w else (h, w)
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values, default=0) <= 0:
        raise ValueError(
            "--image_size must be one side (e.g. 256) or HEIGHTxWIDTH (e.g. 224x544), "
            f"got {text!r}."
        )
    schema.image_size_ok(values * (3 - len(values)))
    return values[0] if len(values) == 1 or values[0] == values[1] else (values[0], values[1])


def list_images(spec: str | os.PathLike) -> tuple[Path, list[Path]]:
    """`(root, files)` of a folder (recursively) or a glob pattern, sorted.

    Args:
      spec: a directory, or a glob pattern (`**` allowed) of image files.

    Returns:
      The folder names are relative to (the directory, or the glob's fixed
      prefix) and the image files (extensions of `IMAGE_EXTENSIONS`, no
      hidden files), sorted by path.

    Raises:
      FileNotFoundError: nothing matches (the message says what was looked at).
      TooManyFilesError: more paths than `paths.MAX_LISTED_PATHS` (symlinked
        folders are not followed, so a link loop cannot list forever).
    """
    spec = os.fspath(spec)
    if not any(ch in spec for ch in "*?[") and not os.path.exists(spec):
        raise FileNotFoundError(
            f"the folder {spec!r} does not exist; check the path (a typo?) or pass a glob "
            "pattern such as 'parts/**/*.png'."
        )
    root, files = list_files(spec)
    files = [p for p in files if is_image_file(p)]
    if not files:
        raise FileNotFoundError(
            f"no image files (.png, .jpg, .bmp, .tif, ...) found in {spec!r}; pass a folder "
            "of images or a glob pattern such as 'parts/**/*.png'."
        )
    return root, files


def relative_name(root: Path, file: Path) -> str:
    """`file` relative to `root` (POSIX), or its bare name when outside; valid UTF-8 text."""
    try:
        return json_safe_text(file.relative_to(root).as_posix())
    except ValueError:
        return json_safe_text(file.name)


def read_one(
    file: Path,
    image_size: int | tuple[int, int],
    stages: Stages = NO_STAGES,
    resample: str = "bilinear",
) -> np.ndarray:
    """One image at the model's size (`imageio.read_image`), its decode and resize timed.

    `resample`: the detector's filter (PatchCore bilinear, WinCLIP bicubic).
    """
    with stages("decode"):
        arr = decode_image(file)
    with stages("resize"):
        return resize_decoded(arr, image_size, resample, path=file)


def _try_read(
    file: Path, image_size, stages: Stages, resample: str = "bilinear"
) -> tuple[np.ndarray | None, Any]:
    """`(pixels, None)`, or `(None, the error)` of a file `IMAGE_ERRORS` rejects."""
    try:
        return read_one(file, image_size, stages, resample), None
    except IMAGE_ERRORS as e:
        return None, e


def read_batch(
    files: Sequence[Path],
    image_size: int | tuple[int, int],
    strict: bool,
    *,
    workers: int = 0,
    stages: Stages = NO_STAGES,
    resample: str = "bilinear",
) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Reads images; returns `(pixels [n_ok, H, W, 3], ok indices, {index: error})`.

    `workers` threads decode (0: in this thread); the result does not depend on it.
    """
    reads = ordered_map(lambda f: _try_read(f, image_size, stages, resample), files, workers)
    return _collect(reads, image_size, strict)


def _collect(reads, image_size, strict: bool) -> tuple[np.ndarray, list[int], dict[int, str]]:
    ok, images, errors = [], [], {}
    for i, (image, err) in enumerate(reads):
        if err is None:
            images.append(image)
            ok.append(i)
        elif strict:
            raise err
        else:
            errors[i] = f"{type(err).__name__}: {err}"
    pixels = np.stack(images) if images else np.zeros((0, *image_hw(image_size), 3), np.uint8)
    return pixels, ok, errors


def read_chunks(
    files: Sequence[Path],
    image_size: int | tuple[int, int],
    strict: bool,
    chunk: int,
    *,
    workers: int = 2,
    stages: Stages = NO_STAGES,
    resample: str = "bilinear",
) -> Iterator[tuple[int, np.ndarray, list[int], dict[int, str]]]:
    """`(start, pixels, ok, errors)` of `files[start : start + chunk]`, in order, read ahead.

    The pipelined reader of `predict`: `workers` threads decode and resize
    up to two chunks ahead of the consumer (PIL releases the GIL while
    decoding), so the images of the next chunk are ready while the detector
    runs on this one. Each chunk is `read_batch(files[start : start + chunk])`:
    with `strict`, the first unreadable file (in file order) raises its error,
    which names the file.
    """
    reads = ordered_map(
        lambda f: _try_read(f, image_size, stages, resample),
        files,
        workers,
        depth=max(2 * chunk, 1),
    )
    try:
        for start in range(0, len(files), chunk):
            part = itertools.islice(reads, min(chunk, len(files) - start))
            yield (start, *_collect(part, image_size, strict))
    finally:
        reads.close()  # stops the workers (a strict error, or the consumer stopped early)


def calibration_set(folder: str | os.PathLike) -> tuple[list[Path], np.ndarray]:
    """Labelled calibration images in the MVTec test layout.

    `folder` (or `folder/test` when it exists) holds `good/` (label 0) and one
    sub-folder per defect type (label 1); masks are not needed.

    Returns:
      `(files, labels [N])`.
    """
    root = Path(folder)
    if (root / "test").is_dir():
        root = root / "test"
    if not root.is_dir():
        raise FileNotFoundError(f"--calibration_dir {folder} is not a folder.")
    files, labels = [], []
    subs = sorted(p for p in root.iterdir() if p.is_dir())
    for sub in subs:
        imgs = sorted(p for p in sub.iterdir() if p.is_file() and is_image_file(p))
        files += imgs
        labels += [0 if sub.name == "good" else 1] * len(imgs)
    labels_arr = np.asarray(labels, np.int64)
    if not np.any(labels_arr == 0) or not np.any(labels_arr == 1):
        raise FileNotFoundError(
            f"--calibration_dir {folder} needs good/ AND at least one defect folder with images "
            f"(MVTec layout: test/good, test/<defect type>); found {sorted(p.name for p in subs)}."
        )
    return files, labels_arr


# --------------------------------------------------------------------------- scoring


def padded(fn: Callable[[np.ndarray], Any], images: np.ndarray, batch_size: int) -> Iterator[Any]:
    """`fn` over `images` in batches of exactly `batch_size` (last padded); yields outputs cut."""
    for chunk, n in fixed_batches(images, batch_size):
        yield tuple(np.asarray(x)[:n] for x in fn(chunk))


@dataclasses.dataclass
class Scorer:
    """Scores batches of `[B, H, W, 3]` images: `score(images) -> (scores, maps, typical)`.

    `scores [B]`, `maps [B, H, W]`, and `typical [B]`: each image's
    `threshold.TYPICAL_QUANTILE` of patch scores, what the support check
    compares with the support images' (`threshold.typical_check`; NaN where
    the model has none, WinCLIP).

    Attributes:
      score: the scoring function (library detector or exported program).
      runtime: `"library"` or `"export"`.
      image_size: `S`, or `(H, W)`.
      stream: what `--calibrate_on_stream` needs (`StreamSetup`), or None.
      submit: `score` without reading the outputs back (device arrays, computed
        asynchronously), or None where the runtime has none.
      place: host images -> device (`jax.device_put`), what `submit` takes.
      resample: the resize filter of the detector's inputs (WinCLIP: bicubic).
    """

    score: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
    runtime: str
    image_size: int | tuple[int, int]
    stream: Any = None  # StreamSetup of a calibrated PatchCore+ library model, else None
    submit: Callable[[Any], tuple[Any, Any, Any]] | None = None
    place: Callable[[np.ndarray], Any] = np.asarray
    resample: str = "bilinear"


@jax.jit
def typical_scores(patch_scores):
    """`[B, m] -> [B]`: each image's `TYPICAL_QUANTILE` of patch scores (one compiled call)."""
    return jnp.quantile(patch_scores, threshold_lib.TYPICAL_QUANTILE, axis=1)


def submit_padded(
    scorer: Scorer, images: np.ndarray, batch_size: int, stages: Stages = NO_STAGES
) -> Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Starts `scorer` on `images` (padded batches): `wait() -> (scores, maps, typical)`.

    With a library scorer the detector runs asynchronously (JAX dispatch):
    the caller does other work (the previous images' overlays) until it calls
    `wait`, which reads the outputs back to the host. The outputs are `padded`'s.
    """
    pending = []
    for chunk, n in fixed_batches(images, batch_size):
        if scorer.submit is None:
            with stages("detector (synchronous)", n):
                pending.append((scorer.score(chunk), n))
            continue
        with stages("transfer", n):
            placed = scorer.place(chunk)
        with stages("dispatch", n):
            pending.append((scorer.submit(placed), n))

    def wait() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not pending:
            return np.zeros(0), np.zeros((0, *image_hw(scorer.image_size))), np.zeros(0)
        outs = []
        for out, n in pending:
            with stages("wait for detector", n):
                outs.append([np.asarray(x)[:n] for x in out])
        return tuple(np.concatenate(parts) for parts in zip(*outs, strict=True))

    return wait


def weights_identity(detector, weights: str) -> dict[str, Any]:
    """Backbone name, weights kind/path and the file's SHA-256 ("random" has none).

    `weights` is the user's own `--weights` ("" = the shipped file of the
    backbone, resolved by name); never a path read from a model directory.
    """
    from protorefine_jax.io import torch_checkpoint

    if weights == "random":
        return {"weights": "random", "weights_sha256": "random:PRNGKey(0)"}
    name = detector.extractor.name
    path = weights or torch_checkpoint.shipped_checkpoint(name)
    return {
        "weights": json_safe_text(weights or "shipped"),
        "weights_sha256": model_dir.file_sha256(path),
    }


def resolve_settings(s: FitSettings) -> FitSettings:
    """`s` with the method's image size; refuses what the method cannot honour.

    PatchCore: `image_size` None is 256. WinCLIP needs `clip_dir` (a local
    Hugging Face CLIP folder, complete) and takes the CLIP model's square
    input: `image_size` None or that size; `--export` and `--weights` are
    the PatchCore family's and are refused. Reads only the folder's listing
    and `config.json`, no weights.
    """
    if s.method not in FIT_METHODS:
        raise ValueError(f"unknown --method {s.method!r}; fit supports {sorted(FIT_METHODS)}.")
    if s.method in METHODS:
        return s if s.image_size is not None else dataclasses.replace(s, image_size=256)
    if not s.clip_dir:
        raise ValueError(
            f"--method={s.method} needs --clip_dir: a local Hugging Face CLIP folder "
            "(config.json, model.safetensors, vocab.json, merges.txt; README, WinCLIP). "
            f"Fix: --method={s.method} --clip_dir=<that folder>, or --method=patchcore+."
        )
    if s.export:
        raise ValueError(
            "--export writes the compiled program of the PatchCore family; a WinCLIP model "
            "is run by the package (predict --model=... --clip_dir=...). Drop --export."
        )
    if s.weights:
        raise ValueError(
            "--weights is the PatchCore backbone's file; WinCLIP's weights are those of "
            "--clip_dir. Drop --weights."
        )
    from protorefine_jax.io import clip_folder  # imports transformers: only for WinCLIP

    clip_folder.check_clip_folder(s.clip_dir)  # names the missing files
    side = clip_folder.read_config(s.clip_dir).image_size
    if s.image_size is not None and tuple(image_hw(s.image_size)) != (side, side):
        h, w = image_hw(s.image_size)
        raise ValueError(
            f"--image_size={h}x{w} but the CLIP model in {s.clip_dir} takes {side}x{side} px "
            f"(square; other images are resized to it). Fix: drop --image_size, or pass "
            f"--image_size={side}."
        )
    return dataclasses.replace(s, image_size=side)


def clip_identity(clip_dir: str | os.PathLike) -> dict[str, Any]:
    """What a model records of a CLIP folder: its architecture and its weights' SHA-256.

    `spec`: the `ClipSpec` the folder's `config.json` and
    `preprocessor_config.json` give (what `load_clip` builds); `weights_sha256`:
    the SHA-256 of the weight file, or for a sharded checkpoint of the lines
    `<name> <sha256>` of its index and shards. The tokenizer files are not part
    of it: the class text embeddings are computed at fit and kept in the state.
    `clip_dir` is the user's own flag, never a path read from `model.json`.
    """
    import hashlib

    from protorefine_jax.io import clip_folder

    clip_folder.check_clip_folder(clip_dir)
    spec = clip_folder.read_spec(clip_dir)
    files = clip_folder.weight_files(clip_dir)
    digests = [model_dir.file_sha256(f) for f in files]
    if len(files) == 1:
        weights = digests[0]
    else:
        lines = "".join(f"{f.name} {d}\n" for f, d in zip(files, digests, strict=True))
        weights = hashlib.sha256(lines.encode()).hexdigest()
    spec_dict = {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()
    }
    return {
        "spec": spec_dict,
        "weights_files": [f.name for f in files],
        "weights_sha256": weights,
    }


def clip_differences(recorded: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Lines naming each field where a CLIP folder differs from the one recorded."""
    lines = [
        f"clip.spec.{k}: model has {recorded['spec'].get(k)!r}, --clip_dir has {v!r}"
        for k, v in found["spec"].items()
        if recorded["spec"].get(k) != v
    ]
    if recorded["weights_sha256"] != found["weights_sha256"]:
        lines.append(
            f"clip.weights_sha256: model has {recorded['weights_sha256']!r} "
            f"({', '.join(recorded['weights_files'])}), --clip_dir has "
            f"{found['weights_sha256']!r} ({', '.join(found['weights_files'])})"
        )
    return lines


def refinement_check_metadata(check: Any) -> dict[str, Any]:
    """model.json's `refinement_check` entry (empty without a check)."""
    if check is None:
        return {}
    return {
        "refinement_check": {
            "host_auroc": round(float(check.host_auroc), 4),
            "fused_auroc": round(float(check.fused_auroc), 4),
            "images": int(check.images),
            "pasted": int(check.pasted),
            "host_better_z": round(float(check.host_better_z), 4),
            "refinement_kept": check.keep,
        }
    }


def method_resample(method: str) -> str:
    """The resize filter of a fit method's inputs (the detector's `resample`)."""
    if method in WINCLIP_METHODS:
        from protorefine_jax.detectors.winclip import WinClip

        return WinClip.resample
    from protorefine_jax.detectors import PatchCore

    return PatchCore.resample


def build_detector(s: FitSettings):
    """`(detector, params, config)` of resolved settings (`resolve_settings`)."""
    from protorefine_jax.detectors import PatchCore

    if s.method not in FIT_METHODS:
        raise ValueError(f"unknown --method {s.method!r}; fit supports {sorted(FIT_METHODS)}.")
    if s.method in WINCLIP_METHODS:
        from protorefine_jax.detectors.winclip import WinClip

        detector, params = WinClip.from_folder(s.clip_dir, alpha=s.alpha)
        config = detector.config(use_refinement=WINCLIP_METHODS[s.method], **dict(s.refine))
        return detector, params, config
    detector = PatchCore.create(
        s.backbone,
        s.aggregation,
        s.image_size,
        alpha=s.alpha,
        views=s.views,
        pseudo=s.pseudo_anomalies,
    )
    params = detector.load_params(s.weights)
    config = detector.config(use_refinement=METHODS[s.method], **dict(s.refine))
    return detector, params, config


def config_dict(config) -> dict[str, Any]:
    """A `RefineConfig` as JSON-ready values (tuples as lists, arrays as floats)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if hasattr(v, "item") and np.ndim(v) == 0:
            v = v.item()
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def clear_earlier_outputs(out: Path, outputs: Sequence[str], log: Callable[[str], None]) -> None:
    """`--overwrite`: removes the files an earlier run of the tool wrote; keeps (lists) others.

    Called once the inputs have been checked, just before the first write, so
    that stale files (a `detector.jaxexport` of an earlier `fit --export`,
    overlays of images no longer scored) never sit beside the new ones.
    """
    removed, kept = clear_outputs(out, outputs)
    if removed:
        log(f"--overwrite: removed {len(removed)} file(s) of an earlier run from {out}/")
    if kept:
        shown = ", ".join(kept[:5]) + (", ..." if len(kept) > 5 else "")
        log(
            f"--overwrite: kept {len(kept)} file(s) in {out}/ that this tool does not write: "
            f"{shown}"
        )


def _check_fit(s: FitSettings) -> OutputDir:
    if not s.support_dir:
        raise ValueError("--support_dir is required: a folder (or glob) of good images.")
    if not s.out:
        raise ValueError("--out is required: the model directory to write.")
    schema.check_flags({**dataclasses.asdict(s), **dict(s.refine)})
    schema.image_size_ok(image_hw(s.image_size))
    # Before any image is read: a read-only --out fails now, not after the fit.
    return open_output_dir(s.out, "--out", s.overwrite, "models")


def fit_model(s: FitSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fits the detector on the support images and writes the model directory.

    Returns:
      The model's metadata (as stored in `model.json`).

    Bad input (an unwritable or non-empty `--out`, no image, a calibration
    folder without good AND defective images, an unreadable support image)
    is refused before the backbone is built, and a refused fit leaves no
    folder behind. With `--overwrite` the files of an earlier model
    (`FIT_OUTPUTS`) are removed just before the new ones are written;
    `model.json` is written last, so a fit that dies while writing leaves no
    loadable half-model.
    """
    s = resolve_settings(s)
    out_dir = _check_fit(s)
    try:
        return _fit_model(s, out_dir.path, log)
    except BaseException:
        out_dir.discard_if_unused()
        raise


def _fit_model(s: FitSettings, out: Path, log: Callable[[str], None]) -> dict[str, Any]:

    from protorefine_jax.data.fewshot import sample_support

    root, files = list_images(s.support_dir)
    if s.shots:
        files = list(sample_support(files, s.shots, s.seed).paths)
    # Listing only, before the backbone: a one-class calibration folder is refused now.
    calibration_files = calibration_set(s.calibration_dir) if s.calibration_dir else None
    winclip = s.method in WINCLIP_METHODS
    if winclip and len(files) < 2:
        raise ValueError(
            f"--method={s.method} needs at least 2 good images: its threshold comes from each "
            f"image scored by a model of the others; {s.support_dir} gives {len(files)}. Fix: "
            "add good images (or --shots=0 for all of them)."
        )
    resample = method_resample(s.method)
    support, _, errors = read_batch(files, s.image_size, strict=True, resample=resample)
    del errors  # strict: unreadable support images are fatal
    k = len(files)
    detector, params, config = build_detector(s)
    context = detector.prepare(params, s.object_name) if winclip else None
    t0 = time.time()
    chunks = [detector.features(params, b) for b, _ in fixed_batches(support, s.batch_size)]
    # An array (PatchCore) or a pytree of arrays (WinCLIP's scales), leading axis k.
    feats = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs])[:k], *chunks)
    # One image's views per call (memory of V images); None where the detector has none.
    per_image = [detector.view_features(params, support[i : i + 1]) for i in range(k)]
    views = None if per_image[0] is None else np.stack([v[0] for v in per_image])

    def fit_state(feats, views, images):
        """The state and the support images' held-out scores (what the threshold is of)."""
        if not winclip:
            checked = detector.checks_refinement(config)
            pseudo = detector.pseudo_features(params, images) if checked else None
            st = detector.fit_features(feats, views=views, pseudo=pseudo, config=config)
            return st, st.support_scores
        st = fit_winclip(detector, feats, context, config)
        return st, winclip_support_scores(detector, feats, context, config)

    state, support_scores = fit_state(feats, views, support)
    prompt = f' (prompts of "{s.object_name}")' if winclip else ""
    log(f"fitted {s.method} on {k} image(s) from {root}{prompt}")
    advice.show_refinement_check(state.refinement_check, log)
    advice.show_banks(state.banks, config, s.verbose, log)  # plain advice; ranks with --verbose

    def score_state(st, images, batch_size=s.batch_size):
        out = [detector.score(params, st, b, config) for b, _ in fixed_batches(images, batch_size)]
        scores = np.concatenate([np.asarray(o.image_scores) for o in out])[: len(images)]
        maps = np.concatenate([np.asarray(o.maps) for o in out])[: len(images)]
        return scores, maps

    # Each support image's held-out scores, in the deployed detector's units.
    normal, outliers = threshold_lib.from_support_scores(
        support_scores, s.false_alarm_rate, s.margin
    )
    names = [relative_name(root, f) for f in files]
    left_out: list[dict[str, Any]] = []
    if outliers.any():
        what = "the model (bank, calibration, threshold)" if s.drop_outliers else "the threshold"
        for i in np.flatnonzero(outliers):
            others = np.delete(np.asarray(support_scores.against_others), i)
            log(
                f"warning: support image {names[i]} scores "
                f"{support_scores.against_others[i]:.3g} against the other good images, far "
                f"above them (median {np.median(others):.3g}). It may be a defective, stray or "
                f"badly lit image: check it. It is left out of {what}"
                + (
                    "."
                    if s.drop_outliers
                    else "; if it is not a good part, remove it (or fit with --drop_outliers)."
                )
            )
    if outliers.any() and s.drop_outliers:
        # An image unlike the others would define "normal" for every score: fit without it.
        keep = ~outliers
        left_out = [
            {
                "file": names[i],
                "sha256": model_dir.file_sha256(files[i]),
                "against_others": float(support_scores.against_others[i]),
            }
            for i in np.flatnonzero(outliers)
        ]
        files = [f for f, kept in zip(files, keep, strict=True) if kept]
        names = [n for n, kept in zip(names, keep, strict=True) if kept]
        support = support[keep]
        feats = jax.tree.map(lambda x: x[keep], feats)
        views = None if views is None else views[keep]
        k = len(files)
        state, support_scores = fit_state(feats, views, support)
        log(f"fitted {s.method} again on the other {k} image(s)")
        advice.show_refinement_check(state.refinement_check, log)
        normal, outliers = threshold_lib.from_support_scores(
            support_scores, s.false_alarm_rate, s.margin
        )
        for i in np.flatnonzero(outliers):  # a second round: named, kept out of the threshold
            log(
                f"warning: support image {names[i]} also scores far above the others "
                f"({support_scores.against_others[i]:.3g}); check it. It is left out of the "
                "threshold."
            )
    held_out = np.asarray(support_scores.held_out, np.float64)
    shown = map_scale_images(k)
    # Every image at the compiled batch; a few, at their own batch (no padding to score).
    batch = s.batch_size if len(shown) == k else len(shown)
    _, cal_maps = score_state(state, support[shown], batch)
    log(normal.describe())
    thresholds = {"normal_only": normal.to_dict()}
    active = normal
    calibration = None
    if calibration_files is not None:
        cfiles, clabels = calibration_files
        cimages, _, _ = read_batch(cfiles, s.image_size, strict=True)
        cscores, _ = score_state(state, cimages)
        active = threshold_lib.f1_threshold(clabels, cscores)
        thresholds["f1"] = active.to_dict()
        calibration = {
            "dir": json_safe_text(str(s.calibration_dir)),
            "files": [relative_name(Path(s.calibration_dir), f) for f in cfiles],
            "labels": clabels.tolist(),
            "scores": [float(x) for x in cscores],
        }
        log(active.describe() + " (used for decisions)")
    # Map colours: the typical normal map value is blue, the threshold red.
    map_scale = [float(np.median(np.asarray(cal_maps))), float(active.value)]
    meta = {
        "detector": {
            "family": detector.family,
            "method": s.method,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in detector.describe().items()},
        },
        "backbone": (
            {"name": "clip", "weights": json_safe_text(str(s.clip_dir))}
            if winclip
            else {"name": s.backbone, **weights_identity(detector, s.weights)}
        ),
        "image_size": list(image_hw(s.image_size)),
        "alpha": detector.alpha if s.alpha is None else s.alpha,
        "config": config_dict(detector.refinement(config) if winclip else config),
        "support": {
            "dir": json_safe_text(str(s.support_dir)),
            "files": [relative_name(root, f) for f in files],
            "sha256": [model_dir.file_sha256(f) for f in files],
            "left_out": [o["file"] for o in left_out],
            "left_out_sha256": [o["sha256"] for o in left_out],
            "left_out_scores": [o["against_others"] for o in left_out],
        },
        "threshold": active.to_dict(),
        "thresholds": thresholds,
        "threshold_calibration": {
            "scores": [float(x) for x in held_out],
            "against_others": (
                None
                if support_scores.against_others is None
                else [float(x) for x in support_scores.against_others]
            ),
            "outliers": [names[i] for i in np.flatnonzero(outliers)],
            **support_typical(support_scores, outliers),
        },
        "calibration": calibration,
        **refinement_check_metadata(state.refinement_check),
        "map_scale": map_scale,
        "fit_seconds": round(time.time() - t0, 3),
        "jax": jax.__version__,
    }
    if winclip:
        ident = clip_identity(s.clip_dir)
        meta["backbone"]["weights_sha256"] = ident["weights_sha256"]
        meta["clip"] = {
            "dir": json_safe_text(str(s.clip_dir)),
            **ident,
            "object_name": s.object_name,
            "scoring": winclip_scoring(config),
        }
    extra = {}
    if s.export:
        extra[EXPORT_FILE] = export_artifact(detector, params, state, config, s.image_size)
        meta["export"] = {"file": EXPORT_FILE, "platforms": [jax.default_backend()]}
    schema.check_metadata(meta)  # what predict will accept, checked before writing
    if s.overwrite:
        clear_earlier_outputs(out, FIT_OUTPUTS, log)
    # The config is model.json's; the support scores stay (predict --calibrate_on_stream).
    saved = state._replace(calibrated_under=None)
    model_dir.save_model(out, saved, meta, extra_files=extra, overwrite=s.overwrite)
    log(f"model written to {s.out}/ ({', '.join([model_dir.MANIFEST, model_dir.ARRAYS, *extra])})")
    return meta


def support_typical(scores: Any, outliers: np.ndarray) -> dict[str, Any]:
    """`{"typical": [...]}`: the held-out typical scores `predict`'s support check compares with.

    Each kept support image's and view's typical patch score
    (`SupportScores.typical`); the images left out of the threshold are left
    out here too. Empty where the detector has none (WinCLIP).
    """
    if scores.typical is None:
        return {}
    kept = np.asarray(scores.typical, np.float64)[~np.asarray(outliers, bool)]
    return {"typical": [float(x) for x in kept.reshape(-1)]}


def fit_winclip(detector, feats, context, config):
    """A WinCLIP state of support features: banks, and the calibration WinCLIP+ fuses with."""
    refine = detector.refinement(config)
    calibrate = bool(refine.use_refinement and refine.calibrated)
    return detector.fit_features(feats, context=context, config=config, calibrate=calibrate)


def winclip_support_scores(detector, feats, context, config):
    """Each support image's score by a WinCLIP(+) model of the OTHER images (leave-one-out).

    WinCLIP's state has no held-out image scores of its own (its calibration
    holds out quadrants of each scale, not images, and gives no image
    scores), so fit refits the banks and the calibration on the other
    `k - 1` images for each image and scores it with the deployed scoring:
    the scores PatchCore+'s threshold is derived from, here from whole images
    held out. A model of `k - 1` images scores a new good image a little
    higher than the model of `k`, so the threshold errs on the side of fewer
    false alarms. Also what names an outlier (`against_others`).

    Args:
      detector: a `WinClip`.
      feats: the `k >= 2` support images' `MultiscaleFeatures`.
      context: the `[2, E]` class text embeddings.
      config: the scoring `WinClipConfig`.

    Returns:
      `calibration.SupportScores(held_out=[k], against_others=[k])`, the same scores.
    """
    from protorefine_jax.calibration import SupportScores

    k = int(jax.tree.leaves(feats)[0].shape[0])
    if k < 2:
        raise ValueError(f"leave-one-out scores need at least 2 support images, got {k}.")
    scores = []
    for i in range(k):
        others = jax.tree.map(lambda x, i=i: np.delete(np.asarray(x), i, axis=0), feats)
        one = jax.tree.map(lambda x, i=i: np.asarray(x)[i : i + 1], feats)
        st = fit_winclip(detector, others, context, config)
        scores.append(float(np.asarray(detector.score_features(st, one, config).image_scores)[0]))
    held = np.asarray(scores, np.float64)
    return SupportScores(held_out=held, against_others=held)


def winclip_scoring(config) -> dict[str, Any]:
    """The `WinClipConfig` fields beside `refine` and `clip`, JSON-ready (`model.json` "clip")."""
    out = {}
    for f in dataclasses.fields(config):
        if f.name in ("refine", "clip"):
            continue
        v = getattr(config, f.name)
        if hasattr(v, "item") and np.ndim(v) == 0:
            v = v.item()
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


MAP_SCALE_IMAGES = (8, 4)
"""Support images whose maps set the map colours: all up to the first, else the second many."""


def map_scale_images(k: int) -> np.ndarray:
    """Which of `k` support images' maps set the map colour scale (their median is blue).

    Every image up to `MAP_SCALE_IMAGES[0]`; above, `MAP_SCALE_IMAGES[1]`
    evenly spaced ones: each is a full PatchCore+ scoring against the bank,
    whose cost grows with the bank (~n^2 per patch), and a median of the
    maps of a few normal images is a colour scale as good as of all.
    """
    upto, many = MAP_SCALE_IMAGES
    if k <= upto:
        return np.arange(k)
    return np.unique(np.linspace(0, k - 1, many).round().astype(int))


def export_artifact(detector, params, state, config, image_size) -> bytes:
    """The `jax.export` program `images -> (scores, maps, patch_scores)`, bank baked in."""
    from protorefine_jax import make_detect
    from protorefine_jax.export import export_detect

    detect = make_detect(detector.features)
    return export_detect(
        detect,
        params,
        state.banks[0].prototypes,
        config,
        (*image_hw(image_size), 3),
        calibration=state.calibration,
    )


# --------------------------------------------------------------------------- loading


def requested_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    """The nested form `check_matches` compares, from flat predict overrides."""
    req: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in REFINE_FIELDS:
            req.setdefault("config", {})[key] = value
        elif key == "backbone":
            req.setdefault("backbone", {})["name"] = value
        elif key == "method":
            req.setdefault("detector", {})["method"] = value
        elif key == "aggregation":
            req.setdefault("detector", {})["aggregation"] = value
        elif key == "image_size":
            req["image_size"] = list(image_hw(parse_image_size(value)))
        else:
            raise ValueError(f"unknown setting {key!r}")
    return req


def open_model(
    path: str | os.PathLike,
    *,
    runtime: str = "auto",
    weights: str | None = None,
    requested: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    clip_dir: str | None = None,
) -> tuple[Scorer, dict[str, Any]]:
    """Loads a model directory as a `Scorer` (see the module docstring).

    Args:
      path: the model directory.
      runtime: `"library"` (the detector code), `"export"` (the exported
        program only) or `"auto"` (the library when importable, else export).
      weights: where this machine has the backbone weights (None: as fitted);
        the file's SHA-256 must match the model's.
      requested: settings the caller asks for (`requested_settings`); any
        that differ from the model's raise `ModelMismatchError`.
      log: where notes go.
      clip_dir: WinCLIP models: the CLIP folder on this machine (required);
        its architecture and weights' SHA-256 must match the model's.

    Returns:
      `(scorer, manifest)`.
    """
    manifest = model_dir.read_manifest(path)
    meta = manifest["metadata"]
    try:
        schema.check_metadata(meta)
    except ValueError as e:
        raise model_dir.ModelFormatError(
            f"{Path(path) / model_dir.MANIFEST} is not a model fit writes: {e}. The file was "
            "changed or written by another version; refit the model."
        ) from e
    if requested:
        model_dir.check_matches(manifest, requested)
    family = meta["detector"]["family"]
    if family != "winclip" and clip_dir is not None:
        raise ValueError(
            f"--clip_dir is for WinCLIP models; {path} is a {meta['detector']['method']} model. "
            "Drop --clip_dir."
        )
    if family == "winclip":
        if runtime == "export":
            raise ValueError(
                f"{path} is a WinCLIP model, which has no exported program (fit --export is for "
                "the PatchCore family): use --runtime=library (or auto)."
            )
        return _winclip_scorer(path, meta, clip_dir), manifest
    if runtime not in ("auto", "library", "export"):
        raise ValueError(f"unknown runtime {runtime!r}; choose auto, library or export.")
    if runtime == "auto":
        try:
            import protorefine_jax.detectors  # noqa: F401
            import protorefine_jax.features  # noqa: F401

            runtime = "library"
        except ImportError as e:
            if "export" not in meta:
                raise ImportError(
                    f"the detector code cannot be imported ({e}) and the model has no exported "
                    "program; refit it with --export, or install the package."
                ) from e
            log(f"detector code not importable ({e}): running the exported program")
            runtime = "export"
    size = parse_image_size(meta["image_size"])
    if runtime == "export":
        return _export_scorer(path, manifest, size), manifest
    return _library_scorer(path, meta, size, weights), manifest


def _export_scorer(path, manifest, size: int) -> Scorer:
    from jax import export

    if "export" not in manifest["metadata"]:
        raise model_dir.ModelFormatError(
            f"{path} has no exported program; refit with `experiments.fit --export`."
        )
    blob = model_dir.read_file(path, EXPORT_FILE)  # SHA-256 checked against model.json
    try:  # the validating loader (platform, version, signature), when importable
        from protorefine_jax.export import load_detect

        call = load_detect(blob, image_shape=(*image_hw(size), 3))
    except ImportError:
        call = export.deserialize(bytearray(blob)).call

    def submit(images):
        scores, maps, patches = call(np.asarray(images, np.float32))
        return scores, maps, typical_scores(patches)

    def score(images):
        return tuple(np.asarray(x) for x in submit(images))

    return Scorer(score=score, runtime="export", image_size=size, submit=submit)


def _library_scorer(path, meta, size: int, weights: str | None) -> Scorer:
    import jax

    from protorefine_jax.detectors import PatchCore

    loaded = model_dir.load_model(path)
    if loaded.version_note:
        print(f"note: {loaded.version_note}")
    det = meta["detector"]
    backbone = meta["backbone"]
    check_state(loaded.state, det["feature_dim"], path)
    detector = PatchCore.create(backbone["name"], det["aggregation"], size, alpha=meta.get("alpha"))
    chosen = weights
    if chosen is None:  # as fitted: only names are resolved, never a path from model.json
        if backbone["weights"] not in ("random", "shipped"):
            raise model_dir.ModelMismatchError(
                f"the model was fitted with the weights file {backbone['weights']!r}; a path "
                "recorded in a model directory is never opened. Fix: pass "
                "--weights=<that file on this machine> (its SHA-256 is checked)."
            )
        chosen = "random" if backbone["weights"] == "random" else ""
    ident = weights_identity(detector, chosen)
    if ident["weights_sha256"] != backbone["weights_sha256"]:
        raise model_dir.ModelMismatchError(
            "the model was fitted with other backbone weights than requested:\n  "
            f"backbone.weights_sha256: model has {backbone['weights_sha256']!r} "
            f"({backbone['weights']}), requested {ident['weights_sha256']!r} "
            f"({chosen or 'shipped'})"
            "\nPass --weights=<the file the model was fitted with>, or fit a new model."
        )
    params = detector.load_params(chosen)
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["config"].items()}
    config = type(detector.config())(**cfg)

    # The calibration in the state was measured under the config fit recorded.
    state = loaded.state._replace(calibrated_under=config)

    def submit(images):
        out = detector.score(params, state, images, config)
        # device arrays: not waited for here
        return out.image_scores, out.maps, typical_scores(out.patch_scores)

    def score(images):
        return tuple(np.asarray(x) for x in submit(images))

    def halves(images):
        feats = detector.features(params, images)
        host = detector.score_features(state, feats, config.replace(use_refinement=False))
        refined = detector.score_features(state, feats, config.replace(calibrated=False))
        return np.asarray(host.patch_scores), np.asarray(refined.patch_scores)

    fuses = config.use_refinement and config.calibrated and state.calibration is not None
    stream = None
    if fuses and state.support_scores is not None:
        stream = StreamSetup(
            halves, state.support_scores, config, float(state.calibration.refined_on)
        )
    return Scorer(
        score=score,
        runtime="library",
        image_size=size,
        stream=stream,
        submit=submit,
        place=jax.device_put,
    )


def _winclip_scorer(path, meta, clip_dir: str | None) -> Scorer:
    """The library scorer of a WinCLIP model on the user's `clip_dir` (checked against it)."""
    from protorefine_jax.clip.winclip import WinClipConfig
    from protorefine_jax.config import RefineConfig
    from protorefine_jax.detectors.winclip import WinClip
    from protorefine_jax.io.clip_folder import load_clip

    recorded = meta["clip"]
    if not clip_dir:
        raise ValueError(
            f"{path} is a {meta['detector']['method']} model fitted on the CLIP folder "
            f"{recorded['dir']!r}; a path recorded in a model directory is never opened. Fix: "
            "pass --clip_dir=<that CLIP folder on this machine> (its config and weights' "
            "SHA-256 are checked)."
        )
    differences = clip_differences(recorded, clip_identity(clip_dir))
    if differences:
        raise model_dir.ModelMismatchError(
            f"the model was fitted on another CLIP model than --clip_dir={clip_dir}:\n  "
            + "\n  ".join(differences)
            + "\nPass --clip_dir=<the CLIP folder the model was fitted on>, or fit a new model."
        )
    loaded = model_dir.load_model(path)
    if loaded.version_note:
        print(f"note: {loaded.version_note}")
    spec, params, tokenizer = load_clip(clip_dir)
    detector = WinClip(spec, tokenizer, alpha=meta["alpha"])
    scoring = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded["scoring"].items()}
    refine = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["config"].items()}
    config = WinClipConfig(refine=RefineConfig(**refine), clip=spec, **scoring)
    check_winclip_state(loaded.state, config, path)
    has_cal = loaded.state.calibration is not None
    state = loaded.state._replace(calibrated_under=config if has_cal else None)

    def submit(images):
        out = detector.score(params, state, images, config)
        return out.image_scores, out.maps, jnp.full(out.image_scores.shape, jnp.nan)  # no check

    def score(images):
        return tuple(np.asarray(x) for x in submit(images))

    size = parse_image_size(meta["image_size"])
    return Scorer(
        score=score,
        runtime="library",
        image_size=size,
        submit=submit,
        place=jax.device_put,
        resample=detector.resample,
    )


@dataclasses.dataclass
class StreamSetup:
    """What `predict --calibrate_on_stream` needs of a library model (calibrated PatchCore+).

    Attributes:
      halves: `images [B, H, W, 3] -> (host [B, m], refined [B, m])` raw patch scores.
      support_scores: the fit's `calibration.SupportScores` (held-out patches).
      config: the model's scoring config (grid, map size, blur).
      refined_on: the fit's refinement check (`ScoreCalibration.refined_on`).
    """

    halves: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    support_scores: Any
    config: Any
    refined_on: float = 1.0

    def fuser(self, gate: float) -> Callable[[np.ndarray, np.ndarray], tuple]:
        """`(host, refined) -> (scores, maps, typical)` of the next images, statistics learnt.

        Images in call order; an image scored above `gate` is not learnt from
        (`stream_calibration.fuse_next`).
        """
        from protorefine_jax import stream_calibration
        from protorefine_jax.scoring import maps_of_grids

        scores = self.support_scores
        state = stream_calibration.init(
            scores.host_patches, scores.refined_patches, refined_on=self.refined_on
        )
        cfg = self.config

        def fuse(host, refined):
            nonlocal state
            state, fused, _ = stream_calibration.fuse_next(state, host, refined, gate)
            maps = maps_of_grids(fused, cfg.grid_shape, cfg.image_size, cfg.blur_sigma)
            typical = np.quantile(fused, threshold_lib.TYPICAL_QUANTILE, axis=1)
            return fused.max(axis=1), maps, typical

        return fuse


def check_state(state: Any, feature_dim: int, path) -> None:
    """Raises `ModelFormatError` unless `state` is a PatchCore state of `feature_dim` features.

    Bank shapes, and calibration statistics that are finite scalars with
    positive scales (a zero scale would turn every score into infinity).
    """
    from protorefine_jax.bank import MemoryBank
    from protorefine_jax.detectors.base import DetectorState

    def bad(what: str) -> model_dir.ModelFormatError:
        return model_dir.ModelFormatError(
            f"{Path(path) / model_dir.ARRAYS}: {what}; the model directory was changed or "
            "written by another version. Refit the model."
        )

    if not isinstance(state, DetectorState) or not isinstance(state.banks, tuple | list):
        raise bad("the state is not a PatchCore state")
    for bank in state.banks:
        p = getattr(bank, "prototypes", None)
        if not isinstance(bank, MemoryBank) or np.ndim(p) != 2 or np.shape(p)[1] != feature_dim:
            raise bad(f"a memory bank is not [n, {feature_dim}] prototypes")
        if not np.all(np.isfinite(p)):
            raise bad("a memory bank holds non-finite values")
    cal = state.calibration
    if cal is not None:
        _check_calibration(cal, bad)
    scores = state.support_scores
    if scores is not None:
        from protorefine_jax.calibration import SupportScores

        if not isinstance(scores, SupportScores):
            raise bad("the support scores are not SupportScores")
        for name, value in scores._asdict().items():
            if value is None:
                continue
            v = np.asarray(value)
            dims = 2 if name == "typical" else 1  # typical: [images, 1 + views]
            if v.ndim != dims or v.size == 0 or v.size > 10_000_000 or not np.all(np.isfinite(v)):
                raise bad(f"support scores {name} must be a non-empty finite {dims}-D array")
    check = state.refinement_check
    if check is not None:
        from protorefine_jax.calibration import RefinementCheck

        if not isinstance(check, RefinementCheck):
            raise bad("the refinement check is not a RefinementCheck")
        for name, value in check._asdict().items():
            v = np.asarray(value)
            low = -1e6 if name == "host_better_z" else 0  # a z-score: negative when fused is better
            if v.shape != () or not np.isfinite(v) or not low <= v <= 1e6:
                raise bad(f"refinement check {name} must be a finite scalar in [{low:g}, 1e6]")


def _check_calibration(cal: Any, bad: Callable[[str], Exception]) -> None:
    from protorefine_jax.calibration import ScoreCalibration

    if not isinstance(cal, ScoreCalibration):
        raise bad("the calibration is not a ScoreCalibration")
    for name, value in cal._asdict().items():
        v = np.asarray(value)
        if v.shape != () or not np.isfinite(v) or (name.endswith("scale") and not v > 0):
            raise bad(f"calibration {name} must be a finite scalar (scales > 0), got {v!r}")
    if float(cal.refined_on) not in (0.0, 1.0):
        raise bad(f"calibration refined_on must be 0 or 1, got {cal.refined_on!r}")


def check_winclip_state(state: Any, config: Any, path) -> None:
    """Raises `ModelFormatError` unless `state` is a WinCLIP state scoring under `config`.

    One coreset bank and one full memory per scale (patches, then each window
    size), finite rows of the scale's width; the `[2, E]` class text
    embeddings; no calibration, or one finite `ScoreCalibration` per scale.
    """
    from protorefine_jax.bank import MemoryBank
    from protorefine_jax.clip.winclip import WinClipBanks
    from protorefine_jax.detectors.base import DetectorState

    def bad(what: str) -> model_dir.ModelFormatError:
        return model_dir.ModelFormatError(
            f"{Path(path) / model_dir.ARRAYS}: {what}; the model directory was changed or "
            "written by another version. Refit the model."
        )

    spec = config.clip
    patch_width = spec.embed_dim if config.project_patches else spec.vision_width
    widths = [patch_width] + [spec.embed_dim] * len(config.window_sizes)
    banks = getattr(state, "banks", None)
    if not isinstance(state, DetectorState) or not isinstance(banks, WinClipBanks):
        raise bad("the state is not a WinCLIP state")
    if len(banks.coreset) != len(widths) or len(banks.full) != len(widths):
        raise bad(f"the state holds {len(banks.coreset)} scales, the config {len(widths)}")
    for bank, full, width in zip(banks.coreset, banks.full, widths, strict=True):
        for rows in (getattr(bank, "prototypes", None), full):
            if np.ndim(rows) != 2 or np.shape(rows)[1] != width:
                raise bad(f"a memory bank is not [n, {width}] rows")
            if not np.all(np.isfinite(rows)):
                raise bad("a memory bank holds non-finite values")
        if not isinstance(bank, MemoryBank):
            raise bad("a coreset bank is not a MemoryBank")
    text = state.context
    if np.shape(text) != (2, spec.embed_dim) or not np.all(np.isfinite(text)):
        raise bad(f"the class text embeddings are not finite [2, {spec.embed_dim}]")
    if state.calibration is not None:
        cal = state.calibration
        if not isinstance(cal, tuple | list) or len(cal) != len(widths):
            raise bad(f"the calibration is not one ScoreCalibration per scale ({len(widths)})")
        for c in cal:
            _check_calibration(c, bad)


# --------------------------------------------------------------------------- predict


@dataclasses.dataclass(frozen=True)
class PredictSettings:
    """Everything `predict` needs; `experiments.predict` fills it from flags."""

    model: str = ""
    images: str = ""
    out: str = ""
    overwrite: bool = False
    batch_size: int = 8
    runtime: str = "auto"
    weights: str | None = None
    strict: bool = False
    threshold: float | None = None
    overlays: str = "all"
    progress: bool = True
    requested: tuple[tuple[str, Any], ...] = ()
    calibrate_on_stream: bool = False
    labels: str = "auto"
    support_dir: str | None = None
    clip_dir: str | None = None


def _safe_stem(index: int, name: str) -> str:
    # The index keeps names unique after flattening folders; safe_filename keeps them valid.
    return f"{index:05d}_{safe_filename(name.rsplit('.', 1)[0].replace('/', '_'), 80)}"


def predict(
    s: PredictSettings, log: Callable[[str], None] = print, profile: Stages | None = None
) -> dict[str, Any]:
    """Scores every image of `s.images` and writes predictions, overlays and report.html.

    `profile`: a `prefetch.Stages` that records where the time goes (decode,
    resize, transfer, detector, overlays, report; `experiments.bench_predict`).

    Returns:
      A summary: counts, images/s, threshold, files written.

    `--out` is checked (and created) before the model is opened: a read-only
    path fails first. A run refused before writing anything leaves no folder
    behind; with `--overwrite` the files of an earlier run (`PREDICT_OUTPUTS`)
    are removed once the model has been opened, so that no stale overlay
    mixes with the new ones. A run that fails after writing overlays says so
    in `summary.json` (`"complete": false` and the `"error"`).
    """
    if s.overlays not in ("all", "anomalous", "none"):
        raise ValueError(f"--overlays must be all, anomalous or none; got {s.overlays!r}.")
    schema.check_flags({"batch_size": s.batch_size, "threshold": s.threshold, **dict(s.requested)})
    root, files = list_images(s.images)
    # From the names alone, before any work: --labels=on without the layout is refused now.
    names = [relative_name(root, f) for f in files]
    labels = predict_labels.from_layout(root, names, s.labels, log)
    if s.support_dir is not None and not Path(s.support_dir).is_dir():
        raise FileNotFoundError(
            f"--support_dir {s.support_dir!r} is not a folder; pass the folder of good images "
            "the model was fitted on (its images are shown in the report), or drop the flag."
        )
    out_dir = open_output_dir(s.out, "--out", s.overwrite, "predictions")
    progress = {"scored": 0}
    try:
        return _predict(s, log, out_dir.path, root, files, progress, labels, profile)
    except BaseException as err:
        overlays = out_dir.path / "overlays"
        own = overlays.is_dir() and not overlays.is_symlink()
        if progress["scored"] == 0 and own and not any(overlays.iterdir()):
            overlays.rmdir()  # created by this run, nothing in it
        if not out_dir.discard_if_unused() and progress["scored"]:
            failed = {"complete": False, "error": f"{type(err).__name__}: {err}"}
            failed["scored_before_error"] = progress["scored"]
            write_output(out_dir.path, "summary.json", json_text(failed, indent=1) + "\n")
            log(
                f"predict stopped after {progress['scored']} image(s); {out_dir.path}/overlays "
                "holds their overlays, predictions.csv was not written (summary.json says so)"
            )
        raise


def _predict(
    s, log, out: Path, root: Path, files: list[Path], progress: dict, labels=None, profile=None
) -> dict[str, Any]:
    scorer, manifest = open_model(
        s.model,
        runtime=s.runtime,
        weights=s.weights,
        requested=requested_settings(dict(s.requested)),
        log=log,
        clip_dir=s.clip_dir,
    )
    meta = manifest["metadata"]
    thr = float(meta["threshold"]["value"]) if s.threshold is None else float(s.threshold)
    thr_note = (
        f"threshold {thr:.6g} given on the command line"
        if s.threshold is not None
        else threshold_lib.Threshold.from_dict(meta["threshold"]).describe()
    )
    lo, hi = meta["map_scale"]
    if s.threshold is not None and thr > lo:
        hi = thr  # red is "at or above the threshold used", also for an override
    hi = max(hi, lo + 1e-6)
    fuse_stream = None
    if s.calibrate_on_stream:
        if scorer.stream is None:
            raise ValueError(
                "--calibrate_on_stream needs a calibrated PatchCore+ model run by the library "
                "(--runtime=library) and fitted by this version (its held-out support scores): "
                "refit the model, or drop the flag."
            )
        gate = float(meta["thresholds"]["normal_only"]["value"])
        fuse_stream = scorer.stream.fuser(gate)
        log(
            "--calibrate_on_stream: the statistics learn from the images scored so far, in file "
            "order, after 8 images; images above the normal-only threshold are not learnt from"
        )
    if s.overwrite:
        clear_earlier_outputs(out, PREDICT_OUTPUTS, log)
    names = [relative_name(root, f) for f in files]
    if labels is not None:
        log(
            f"labels from the folders: {labels.labels.count(0)} good, "
            f"{labels.labels.count(1)} defective image(s) (--labels=off ignores them)"
        )
    rows: list[dict[str, Any]] = []
    items: list[tuple[dict[str, Any], Any]] = []  # (ReportItem fields, its thumbnail's future)
    typicals: list[float] = []  # each scored image's typical patch score (the support check)
    size = scorer.image_size
    t0 = time.time()
    scored = 0
    first = (0.0, 0)
    chunk = max(s.batch_size * 4, 1)
    stages = NO_STAGES if profile is None else profile
    # Up to a chunk of images waits for its outputs: the loop goes on to start the detector
    # on the next chunk instead of waiting for the writers.
    writer = _OutputWriter(out, lo, hi, thr, PREDICT_WORKERS, stages, limit=chunk)

    def finish(start, n_part, pixels, ok, errors, wait) -> None:
        """Outputs of one chunk, once its scores are back (the next chunk is on the detector)."""
        nonlocal scored, first
        scores, maps, typical = wait()
        ok_scored = len(ok)
        for j, i in enumerate(ok):
            index = start + i
            score = float(scores[j])
            if not math.isfinite(score):  # recorded with its reason, never as NaN / Infinity
                errors[i] = (
                    "the model gave a non-finite score "
                    f"({score}); its state is degenerate: refit the model"
                )
                ok_scored -= 1
                continue
            typicals.append(float(typical[j]))
            anomalous = score > thr
            link = None
            if s.overlays == "all" or (s.overlays == "anomalous" and anomalous):
                link = f"overlays/{_safe_stem(index, names[index])}.png"
            rows.append(
                {
                    "file": names[index],
                    "score": score,
                    "decision": _decision(anomalous),
                    "threshold": thr,
                    "error": "",
                    **_label_cells(labels, index, anomalous),
                }
            )
            fields = dict(name=names[index], score=score, anomalous=anomalous, link=link)
            job = writer.submit(pixels[j], maps[j], link, score, anomalous)
            items.append(({**fields, **_label_item(labels, index)}, job))
        for i, err in errors.items():
            rows.append(
                {
                    "file": names[start + i],
                    "score": None,
                    "decision": "unreadable" if i not in ok else "unscored",
                    "threshold": thr,
                    "error": err,
                    **_label_cells(labels, start + i, None),
                }
            )
            fields = dict(name=names[start + i], error=err, **_label_item(labels, start + i))
            items.append((fields, None))
        scored += ok_scored
        progress["scored"] = scored
        bar.update(n_part)
        if start == 0:  # the first chunk pays for compilation
            first = (time.time() - t0, scored)

    with (
        tqdm(total=len(files), disable=not s.progress, desc="predict", unit="img") as bar,
        writer,
    ):
        reader = read_chunks(
            files,
            size,
            s.strict,
            chunk,
            workers=PREDICT_WORKERS,
            stages=stages,
            resample=scorer.resample,
        )
        pending = None
        while True:
            try:
                with stages("wait for images"):
                    got = next(reader, None)
            except BaseException:  # --strict: the images before the bad one keep their outputs
                if pending is not None:
                    finish(*pending)
                raise
            if got is None:
                break
            start, pixels, ok, errors = got
            if fuse_stream is None:  # the detector starts on this chunk and runs on ...
                wait = submit_padded(scorer, pixels, s.batch_size, stages)
            else:  # padded to the compiled batch, then in file order, each image once
                with stages("detector (synchronous)", len(pixels)):
                    halves = padded(scorer.stream.halves, pixels, s.batch_size)
                    fused = [fuse_stream(*h) for h in halves]
                wait = functools.partial(_joined, fused, size)
            if pending is not None:  # ... while the previous chunk's outputs are written
                finish(*pending)
            pending = (start, len(ok) + len(errors), pixels, ok, errors, wait)
        if pending is not None:
            finish(*pending)
        with stages("wait for overlays"):
            report_items = [
                html_report.ReportItem(**f, thumbnail=None if job is None else job.result())
                for f, job in items
            ]
    seconds = time.time() - t0
    steady = (scored - first[1]) / max(seconds - first[0], 1e-9) if scored > first[1] else None
    check = support_check(meta, typicals, s.calibrate_on_stream)
    checked = isinstance(check, threshold_lib.TypicalCheck)
    check_line = check.describe() if checked else check
    if checked:
        log(check_line)
    rows.sort(key=lambda r: r["file"])
    fields = ["file", "score", "decision", "threshold", "error"]
    labelled = None
    if labels is not None:
        fields += list(LABEL_FIELDS)
        labelled = predict_labels.summarise(rows, thr)
        write_output(
            out,
            "summary.csv",
            csv_text(predict_labels.SUMMARY_FIELDS, predict_labels.summary_rows(labelled)),
        )
        log("with the labels from the folders:\n" + predict_labels.describe(labelled))
    with stages("CSV and JSONL writing"):
        write_output(out, "predictions.csv", csv_text(fields, rows))
        write_output(out, "predictions.jsonl", "".join(json_text(r) + "\n" for r in rows))
    flagged = sum(r["decision"] == "anomalous" for r in rows)
    settings = {
        "model": str(s.model),
        "images": str(s.images),
        "runtime": scorer.runtime,
        "method": meta["detector"].get("method"),
        "backbone": meta["backbone"]["name"],
        "weights": meta["backbone"]["weights"],
        "image_size": meta["image_size"],
        "support": meta["support"]["files"],
        "threshold": thr,
        "config": meta["config"],
        "package_version": manifest.get("package_version"),
    }
    thresholds = [("threshold", thr)]
    other = meta.get("thresholds", {})
    if "f1" in other and s.threshold is None:
        thresholds.append(("normal-only", float(other["normal_only"]["value"])))
    metrics = None
    if labelled is not None:
        auc = labelled["image_auroc"]
        metrics = {"image_auroc (%)": labelled["auroc_note"] if auc is None else round(auc, 2)}
        for label, what in (("good", "false alarms"), ("defective", "detected")):
            t = labelled[label]
            if t["scored"]:
                metrics[f"{label} images flagged ({what})"] = (
                    f"{t['flagged']} of {t['scored']} ({100 * t['flagged_rate']:.1f} %)"
                )
    with stages("report writing"):
        html_report.write_report(
            out / "report.html",
            report_items,
            title=f"predict: {s.images}",
            settings=settings,
            thresholds=thresholds,
            threshold_note=thr_note,
            metrics=metrics,
            notes=[
                _speed_line(scored, seconds, steady),
                check_line,
            ],
            legend=html_report.Legend(lo=lo, hi=hi, threshold=thr),
            per_folder=None if labelled is None else labelled["per_folder"],
            support=support_items(meta, s.support_dir, scorer.image_size, log),
            support_dir_given=s.support_dir is not None,
        )
    summary = {
        "images": len(files),
        "scored": scored,
        "anomalous": flagged,
        "unreadable": len(files) - scored,
        "threshold": thr,
        "seconds": seconds,
        "images_per_second": scored / max(seconds, 1e-9),
        "images_per_second_after_first_batch": steady,
        "runtime": scorer.runtime,
        "support_check": check.to_dict() if checked else {"note": check_line},
        "complete": True,
    }
    if labelled is not None:
        summary["labels"] = labelled
    write_output(out, "summary.json", json_text(summary, indent=1) + "\n")
    log(
        f"{scored} images scored, {flagged} anomalous, {len(files) - scored} unreadable; "
        f"{_speed_line(scored, seconds, steady)} ({scorer.runtime}); results in {out}/ "
        "(predictions.csv, predictions.jsonl, overlays/, report.html"
        + (", summary.csv)" if labelled is not None else ")")
    )
    return summary


def support_check(meta: dict[str, Any], typicals: list[float], on_stream: bool):
    """`threshold.typical_check` of the images scored, or a line saying why it did not run.

    It compares the images' typical patch scores with the fit's held-out
    support units (`model.json` `threshold_calibration.typical`). It does not
    apply under `--calibrate_on_stream` (the statistics follow the images),
    to models without those units (WinCLIP, or fitted before the check), or
    when no image was scored.
    """
    reference = meta.get("threshold_calibration", {}).get("typical")
    if on_stream:
        return "support check: not run (--calibrate_on_stream adapts the statistics to the images)"
    if not reference:
        return (
            "support check: not run (the model has no held-out typical scores: WinCLIP, or "
            "fitted before the check existed; refit to get it)"
        )
    finite = [t for t in typicals if math.isfinite(t)]
    if not finite:
        return "support check: not run (no image was scored)"
    return threshold_lib.typical_check(reference, finite)


# Threads that decode images ahead of the detector, and threads that encode its outputs.
PREDICT_WORKERS = 2
# zlib level of the overlay PNGs (`overlays.encode_png`): lossless at any level (the same
# pixels); level 1 encodes 5-8x faster than Pillow's default (BENCHMARKS.md, predict).
OVERLAY_PNG_LEVEL = 1


def _joined(results, size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not results:
        return np.zeros(0), np.zeros((0, *image_hw(size))), np.zeros(0)
    return tuple(np.concatenate(parts) for parts in zip(*results, strict=True))


def encode_overlay(picture: np.ndarray) -> bytes:
    """An overlay as PNG bytes (lossless): `overlays.encode_png` at `OVERLAY_PNG_LEVEL`.

    Level 6 (`bench_predict --sequential`) uses Pillow's encoder at its
    default (the sequential loop `bench_predict` compares with).
    """
    if OVERLAY_PNG_LEVEL == 6:
        buf = io.BytesIO()
        Image.fromarray(picture).save(buf, "PNG")
        return buf.getvalue()
    return encode_png(picture, OVERLAY_PNG_LEVEL)


class _InlineExecutor:
    """`ThreadPoolExecutor`'s `submit` and `shutdown`, running each call at once."""

    def submit(self, fn, *args) -> Future:
        job: Future = Future()
        try:
            job.set_result(fn(*args))
        except Exception as err:  # noqa: BLE001 - handed over as the pool would
            job.set_exception(err)
        return job

    def shutdown(self, wait: bool = True) -> None:
        del wait


class _OutputWriter:
    """Writes each scored image's overlay and makes its report thumbnail, in worker threads.

    `submit` returns a future of the image's `EncodedThumbnail`; at most
    `limit` images wait at once (the caller blocks beyond), so memory stays
    flat in the number of images. Leaving the `with` block waits for
    every submitted image (its overlay is on disk) and re-raises the first
    error (e.g. a full disk) unless another error is on its way already.
    """

    def __init__(self, out: Path, lo, hi, thr, workers: int, stages: Stages, limit: int):
        self.out, self.lo, self.hi, self.thr, self.stages = out, lo, hi, thr, stages
        # workers=0: each image's outputs are written by `submit` itself, in the caller's thread.
        self.pool = _InlineExecutor() if workers == 0 else ThreadPoolExecutor(workers)
        self.inflight: collections.deque = collections.deque()
        self.limit = max(limit, 1)

    def __enter__(self) -> _OutputWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.pool.shutdown(wait=True)
        if exc_type is None:
            for job in self.inflight:
                job.result()

    def submit(self, image, amap, link, score, anomalous):
        """Starts one image's outputs; returns the future of its thumbnail."""
        while len(self.inflight) >= self.limit:
            with self.stages("wait for overlays"):
                self.inflight.popleft().result()
        job = self.pool.submit(self._write, image, amap, link, score, anomalous)
        self.inflight.append(job)
        return job

    def _write(self, image, amap, link, score, anomalous) -> html_report.EncodedThumbnail:
        lo, hi, st = self.lo, self.hi, self.stages
        with st("colouring"):  # once for the overlay and the thumbnail
            norm = normalise(amap, lo, hi)
            colours = jet(norm)
        if link is not None:
            with st("overlay drawing"):
                picture = side_by_side(image, colours)  # = report.overlay without a mask
                picture = with_key(picture, lo, hi, self.thr, score, _decision(anomalous))
            with st("overlay encoding"):
                png = encode_overlay(picture)
            with st("overlay writing"):
                write_output(self.out, link, png)
        with st("thumbnail"):
            thumb = html_report.make_thumbnail(
                image, amap, lo, hi, normalised=norm, colours=colours
            )
            return html_report.encode_thumbnail(thumb)


LABEL_FIELDS = ("folder", "label", "wrong")


def _label_cells(labels, index: int, anomalous: bool | None) -> dict[str, Any]:
    """The label columns of one prediction row (none without labels)."""
    if labels is None:
        return {}
    truth = labels.labels[index]
    wrong = "" if anomalous is None else ("yes" if anomalous != bool(truth) else "no")
    return {
        "folder": labels.folders[index],
        "label": "defective" if truth else "good",
        "wrong": wrong,
    }


def _label_item(labels, index: int) -> dict[str, Any]:
    if labels is None:
        return {}
    return {"label": labels.labels[index], "group": labels.folders[index]}


def support_items(
    meta: dict[str, Any],
    support_dir: str | None,
    image_size,
    log: Callable[[str], None],
) -> list[html_report.SupportItem]:
    """The good images the model was fitted on, with their held-out scores, for the report.

    Names and scores come from `model.json`; a folder recorded there is never
    opened. With `--support_dir` (the user's folder on this machine), each
    recorded name is looked up in it (a name that would leave the folder is
    refused) and shown as a thumbnail when its SHA-256 matches the fitted file.
    """
    names = meta["support"]["files"]
    hashes = meta["support"].get("sha256") or [None] * len(names)
    cal = meta.get("threshold_calibration") or {}
    scores = cal.get("scores") or []
    outliers = set(cal.get("outliers") or [])
    if len(scores) != len(names):
        scores = [None] * len(names)
    # Images fit named as unlike the others and left out of the model.
    left = meta["support"].get("left_out") or []
    left_hashes = meta["support"].get("left_out_sha256") or [None] * len(left)
    left_scores = meta["support"].get("left_out_scores") or [None] * len(left)
    if not len(left) == len(left_hashes) == len(left_scores):
        left_hashes, left_scores = [None] * len(left), [None] * len(left)
    rows = [(n, d, sc, None) for n, d, sc in zip(names, hashes, scores, strict=True)]
    for name, digest, against in zip(left, left_hashes, left_scores, strict=True):
        why = "left out of the model: unlike the other good images"
        if against is not None:
            why += f" (scored {against:.3g} against them)"
        rows.append((name, digest, None, why))
    items = []
    missing = 0
    for name, digest, score, left_note in rows:
        thumb, note = None, left_note
        if support_dir is not None:
            try:
                path = safe_child(support_dir, name, "support file name in model.json")
                if not path.is_file():
                    note = "not found in --support_dir"
                elif digest is not None and model_dir.file_sha256(path) != digest:
                    note = "differs from the file fitted on (SHA-256)"
                else:
                    thumb = thumbnail(read_image(path, image_size), html_report.THUMB_SIZE)
            except (*IMAGE_ERRORS, model_dir.ModelFormatError) as e:
                note = f"not shown: {type(e).__name__}: {e}"
            missing += note is not None and note != left_note
        items.append(
            html_report.SupportItem(
                name=name,
                score=score,
                outlier=name in outliers or left_note is not None,
                thumbnail=thumb,
                note=note if note == left_note or left_note is None else f"{left_note}; {note}",
            )
        )
    if missing:
        log(f"--support_dir: {missing} of {len(names)} support image(s) not shown (see report)")
    return items


def _speed_line(scored: int, seconds: float, steady: float | None) -> str:
    line = f"{scored} images in {seconds:.1f} s: {scored / max(seconds, 1e-9):.2f} images/s"
    if steady is not None:
        line += f", {steady:.2f} images/s after the first batches (compilation)"
    return line


def _decision(anomalous: bool) -> str:
    return "anomalous" if anomalous else "good"
