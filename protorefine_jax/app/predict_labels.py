"""Labels that `predict` reads from the folder layout, and what they say about the decisions.

A folder whose sub-folders are ``good/`` and one per defect type (the MVTec
test layout; also a category folder holding ``test/good``) labels each image
by its folder: ``good/`` good, any other folder defective. With such labels
`predict` reports, per folder, how many images were flagged; the AUROC of
the scores when both good and defective images were scored; and the wrong
decisions (good images flagged, defective images passed).

``--labels=auto`` (the default) uses the layout when every image lies in a
folder beside ``good/``; ``on`` requires it (an error says what is missing);
``off`` never reads labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from protorefine_jax.metrics import auroc

LABEL_MODES = ("auto", "on", "off")
GOOD = "good"


class LabelLayoutError(ValueError):
    """`--labels=on` on images whose folders do not give labels."""


@dataclasses.dataclass(frozen=True)
class Labels:
    """Labels of the images of a predict run, from their folders.

    Attributes:
      base: where the label folders are, relative to the images' root
        (`""`, or `"test"` for a category folder).
      folders: `[N]` the label folder of each image (`good`, `pitting`, ...).
      labels: `[N]` 0 good / 1 defective.
    """

    base: str
    folders: tuple[str, ...]
    labels: tuple[int, ...]


def _label_folder(name: str, base: str) -> str | None:
    """The folder that labels the relative name `name`, or None when it lies outside one."""
    parts = PurePosixPath(name).parts
    if base:
        if len(parts) < 3 or parts[0] != base:
            return None
        parts = parts[1:]
    return parts[0] if len(parts) >= 2 else None


def from_layout(
    root: str | Path, names: Sequence[str], mode: str = "auto", log=lambda _: None
) -> Labels | None:
    """Labels of `names` (relative to `root`) from the folder layout, or None.

    Args:
      root: the images' folder (a folder given to `--images`, or a glob's fixed part).
      names: the images, relative to `root` (POSIX).
      mode: `auto` (labels when the layout gives every image one), `on`
        (required) or `off` (never).
      log: where a note goes when `auto` finds `good/` but not every image in
        a label folder.

    Returns:
      The labels, or None (no labels: `off`, or `auto` without the layout).

    Raises:
      LabelLayoutError: `on` and the layout gives no labels (no `good/`
        folder, or images outside the label folders; the message names them).
      ValueError: an unknown mode.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"--labels must be one of {', '.join(LABEL_MODES)}; got {mode!r}.")
    if mode == "off":
        return None
    root = Path(root)
    if (root / GOOD).is_dir():
        base = ""
    elif (root / "test" / GOOD).is_dir():
        base = "test"
    else:
        if mode == "on":
            raise LabelLayoutError(
                f"--labels=on needs a good/ folder in {root} (or {root}/test/good) beside one "
                "folder per defect type, as in the MVTec layout; there is none. Fix: put the "
                "good images in good/ and the others in a folder per defect type, or pass "
                "--labels=off."
            )
        return None
    folders = [_label_folder(n, base) for n in names]
    outside = [n for n, f in zip(names, folders, strict=True) if f is None]
    if outside:
        if mode == "on":
            shown = ", ".join(outside[:5]) + (", ..." if len(outside) > 5 else "")
            where = f"{root / base}" if base else f"{root}"
            raise LabelLayoutError(
                f"--labels=on: {len(outside)} image(s) lie outside the label folders of {where} "
                f"(good/ and one folder per defect type): {shown}. Fix: move them into a "
                "folder, point --images at the folder of good/, or pass --labels=off."
            )
        log(
            f"note: {len(outside)} image(s) lie outside good/ and the defect folders (e.g. "
            f"{outside[0]}): no labels used. --labels=on says which."
        )
        return None
    labels = tuple(0 if f == GOOD else 1 for f in folders)
    return Labels(base=base, folders=tuple(folders), labels=labels)


def _rate(flagged: int, scored: int) -> float | None:
    return flagged / scored if scored else None


def summarise(rows: Sequence[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """What the labels say about the decisions of one predict run.

    Args:
      rows: the prediction rows with `file`, `score` (None when not scored),
        `decision`, `folder` and `label` (`"good"` / `"defective"`).
      threshold: the decision threshold used.

    Returns:
      A JSON-ready dict: `per_folder` (images, scored, flagged and the
      flagged rate of each folder, `good` first), `good` / `defective` totals
      (the flagged rate of good images is the false-alarm rate, of defective
      ones the detection rate), `image_auroc` (percent; None with one class
      only, and `auroc_note` says why), and `wrong_decisions`: the good
      images flagged and the defective images passed, most wrong first
      (file, folder, score).
    """
    per: dict[str, dict[str, Any]] = {}
    for r in rows:
        f = per.setdefault(
            r["folder"],
            {"folder": r["folder"], "label": r["label"], "images": 0, "scored": 0, "flagged": 0},
        )
        f["images"] += 1
        if r["score"] is not None:
            f["scored"] += 1
            f["flagged"] += r["decision"] == "anomalous"
    order = sorted(per, key=lambda name: (name != GOOD, name))
    per_folder = []
    for name in order:
        f = per[name]
        per_folder.append({**f, "flagged_rate": _rate(f["flagged"], f["scored"])})
    totals = {}
    for label in ("good", "defective"):
        members = [f for f in per_folder if f["label"] == label]
        scored = sum(f["scored"] for f in members)
        flagged = sum(f["flagged"] for f in members)
        totals[label] = {
            "images": sum(f["images"] for f in members),
            "scored": scored,
            "flagged": flagged,
            "flagged_rate": _rate(flagged, scored),
        }
    scored_rows = [r for r in rows if r["score"] is not None]
    y = np.array([r["label"] == "defective" for r in scored_rows], np.int64)
    s = np.array([r["score"] for r in scored_rows], np.float64)
    auc, note = None, None
    if y.size and 0 < y.sum() < y.size:
        auc = float(auroc(y, s))
    else:
        have = "defective" if y.size and y.all() else "good"
        note = f"AUROC needs good and defective images; only {have} images were scored"
    good_flagged = [r for r in scored_rows if r["label"] == "good" and r["decision"] == "anomalous"]
    defect_passed = [
        r for r in scored_rows if r["label"] == "defective" and r["decision"] == "good"
    ]
    good_flagged.sort(key=lambda r: -r["score"])
    defect_passed.sort(key=lambda r: r["score"])

    def brief(r):
        return {"file": r["file"], "folder": r["folder"], "score": r["score"]}

    return {
        "source": "folder layout: good/ is good, every other folder defective",
        "threshold": threshold,
        "per_folder": per_folder,
        **totals,
        "image_auroc": auc,
        "auroc_note": note,
        "wrong_decisions": {
            "count": len(good_flagged) + len(defect_passed),
            "good_flagged": [brief(r) for r in good_flagged],
            "defective_passed": [brief(r) for r in defect_passed],
        },
    }


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """`summary.csv` rows: one per folder, then the good and defective totals."""
    rows = [
        {k: f[k] for k in ("folder", "label", "images", "scored", "flagged", "flagged_rate")}
        for f in result["per_folder"]
    ]
    for label in ("good", "defective"):
        t = result[label]
        if t["images"]:
            rows.append({"folder": f"all {label}", "label": label, **t})
    return rows


SUMMARY_FIELDS = ("folder", "label", "images", "scored", "flagged", "flagged_rate")


def describe(result: dict[str, Any]) -> str:
    """Lines for the console: the flagged rate per folder, AUROC, wrong decisions."""
    lines = []
    for f in result["per_folder"]:
        rate = "-" if f["flagged_rate"] is None else f"{100 * f['flagged_rate']:.0f} %"
        lines.append(
            f"  {f['folder']}/ ({f['label']}): {f['flagged']} of {f['scored']} flagged ({rate})"
        )
    auc = result["image_auroc"]
    lines.append(f"  image AUROC {auc:.1f} %" if auc is not None else f"  {result['auroc_note']}")
    w = result["wrong_decisions"]
    lines.append(
        f"  wrong decisions: {len(w['good_flagged'])} good image(s) flagged, "
        f"{len(w['defective_passed'])} defective image(s) passed"
    )
    return "\n".join(lines)
