"""Result files of an evaluation: summary over seeds, markdown table, overlays."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from protorefine_jax.app.overlays import colour_map
from protorefine_jax.data import aggregate_seeds
from protorefine_jax.io.paths import json_text, safe_filename, write_output

METRICS = ("image_auroc", "pixel_auroc", "image_f1_max", "pixel_f1_max", "aupro")
GROUP_KEYS = ("dataset", "category", "method", "shots")


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every metric, per (dataset, category, method, shots).

    A `"mean"` category row per (dataset, method, shots), when a run covers
    several categories: per seed the mean over categories, then the mean and
    std of that over seeds.

    Args:
      rows: per-seed result rows.

    Returns:
      Summary rows with `<metric>_mean`, `<metric>_std` and `num_seeds`.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in GROUP_KEYS), []).append(row)
    summary = []
    for key, members in groups.items():
        # Pixel metrics are None without masks (image-level labels only): left out.
        stats = aggregate_seeds(
            [{m: r[m] for m in METRICS if r.get(m) is not None} for r in members]
        )
        entry = dict(zip(GROUP_KEYS, key, strict=True), num_seeds=len(members))
        for metric, (mean, std) in stats.items():
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = mean, std
        summary.append(entry)
    categories = {s["category"] for s in summary}
    if len(categories) > 1:
        summary.extend(_category_means(rows))
    return summary


def _category_means(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`"mean"` rows: per seed the mean over categories, then mean and std over seeds."""
    per_seed: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["dataset"], row["method"], row["shots"], row["seed"])
        per_seed.setdefault(key, []).append(row)
    groups: dict[tuple, list[dict[str, float]]] = {}
    for (dataset, method, shots, _), members in per_seed.items():
        means = {
            m: float(np.mean([r[m] for r in members]))
            for m in METRICS
            if all(r.get(m) is not None for r in members)
        }
        groups.setdefault((dataset, method, shots), []).append(means)
    out = []
    for (dataset, method, shots), seeds in groups.items():
        entry = {"dataset": dataset, "category": "mean", "method": method, "shots": shots}
        entry["num_seeds"] = len(seeds)
        for metric, (mean, std) in aggregate_seeds(seeds).items():
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = mean, std
        out.append(entry)
    return out


def _fmt(value: float | None, signed: bool = False) -> str:
    """A percentage for people: one decimal (results.json keeps full precision)."""
    if value is None:
        return "-"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _ordered(summary: Sequence[dict[str, Any]], methods: Sequence[str] | None):
    """Summary rows by (dataset, category ("mean" last), shots, method order)."""
    order = list(methods or [])
    for s in summary:
        if s["method"] not in order:
            order.append(s["method"])
    return sorted(
        summary,
        key=lambda s: (
            s["dataset"],
            s["category"] == "mean",
            s["category"],
            s["shots"],
            order.index(s["method"]),
        ),
    )


def _references(rows: Sequence[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """The first method's row of each (dataset, category, shots) group (rows in table order)."""
    refs: dict[tuple, dict[str, Any]] = {}
    for s in rows:
        refs.setdefault((s["dataset"], s["category"], s["shots"]), s)
    return refs


def _delta(s: dict[str, Any], ref: dict[str, Any], metric: str) -> str:
    a, b = s.get(f"{metric}_mean"), ref.get(f"{metric}_mean")
    if s is ref:
        return "ref"
    return "-" if a is None or b is None else _fmt(a - b, signed=True)


def markdown_table(summary: Sequence[dict[str, Any]], methods: Sequence[str] | None = None) -> str:
    """The summary as markdown, for people: `mean ± std` (percent, one decimal) per metric.

    The last column is the image AUROC difference against the first method
    of the run (`methods` order) on the same data and shots (`ref` on its own
    row); a second table gives that difference for every metric. Means and
    differences are rounded here only: results.json keeps full precision.
    """
    rows = _ordered(summary, methods)
    refs = _references(rows)
    first = {r["method"] for r in refs.values()}
    against = f"vs {next(iter(first))}" if len(first) == 1 else "vs first method"
    head = ["dataset", "category", "shots", "method", "seeds", *METRICS, f"Δ image_auroc {against}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in rows:
        ref = refs[(s["dataset"], s["category"], s["shots"])]
        cells = [s["dataset"], s["category"], str(s["shots"]), s["method"], str(s["num_seeds"])]
        for metric in METRICS:
            mean = s.get(f"{metric}_mean")
            cells.append("-" if mean is None else f"{_fmt(mean)} ± {_fmt(s[f'{metric}_std'])}")
        cells.append(_delta(s, ref, "image_auroc"))
        lines.append("| " + " | ".join(cells) + " |")
    others = [s for s in rows if refs[(s["dataset"], s["category"], s["shots"])] is not s]
    if others:
        lines += [
            "",
            f"Difference {against} (percentage points; means over seeds, before rounding):",
            "",
            "| " + " | ".join(["dataset", "category", "shots", "method", *METRICS]) + " |",
            "|" + "---|" * (4 + len(METRICS)),
        ]
        for s in others:
            ref = refs[(s["dataset"], s["category"], s["shots"])]
            cells = [s["dataset"], s["category"], str(s["shots"]), s["method"]]
            cells += [_delta(s, ref, m) for m in METRICS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rounded_metrics(values: dict[str, Any], digits: int = 1) -> dict[str, Any]:
    """Metric values for a page people read: floats rounded (results.json keeps them whole)."""
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in values.items()}


def calibration_table(rows: Sequence[dict[str, Any]]) -> str:
    """Calibrated PatchCore+ rows: the calibration's error on the normal test images.

    Per (category, shots, method), the mean over seeds of each half's median
    z-score and IQR (0 and 1 when the support statistics describe new normal
    images) and the share of normal images whose score the refined half
    supplies. Empty when no row has it.
    """
    groups: dict[tuple, list[dict[str, float]]] = {}
    for r in rows:
        if "calibration_error" in r:
            key = (r["dataset"], r["category"], r["shots"], r["method"])
            groups.setdefault(key, []).append(r["calibration_error"])
    if not groups:
        return ""
    fields = ["host_shift", "host_iqr_ratio", "refined_shift", "refined_iqr_ratio", "refined_share"]
    head = ["dataset", "category", "shots", "method", *fields]
    lines = [
        "Calibration error on the normal test images (median z, IQR of z, refined share):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for key in sorted(groups):
        means = [f"{np.mean([e[f] for e in groups[key]]):.2f}" for f in fields]
        lines.append("| " + " | ".join([*map(str, key), *means]) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, obj: Any, root: Path | None = None) -> None:
    """Pretty strict JSON (numpy scalars converted, non-finite numbers as null).

    `root`: the output folder `path` lies in (default: its parent); written by
    `paths.write_output` (atomic, never through a symlink below `root`).
    """
    root = path.parent if root is None else root
    obj = json.loads(json.dumps(obj, default=_to_builtin))
    text = json_text(obj, null_nonfinite=True, indent=2)
    write_output(root, path.relative_to(root).as_posix(), text + "\n")


def _to_builtin(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot serialise {type(x).__name__}")


def overlay(image: np.ndarray, amap: np.ndarray, mask: np.ndarray, lo: float, hi: float):
    """Image | map overlay side by side, ground-truth outline in white.

    Args:
      image: `[S, S, 3]` uint8.
      amap: `[S, S]` anomaly map.
      mask: `[S, S]` bool ground truth.
      lo: map value drawn as blue (shared by all overlays of a run).
      hi: map value drawn as red.

    Returns:
      `[S, 2S, 3]` uint8.
    """
    blend = 0.5 * image / 255.0 + 0.5 * colour_map(amap, lo, hi)
    edge = mask & ~(
        np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    )
    blend[edge] = 1.0
    return np.concatenate([image, (blend * 255).astype(np.uint8)], axis=1)


def save_overlays(
    folder: Path,
    prefix: str,
    images: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray,
    names: Sequence[str],
    value_range: tuple[float, float],
    root: Path | None = None,
) -> list[str]:
    """Writes one overlay PNG per image; returns the file names.

    `root`: the output folder `folder` lies in (default: `folder`); files are
    written by `paths.write_output` (never through a symlink below `root`).
    """
    root = folder if root is None else root
    sub = folder.relative_to(root).as_posix()
    files = []
    for img, amap, mask, name in zip(images, maps, masks, names, strict=True):
        stem = name.replace("/", "_").rsplit(".", 1)[0]
        file = safe_filename(f"{prefix}_{stem}") + ".png"
        png = io.BytesIO()
        Image.fromarray(overlay(img, amap, mask, *value_range)).save(png, "PNG")
        write_output(root, file if sub == "." else f"{sub}/{file}", png.getvalue())
        files.append(file)
    return files
