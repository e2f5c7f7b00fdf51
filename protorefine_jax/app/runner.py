"""The evaluation loop behind `experiments.eval`: importable, no flag parsing.

Per category and host, test features are extracted once and shared by every
shot count, seed and method; support features are cached per file, so the
nested support sets of `sample_support` cost one extraction per image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from protorefine_jax import calibration as calibration_lib
from protorefine_jax.app import advice, html_report, report, schema
from protorefine_jax.app.batching import BatchedDetector, device_mesh, stack, take
from protorefine_jax.app.methods import Method, get_method
from protorefine_jax.app.prefetch import prefetch
from protorefine_jax.data import load_dataset_category, make_synthetic_dataset, sample_support
from protorefine_jax.data.errors import EmptyMaskError
from protorefine_jax.data.registry import list_categories
from protorefine_jax.detectors import (
    PatchCore,
    bank_degenerate,
    bank_size,
    describe_banks,
    patchcore,
)
from protorefine_jax.io.paths import (
    OutputDir,
    clear_outputs,
    json_text,
    open_output,
    open_output_dir,
    write_output,
)
from protorefine_jax.metrics import evaluate, evaluate_known_masks


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run needs; `experiments.eval` fills it from flags."""

    dataset: str = "mvtec"
    data_dir: str | None = None
    data_source: str = "folder"
    tfds_dir: str | None = None
    require_masks: bool = False
    workdir: str | None = None
    overwrite: bool = False
    categories: tuple[str, ...] = ()
    shots: tuple[int, ...] = (1, 2, 4)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    methods: tuple[str, ...] = ("patchcore", "patchcore+")
    backbone: str = "efficientnet_lite0"
    aggregation: str | None = None
    pretrain_dim: int | None = None
    target_dim: int | None = None
    weights: str = ""
    clip_dir: str | None = None
    # One side (square) or (height, width): --image_size=256 or 224x544.
    image_size: int | tuple[int, int] | None = None
    alpha: float | None = None
    # RefineConfig fields; None keeps the detector's default.
    lam: float | None = None
    epsilon: float | None = None
    ridge: float | None = None
    ridge_wide: float | None = None
    lr: float | None = None
    num_iters: int | None = None
    sinkhorn_iters: int | None = None
    sinkhorn_mode: str | None = None
    warm_start: bool | None = None
    m_step: str | None = None
    optimizer: str | None = None
    inner_steps: int | None = None
    bank: str | None = None
    precision: str | None = None
    products: str | None = None
    online_capacity: int = 256
    online_add: int = 16
    batch_size: int = 8
    devices: int = 1
    num_heatmaps: int = 4
    synthetic_categories: tuple[str, ...] = ("fabric", "grain")
    synthetic_counts: tuple[int, ...] = (10, 10, 10)
    progress: bool = True


def check_settings(s: Settings) -> list[Method]:
    """Validates settings before any work; returns the methods."""
    methods = [get_method(m) for m in s.methods]
    if not methods:
        raise ValueError("--methods is empty; name at least one method.")
    if not s.shots or min(s.shots) < 1:
        raise ValueError(f"--shots must be positive integers, got {list(s.shots)}.")
    if not s.seeds:
        raise ValueError("--seeds is empty; give at least one seed.")
    if s.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {s.batch_size}.")
    if s.data_source not in ("folder", "tfds"):
        raise ValueError(f"--data_source must be folder or tfds, got {s.data_source!r}.")
    if s.data_source == "tfds" and not s.tfds_dir:
        raise ValueError(
            "--data_source=tfds needs --tfds_dir: the folder holding (or to hold) the prepared "
            "array_record files (protorefine_jax.data.tfds_builders)."
        )
    if s.dataset != "synthetic" and not s.data_dir:
        raise ValueError(
            f"--data_dir is required for dataset {s.dataset!r}: the folder holding the "
            "category folders (MVTec layout) or the VisA root."
        )
    families = {m.host for m in methods}
    if len(families) > 1 and (s.image_size is not None or s.alpha is not None):
        raise ValueError(
            "--image_size and --alpha apply to one host; this run mixes PatchCore and WinCLIP "
            "methods. Leave them unset (each host's default) or run the hosts separately."
        )
    if "winclip" in families and s.m_step == "closed_form":
        raise ValueError(
            "--m_step=closed_form exists for the squared Euclidean distance only; WinCLIP+ "
            "uses the cosine distance and needs --m_step=optax (its default)."
        )
    if any(m.host == "winclip" for m in methods) and not s.clip_dir:
        raise ValueError(
            "WinCLIP methods need --clip_dir: a local Hugging Face CLIP folder "
            "(config.json, model.safetensors, vocab.json, merges.txt); see README, 'CLIP weights'."
        )
    if len(s.synthetic_counts) != 3:
        raise ValueError("--synthetic_counts needs three numbers: train-good, test-good, defect.")
    return methods


# Every file `run` writes into the workdir: what `--overwrite` replaces.
OUTPUTS = (
    "results.json",
    "results.md",
    "config.json",
    "scores.jsonl",
    "heatmaps/*.png",
    "reports/*.html",
)


def prepare_workdir(workdir: str | None, overwrite: bool) -> OutputDir:
    """Checks and creates the output folder, before any reading or extraction.

    Refuses a non-empty folder unless `overwrite`, and a folder that cannot be
    written (`UnwritableDirError`, naming it). Nothing is removed here: the
    files of an earlier run go (`clear_earlier_run`) only once the data has
    been listed and checked, so a refused run leaves them in place.
    """
    return open_output_dir(
        workdir or time.strftime("runs/%Y%m%d-%H%M%S"), "--workdir", overwrite, "results"
    )


def clear_earlier_run(workdir: Path) -> None:
    """`--overwrite`: removes the files of `OUTPUTS` an earlier run left; keeps the rest.

    So that no heatmap, report page or score line of the earlier run mixes
    with the new ones. Files this tool does not write are never deleted; they
    are listed in a warning.
    """
    removed, kept = clear_outputs(workdir, OUTPUTS)
    for names, what in (
        (removed, "removed %d file(s) of an earlier run from %s: %s"),
        (kept, "kept %d file(s) in %s that eval does not write: %s"),
    ):
        if names:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            logging.warning("--overwrite: " + what, len(names), workdir, shown)


@contextlib.contextmanager
def dataset_root(s: Settings) -> Iterator[tuple[str, Path]]:
    """`(dataset kind, root)`; the synthetic set is generated into a temporary folder."""
    if s.dataset != "synthetic":
        yield s.dataset, Path(s.data_dir)
        return
    train, good, defect = s.synthetic_counts
    with tempfile.TemporaryDirectory(prefix="protorefine_synthetic_") as tmp:
        root = make_synthetic_dataset(
            tmp, s.synthetic_categories, train, good, defect, image_size=256, seed=0
        )
        yield "folder", root


# Refinement flags besides `lam` (which eval defines with the method's default).
REFINE_FIELDS = tuple(name for name in schema.REFINE_FLAGS if name != "lam")


def refine_fields(s: Settings) -> dict[str, Any]:
    """`RefineConfig` fields the settings set; unset ones keep the detector's defaults."""
    names = ("lam", *REFINE_FIELDS)
    return {name: getattr(s, name) for name in names if getattr(s, name) is not None}


def make_host(s: Settings, family: str) -> BatchedDetector:
    """The library detector of a method family, with its parameters, in batches."""
    if family == "patchcore":
        detector = PatchCore.create(
            s.backbone,
            s.aggregation,
            s.image_size or patchcore.IMAGE_SIZE,
            alpha=s.alpha,
            pretrain_dim=s.pretrain_dim,
            target_dim=s.target_dim,
        )
        mesh = device_mesh(s.devices, s.batch_size)  # before the weights: fails fast
        return BatchedDetector(detector, detector.load_params(s.weights), s.batch_size, mesh)
    from protorefine_jax.detectors.winclip import WinClip  # imports transformers: only here

    # Names the missing files if the folder is incomplete.
    detector, params = WinClip.from_folder(s.clip_dir, dataset=s.dataset, alpha=s.alpha)
    if s.image_size is not None and s.image_size != detector.image_size:
        raise ValueError(
            f"--image_size={s.image_size} but the CLIP model in {s.clip_dir} takes "
            f"{detector.image_size} px; pass --image_size={detector.image_size}."
        )
    return BatchedDetector(detector, params, s.batch_size, device_mesh(s.devices, s.batch_size))


def _cpu_model() -> str | None:
    """The CPU's model name from `/proc/cpuinfo` (None where there is none)."""
    if not os.path.exists("/proc/cpuinfo"):
        return None
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else None


def machine_info() -> dict[str, Any]:
    """Where (and under which load and thread settings) the numbers were measured."""
    dev = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    }


class SupportCache:
    """Support features per image file (and of its nuisance views), extracted once per category."""

    def __init__(self, host, data):
        self.host, self.data, self.feats, self.view_feats = host, data, {}, {}
        self.pseudo_feats: dict = {}

    def __call__(self, paths) -> Any:
        """`[k, ...]` features (a pytree for CLIP) of the support files `paths`."""
        todo = [p for p in paths if p not in self.feats]
        if todo:
            feats = self.host.features(self.data.load_images(todo))
            for i, p in enumerate(todo):
                self.feats[p] = take(feats, i)
        return stack([self.feats[p] for p in paths])

    def views(self, paths) -> Any:
        """`[k, V, ...]` features of the files' nuisance views; None if the detector uses none."""
        todo = [p for p in paths if p not in self.view_feats]
        if todo:
            feats = self.host.view_features(self.data.load_images(todo))
            for i, p in enumerate(todo):
                self.view_feats[p] = None if feats is None else feats[i]
        if any(self.view_feats[p] is None for p in paths):
            return None
        return np.stack([np.asarray(self.view_feats[p]) for p in paths])

    def pseudo(self, paths) -> Any:
        """`[n, P, ...]` pasted-defect features of the checked files among `paths` (or None).

        The checked files are `calibration.check_images(len(paths))` of the
        detector's hold-out budget; each file's copies are extracted once.
        """
        budget = self.host.detector.holdouts  # PatchCore's (the only detector with a check)
        chosen = [paths[i] for i in calibration_lib.check_images(len(paths), budget)]
        todo = [p for p in chosen if p not in self.pseudo_feats]
        for p in todo:
            feats = self.host.pseudo_features(self.data.load_images([p]))
            self.pseudo_feats[p] = None if feats is None else feats[0]
        if any(self.pseudo_feats[p] is None for p in chosen):
            return None
        return np.stack([np.asarray(self.pseudo_feats[p]) for p in chosen])


def load_data(s: Settings, dataset: str, root: Path, category: str, image_size: int = 256):
    """One category from the folders, or from prepared TFDS files (`--data_source=tfds`)."""
    if s.data_source == "tfds":
        from protorefine_jax.data.tfds_source import load_tfds_category

        return load_tfds_category(dataset, root, category, s.tfds_dir, image_size)
    return load_dataset_category(dataset, root, category, image_size, s.require_masks)


def load_test_set(data, host) -> dict[str, Any]:
    """Test features, masks, labels and names of one category (features once)."""
    feats, masks, labels, names, images = [], [], [], [], []
    # The next batch is decoded while the detector runs on this one.
    for batch in prefetch(data.test_batches(max(host.batch_size, 1) * 4)):
        feats.append(host.features(batch.images))
        masks.append(batch.masks)
        labels.append(batch.labels)
        images.append(batch.images)
        names.extend(data.name(item.path) for item in batch.items)
    return {
        # Decoded once per run: every method's overlays and report page reuse them (uint8,
        # a third of the features' size at 256 px with Lite0).
        "images": np.concatenate(images),
        # On the device once: every shot count, seed and method reuses it.
        "features": jax.device_put(jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *feats)),
        "masks": np.concatenate(masks),
        "labels": np.concatenate(labels),
        "names": names,
        # False for defective images without a mask (image-level labels only).
        "mask_known": np.array([t.mask_known for t in data.test], bool),
    }


def empty_masks(data, masks: np.ndarray, labels: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Indices of defective test images whose known mask has no defect pixel.

    Checked at the evaluation resolution (what the pixel metrics use): a file
    that is all zero, a mask saved as 0/1 instead of 0/255 (values at most the
    threshold, 127), or a defect smaller than one pixel after resizing.
    """
    return np.flatnonzero((labels == 1) & known & ~masks.reshape(len(masks), -1).any(axis=1))


def _mask_names(data, idx: np.ndarray) -> list[str]:
    names = []
    for i in idx:
        path = data.test[i].mask_path
        try:
            names.append(data.name(path))
        except ValueError:  # not under the category folder
            names.append(str(path))
    return names


def empty_mask_error(data, idx: np.ndarray) -> EmptyMaskError:
    """`--require_masks`: the error naming the first all-zero mask and the fix."""
    names = _mask_names(data, idx)
    return EmptyMaskError(
        f"The mask {data.root / names[0]} of defective test image "
        f"{data.name(data.test[idx[0]].path)} has no defect pixel (value > "
        f"{data.mask_threshold}) at {data.image_size} px ({len(names)} such mask(s) in "
        f"'{data.category}': {', '.join(names[:5])}). Fix: re-export the mask with the defect "
        "at 255 (masks saved as 0/1 read as empty), or move the image to test/good if it has "
        "no defect; without --require_masks such images count as defective for the image "
        "metrics and are left out of the pixel metrics, with a warning."
    )


def exclude_empty_masks(data, test: dict[str, Any], require_masks: bool) -> None:
    """All-zero masks of defective images: unknown masks (default), or an error.

    Default: such an image stays defective for the image metrics; its mask is
    not used for the pixel metrics (it would count the defect's pixels as
    normal). A warning names the files, and each result row records them
    (`empty_masks`, and `pixel_note`). With `require_masks` it is an
    `EmptyMaskError` (`check_data` finds these before any extraction; this
    catches a defect that vanishes only at the host's own resolution).
    """
    idx = empty_masks(data, test["masks"], test["labels"], test["mask_known"])
    if not len(idx):
        return
    if require_masks:
        raise empty_mask_error(data, idx)
    names = _mask_names(data, idx)
    logging.warning(
        "%s: %d defective test image(s) have a mask with no defect pixel at %s px (%s): counted "
        "defective for the image metrics, left out of the pixel metrics. Fix the masks "
        "(defect = 255; 0/1 masks read as empty), or pass --require_masks to make this an "
        "error.",
        data.category,
        len(idx),
        data.image_size,
        ", ".join(names[:5]) + (", ..." if len(names) > 5 else ""),
    )
    test["mask_known"][idx] = False
    test["empty_masks"] = names


def metrics_of(test: dict[str, Any], result) -> dict[str, Any]:
    """The protocol's metrics; pixel metrics over the known masks only (None without)."""
    if test["mask_known"].all():
        return evaluate(test["labels"], result.image_scores, test["masks"], result.maps)
    out = evaluate_known_masks(
        test["labels"], result.image_scores, test["masks"], result.maps, test["mask_known"]
    )
    empty = test.get("empty_masks", [])
    if empty:
        out["empty_masks"] = list(empty)
        missing = out["defective_images"] - out["defective_with_mask"] - len(empty)
        left_out = f"{len(empty)} with an all-zero mask (empty_masks)" + (
            f", {missing} without a mask file" if missing else ""
        )
        out["pixel_note"] = (
            f"pixel metrics over the {out['pixel_images']} images with a usable mask: "
            f"{out['defective_with_mask']} of {out['defective_images']} defective images and "
            f"every good image; left out: {left_out}"
            if out["defective_with_mask"]
            else f"no defective image has a usable mask ({left_out}): pixel metrics need masks"
        )
    return out


def heatmap_indices(labels: np.ndarray, count: int) -> np.ndarray:
    """Up to `count` defective test images, evenly spread, plus one normal one."""
    bad = np.flatnonzero(labels == 1)
    pick = bad[np.linspace(0, len(bad) - 1, min(count, len(bad))).round().astype(int)]
    good = np.flatnonzero(labels == 0)
    return np.concatenate([pick, good[:1]]) if count and len(good) else pick


def score_row(
    s: Settings, category: str, method: Method, k: int, support, state, result, seconds, labels
):
    """The results row of one (category, method, shots, seed)."""
    return {
        "dataset": s.dataset,
        "category": category,
        "method": method.name,
        "shots": k,
        "seed": support.seed,
        **result.metrics,
        "support": list(support.names),
        "bank_size": bank_size(state),
        "bank_degenerate": bank_degenerate(state),
        "banks": describe_banks(state),
        "score_seconds": seconds,
        **{f"{name}_max": float(np.max(v)) for name, v in result.diagnostics.items()},
        **calibration_error(result, labels),
    }


def calibration_error(result, labels: np.ndarray) -> dict[str, Any]:
    """Calibrated PatchCore+: the calibration's error on the normal test images (else nothing)."""
    if result.halves is None or not np.any(labels == 0):
        return {}
    normal = labels == 0
    halves = result.halves
    cal = halves["calibration"]
    if np.ndim(cal.host_loc):  # one calibration per image (stream): the normal images' rows
        cal = calibration_lib.ScoreCalibration(*(np.asarray(f)[normal] for f in cal))
    err = calibration_lib.calibration_error(halves["host"][normal], halves["refined"][normal], cal)
    return {"calibration_error": err}


class Outputs:
    """The files a run writes as it goes (rows, per-image scores, overlays).

    A context manager: `scores.jsonl` is created with the first row (a run
    refused before any result writes no empty file) and closed when the
    `with` block ends, on success or failure.
    """

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.rows: list[dict[str, Any]] = []
        self.scores = None

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.scores is not None:
            self.scores.close()

    def add(self, row: dict[str, Any], test: dict[str, Any], result) -> None:
        """Keeps the row and appends the per-image scores."""
        if self.scores is None:
            self.scores = open_output(self.workdir, "scores.jsonl")
        self.rows.append(row)
        line = {key: row[key] for key in (*report.GROUP_KEYS, "seed")}
        line.update(
            files=test["names"], labels=test["labels"].tolist(), scores=result.image_scores.tolist()
        )
        self.scores.write(json_text(line, null_nonfinite=True) + "\n")

    def overlays(self, prefix: str, data, test: dict[str, Any], shown, result) -> None:
        """Heatmap overlays of the `shown` test images, one colour scale per run."""
        value_range = (
            float(np.percentile(result.maps, 1)),
            float(np.percentile(result.maps, 99.9)),
        )
        report.save_overlays(
            self.workdir / "heatmaps",
            prefix,
            test["images"][shown],
            result.maps[shown],
            test["masks"][shown],
            [test["names"][i] for i in shown],
            value_range,
            root=self.workdir,
        )

    def page(self, prefix: str, data, test: dict[str, Any], result, row: dict[str, Any]) -> None:
        """`reports/<prefix>.html`: every test image of one run, with labels and metrics."""
        folder = self.workdir / "reports"
        keys = ("dataset", "category", "method", "shots", "seed", "support", "bank_size")
        html_report.write_eval_report(
            folder / f"{prefix}.html",
            title=f"eval: {row['category']} {row['method']} {row['shots']}-shot seed {row['seed']}",
            names=test["names"],
            labels=test["labels"],
            scores=result.image_scores,
            maps=result.maps,
            load_images=lambda idx: test["images"][idx],
            metrics=report.rounded_metrics(
                {k: v for k, v in row.items() if k in report.METRICS or k.startswith("pixel_")}
            )
            | {k: row[k] for k in ("defective_images", "defective_with_mask") if k in row},
            settings={k: row[k] for k in keys},
            root=self.workdir,
        )


def run_category(s, dataset, root, category, family, host, methods, out: Outputs, bar) -> dict:
    """Every shot count, seed and method of one host on one category.

    Returns:
      What the results should record about this host's configuration.
    """
    data = load_data(s, dataset, root, category, host.image_size)
    # The host's resize filter (WinCLIP: bicubic, as anomalib; PatchCore: bilinear).
    data = dataclasses.replace(data, resample=host.resample)
    host.prepare(category)
    bar.set_postfix_str(f"{category}: extracting test features ({family})")
    test = load_test_set(data, host)
    exclude_empty_masks(data, test, s.require_masks)
    support_features = SupportCache(host, data)
    streamed = any(m.stream_calibration for m in methods)  # needs the held-out support scores
    # The fit below is under the detector's default config.
    checked = host.detector.checks_refinement(host.detector.config())
    shown = heatmap_indices(test["labels"], s.num_heatmaps)
    online = {"capacity": s.online_capacity, "add_per_query": s.online_add}
    for k in s.shots:
        for seed in s.seeds:
            support = sample_support(data.train_good, k, seed, root=data.root)
            # PatchCore+'s refinement check: pasted defects against the views' variation.
            pseudo = support_features.pseudo(support.paths) if checked else None
            views = support_features.views(support.paths) if streamed or checked else None
            state = host.fit(
                support_features(support.paths), views, score_support=streamed, pseudo=pseudo
            )
            if bank_degenerate(state) and seed == s.seeds[0]:  # advice; the ranks: rows' "banks"
                configs = [host.config(refine_fields(s), m) for m in methods]
                refined = [c for c in configs if advice.refine_config(c).use_refinement]
                for line in advice.bank_advice(state.banks, (refined or configs)[0]):
                    logging.info("%s, %d-shot: %s", category, k, line)
            for method in methods:
                bar.set_postfix_str(f"{category} {k}-shot seed {seed} {method.name}")
                config = host.config(refine_fields(s), method)
                t0 = time.time()
                result = host.score(state, test["features"], method, config, online)
                seconds = time.time() - t0
                result.metrics = metrics_of(test, result)
                row = score_row(
                    s, category, method, k, support, state, result, seconds, test["labels"]
                )
                out.add(row, test, result)
                if seed == s.seeds[0] and k == s.shots[0] and len(shown):
                    out.overlays(f"{category}_{method.name}_{k}shot", data, test, shown, result)
                if seed == s.seeds[0] and k == s.shots[0]:
                    out.page(f"{category}_{method.name}_{k}shot", data, test, result, row)
                bar.update(1)
    return {"features": host.describe(), "alpha": host.alpha, "refine": refine_fields(s)}


def run(s: Settings) -> dict[str, Any]:
    """Runs the whole evaluation and writes the result files.

    Args:
      s: settings.

    Returns:
      The content of `results.json`.

    Every refusal of bad settings or data (bad category, too few good
    images, a one-class test set, an unwritable workdir; with
    `--require_masks`, a missing or all-zero mask) comes before the backbone
    is built and anything is extracted, and leaves no file behind: a new
    workdir is removed again, and with `--overwrite` an earlier run's files
    are only replaced once the data has passed these checks. A run that fails
    later keeps what it wrote and says so: `results.json` holds the rows so
    far with `"complete": false` and the `"error"`.
    """
    methods = check_settings(s)
    out_dir = prepare_workdir(s.workdir, s.overwrite)
    workdir = out_dir.path
    resolved = {"settings": dataclasses.asdict(s), "families": {}}
    out = Outputs(workdir)
    try:
        return _run(s, methods, workdir, resolved, out)
    except BaseException as err:
        _record_failure(out_dir, out, resolved, err)
        raise


def _record_failure(out_dir: OutputDir, out: Outputs, resolved, err: BaseException) -> None:
    """After a failed run: no empty new workdir; partial results marked as such."""
    if not out.rows:
        out_dir.discard_if_unused()
        return
    partial = {"rows": out.rows, "config": resolved, "complete": False}
    partial["error"] = f"{type(err).__name__}: {err}"
    report.write_json(out_dir.path / "results.json", partial)
    logging.warning(
        "the run stopped after %d result row(s); %s/results.json keeps them with "
        '"complete": false (scores.jsonl and heatmaps/ hold the same runs only).',
        len(out.rows),
        out_dir.path,
    )


def check_data(s: Settings, dataset: str, root: Path, categories: list[str]) -> None:
    """The cheap checks of every category, before any backbone is built.

    Listing only (no pixel decoded, except the masks with `--require_masks`):
    a bad category, too few good images for the largest shot count, a test
    set without both good and defective images, and, with `--require_masks`,
    a defective image whose mask has no defect pixel.
    """
    for category in categories:
        data = load_data(s, dataset, root, category)
        sample_support(data.train_good, max(s.shots), s.seeds[0], root=data.root)
        data.check_both_classes()
        if s.require_masks:  # every defective image has a mask file (else MissingMaskError)
            idx = np.flatnonzero(data.test_labels == 1)
            masks = data.load_masks([data.test[i] for i in idx])
            empty = idx[~masks.reshape(len(idx), -1).any(axis=1)]
            if len(empty):
                raise empty_mask_error(data, empty)


def _run(s: Settings, methods, workdir: Path, resolved, out: Outputs) -> dict[str, Any]:
    start = time.time()
    with out, dataset_root(s) as (dataset, root):
        categories = list(s.categories) or list(list_categories(dataset, root))
        if not categories:
            raise FileNotFoundError(f"no category folders (with train/good) found under {root}.")
        # Listing is cheap: fail on bad data before any work.
        check_data(s, dataset, root, categories)
        hosts = {f: make_host(s, f) for f in sorted({m.host for m in methods})}
        if s.overwrite:  # the inputs and the weights passed: now replace the earlier run
            clear_earlier_run(workdir)
        total = len(categories) * len(s.shots) * len(s.seeds) * len(methods)
        with tqdm(total=total, disable=not s.progress, desc="eval", unit="run") as bar:
            for category in categories:
                for family, host in hosts.items():
                    family_methods = [m for m in methods if m.host == family]
                    resolved["families"][family] = run_category(
                        s, dataset, root, category, family, host, family_methods, out, bar
                    )
                # Rows so far, so that a failure later does not lose them.
                partial = {"rows": out.rows, "config": resolved, "complete": False}
                report.write_json(workdir / "results.json", partial)
    summary = report.summarize(out.rows)
    table = report.markdown_table(summary, [m.name for m in methods])
    calibration_text = report.calibration_table(out.rows)
    if calibration_text:
        table += "\n" + calibration_text
    results = {
        "rows": out.rows,
        "summary": summary,
        "config": resolved,
        "machine": machine_info(),
        "wall_seconds": time.time() - start,
        "complete": True,
    }
    report.write_json(workdir / "results.json", results)
    report.write_json(workdir / "config.json", resolved)
    write_output(workdir, "results.md", table)
    print(table)
    print(f"results in {workdir}/ (results.json, results.md, scores.jsonl, heatmaps/, reports/)")
    return results
