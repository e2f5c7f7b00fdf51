"""Study stage 3: RESULTS.md from the stored cells and the narrative template.

The template (`experiments/research/results_template.md`) holds the reading of the
numbers; `{{name}}` placeholders are replaced by tables and figures computed
here from the cells, so the numbers in RESULTS.md always come from the store.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from experiments.research import study_cells as sc

TEMPLATE = Path(__file__).resolve().parent / "results_template.md"
METRICS = ("image_auroc", "pixel_auroc", "image_f1_max", "pixel_f1_max", "aupro")
SHORT = {
    "image_auroc": "img AUROC",
    "pixel_auroc": "pix AUROC",
    "image_f1_max": "img F1",
    "pixel_f1_max": "pix F1",
    "aupro": "AUPRO",
}
# SPEC 8's measured reference (image AUROC, metal_plate, 1/2/4 shots).
SPEC8_REF = {
    ("lite0-simple", "patchcore"): (80.6, 85.5, 97.4),
    ("lite0-simple", "patchcore+"): (90.5, 91.4, 83.3),
    ("lite0-simple", "W only"): (89.2, 90.8, 96.9),
    ("lite0-official1024", "patchcore"): (58.3, 63.5, 78.2),
    ("lite0-official1024", "patchcore+"): (69.7, 81.7, 97.7),
}


class Lookup:
    """Mean and std over seeds of the stored cells of a plan."""

    def __init__(self, store: sc.CellStore, seeds: tuple[int, ...]):
        self.store, self.seeds = store, seeds
        self.cells = {}
        for cell in sc.plan(sc.PARTS, seeds):
            self.cells.setdefault(
                (cell.part, cell.data, cell.features, cell.shots, cell.method), []
            ).append(cell)

    def values(self, part, data, feat, shots, method, metric) -> list[float]:
        """Per-seed values (missing cells are skipped)."""
        out = []
        for cell in self.cells.get((part, data, feat, shots, method), []):
            res = self.store.result(cell)
            if res is not None:
                out.append(res[metric])
        return out

    def fmt(self, part, data, feat, shots, method, metric="image_auroc", std=True) -> str:
        """`mean ± std` (n seeds if fewer than asked), or `-` when missing."""
        v = self.values(part, data, feat, shots, method, metric)
        if not v:
            return "-"
        text = f"{np.mean(v):.1f}" + (f" ± {np.std(v):.1f}" if std else "")
        return text if len(v) == len(self.seeds) else f"{text} (n={len(v)})"

    def mean(self, part, data, feat, shots, method, metric="image_auroc") -> float:
        """Mean over seeds (NaN when missing)."""
        v = self.values(part, data, feat, shots, method, metric)
        return float(np.mean(v)) if v else float("nan")


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def spec8_table(lk: Lookup) -> str:
    """Ours next to SPEC 8's numbers, same configuration."""
    rows = []
    for (feat, method), ref in SPEC8_REF.items():
        ours = [lk.fmt("spec8", "metal_plate", feat, k, method) for k in sc.SHOTS]
        rows.append([feat, method] + [f"{o} (SPEC {r})" for o, r in zip(ours, ref, strict=True)])
    return _table(["features", "method", "1-shot", "2-shot", "4-shot"], rows)


def main_summary(lk: Lookup, data: str) -> str:
    """Image / pixel AUROC per features x method x shots."""
    rows = []
    for feat in (f for f in sc.FEATURES if "1024" not in f):
        for method in sc.methods():
            cells = [
                f"{lk.fmt('main', data, feat, k, method, 'image_auroc')} / "
                f"{lk.fmt('main', data, feat, k, method, 'pixel_auroc', std=False)}"
                for k in sc.SHOTS
            ]
            rows.append([feat, method, *cells])
    return _table(["features", "method", "1-shot", "2-shot", "4-shot"], rows)


# Test images (defective, good) per dataset: AUROC resolution is 1 / (pos * neg).
TEST_COUNTS = {"metal_plate": (71, 26), "bottle": (8, 20)}


def pairs_table(lk: Lookup, data: str) -> str:
    """Misordered (defective, good) image pairs, PatchCore vs PatchCore+, per seed.

    `(1 - AUROC) * pos * neg` (ties count half): near the ceiling, the
    difference between two methods is a handful of pairs.
    """
    pos, neg = TEST_COUNTS[data]
    rows = []
    for feat in (f for f in sc.FEATURES if "1024" not in f):
        for k in sc.SHOTS:
            cells = []
            for method in ("patchcore", "patchcore+"):
                v = lk.values("main", data, feat, k, method, "image_auroc")
                cells.append(" ".join(f"{(100 - a) / 100 * pos * neg:.1f}" for a in v) or "-")
            rows.append([feat, str(k), *cells])
    return _table(
        ["features", "shots", f"patchcore (of {pos * neg}), per seed", "patchcore+, per seed"],
        rows,
    )


def main_full(lk: Lookup, data: str, shots: int) -> str:
    """Every metric, mean ± std over seeds, one shot count."""
    rows = []
    for feat in (f for f in sc.FEATURES if "1024" not in f):
        for method in sc.methods():
            rows.append(
                [feat, method] + [lk.fmt("main", data, feat, shots, method, m) for m in METRICS]
            )
    return _table(["features", "method"] + [SHORT[m] for m in METRICS], rows)


def ridge_table(lk: Lookup) -> str:
    """Ridge x shots for PatchCore+ and W only, with the host baseline."""
    rows = []
    for data in sc.DATA:
        for feat in ("lite0-simple", "lite0-official"):
            base = [lk.fmt("main", data, feat, k, "patchcore") for k in sc.SHOTS]
            rows.append([data, feat, "patchcore", *base])
            shipped = [lk.fmt("main", data, feat, k, "patchcore+") for k in sc.SHOTS]
            rows.append([data, feat, "patchcore+ (shipped: ridge_wide)", *shipped])
            for r in (1e-4, 1e-2, 1e-1):
                for m in ("patchcore+", "W only"):
                    label = f"{m} ridge={r}"
                    rows.append(
                        [data, feat, label]
                        + [lk.fmt("ridge", data, feat, k, label) for k in sc.SHOTS]
                    )
    return _table(["data", "features", "method", "1-shot", "2-shot", "4-shot"], rows)


def _sweep_labels() -> dict[str, list[tuple[str, float]]]:
    out: dict[str, list[tuple[str, float]]] = {}
    for cell in sc.plan(("sweeps",), (0,)):
        if cell.method.startswith("patchcore") or " warm=" in cell.method:
            continue
        name, value = cell.method.split("=")
        out.setdefault(name, [])
        if (cell.method, float(value)) not in out[name]:
            out[name].append((cell.method, float(value)))
    return out


def sweep_tables(lk: Lookup) -> str:
    """One row per swept value: image / pixel AUROC and Sinkhorn error."""
    parts = []
    feat, k = sc.DEFAULT_FEATURES, 2
    for name, entries in _sweep_labels().items():
        rows = []
        for label, value in entries:
            host = f"patchcore alpha={value:g}" if name == "alpha" else "patchcore"
            base = lk.fmt("sweeps", "metal_plate", feat, k, host)
            rows.append(
                [
                    label,
                    lk.fmt("sweeps", "metal_plate", feat, k, label),
                    lk.fmt("sweeps", "metal_plate", feat, k, label, "pixel_auroc"),
                    f"{lk.mean('sweeps', 'metal_plate', feat, k, label, 'marginal_error_max'):.1e}",
                    base,
                ]
            )
        parts.append(
            f"**{name}**\n\n"
            + _table(
                ["setting", "img AUROC", "pix AUROC", "max marginal err", "patchcore img AUROC"],
                rows,
            )
        )
    return "\n\n".join(parts)


def sinkhorn_table(lk: Lookup) -> str:
    """Iterations x warm start: marginal error and AUROC."""
    rows = []
    for cell in sc.plan(("sweeps",), (0,)):
        if " warm=" not in cell.method:
            continue
        m = cell.method
        args = ("sweeps", "metal_plate", sc.DEFAULT_FEATURES, 2, m)
        rows.append(
            [
                m,
                f"{lk.mean(*args, 'marginal_error_max'):.1e}",
                f"{lk.mean(*args, 'marginal_error_median'):.1e}",
                lk.fmt(*args),
                lk.fmt(*args, "pixel_auroc"),
                f"{lk.mean(*args, 'seconds'):.1f}",
            ]
        )
    return _table(
        [
            "setting",
            "max marg. err",
            "median marg. err",
            "img AUROC",
            "pix AUROC",
            "s / 97 queries",
        ],
        rows,
    )


def optax_table(store: sc.CellStore) -> str:
    """Relative distance of optax M-steps to the closed form, per step count."""
    data = store.meta.get("optax")
    if not data:
        return "(not computed)"
    head = ["optimizer"] + [str(s) for s in data["steps"]]
    rows = [
        [name] + [f"{v:.1e}" for v in vals]
        for name, vals in data.items()
        if isinstance(vals, list) and name != "steps"
    ]
    return _table(head, rows)


def timing_table(lk: Lookup) -> str:
    """Scoring seconds per query image (metal_plate, 97 queries), per method."""
    rows = []
    for method in sc.methods():
        # Median over seeds: the first seed's cell also pays the XLA compile.
        v = [
            np.median(lk.values("main", "metal_plate", sc.DEFAULT_FEATURES, k, method, "seconds"))
            / 97.0
            if lk.values("main", "metal_plate", sc.DEFAULT_FEATURES, k, method, "seconds")
            else float("nan")
            for k in sc.SHOTS
        ]
        rows.append([method] + [f"{x * 1000:.0f} ms" for x in v])
    return _table(["method", "1-shot", "2-shot", "4-shot"], rows)


def sweep_figure(lk: Lookup, path: Path) -> str:
    """PNG of image AUROC vs each swept hyper-parameter (paper Fig. 8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _sweep_labels()
    fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 3.0))
    feat, k = sc.DEFAULT_FEATURES, 2
    base = lk.mean("sweeps", "metal_plate", feat, k, "patchcore")
    for ax, (name, entries) in zip(np.atleast_1d(axes), labels.items(), strict=True):
        xs = np.array([v for _, v in entries])
        plotted = False
        for metric, style in (("image_auroc", "o-"), ("pixel_auroc", "s--")):
            ys = np.array(
                [lk.mean("sweeps", "metal_plate", feat, k, lab, metric) for lab, _ in entries]
            )
            ok = np.isfinite(ys)
            if ok.any():
                ax.plot(xs[ok], ys[ok], style, label=metric.replace("_", " "))
                plotted = True
        if np.isfinite(base):
            ax.axhline(base, color="gray", lw=1, label="patchcore img")
        if plotted and xs.min() > 0 and xs.max() / xs.min() > 20:
            ax.set_xscale("log")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle("metal_plate, 2-shot, lite0-official, 5 seeds: AUROC (%) vs hyper-parameter")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"![hyper-parameter sweeps]({path.as_posix()})"


def shots_figure(lk: Lookup, path: Path) -> str:
    """PNG: image AUROC vs shots, PatchCore vs PatchCore+, per features and data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feats = [f for f in sc.FEATURES if "1024" not in f]
    fig, axes = plt.subplots(1, len(sc.DATA), figsize=(5.5 * len(sc.DATA), 3.4))
    for ax, data in zip(np.atleast_1d(axes), sc.DATA, strict=True):
        for i, feat in enumerate(feats):
            color = f"C{i}"
            for method, style in (("patchcore", "--"), ("patchcore+", "-")):
                ys = [lk.mean("main", data, feat, k, method) for k in sc.SHOTS]
                ax.plot(sc.SHOTS, ys, style, color=color, marker="o", label=f"{feat} {method}")
        ax.set_title(data)
        ax.set_xlabel("shots")
        ax.set_ylabel("image AUROC (%)")
        ax.set_xticks(sc.SHOTS)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"![PatchCore vs PatchCore+ by shots]({path.as_posix()})"


def meta_line(store: sc.CellStore) -> str:
    """Machine and wall time of the last run that computed cells."""
    m = store.meta.get("last_run", {})
    total = sum(r.get("seconds", 0.0) for r in store.cells.values())
    return (
        f"Measured on {m.get('machine', '?')} ({m.get('cpus', '?')} CPUs, backend "
        f"{m.get('backend', '?')}, jax {m.get('jax', '?')}), {m.get('date', '?')}; "
        f"{len(store.cells)} cells, {total / 60:.0f} min of refinement+scoring time in total "
        f"(last run's wall time {m.get('seconds', 0) / 60:.0f} min, feature extraction included)."
    )


def render(store: sc.CellStore, figures_dir: Path, seeds: tuple[int, ...]) -> str:
    """RESULTS.md text: the template with every placeholder filled."""
    lk = Lookup(store, seeds)
    fills: dict[str, Callable[[], str]] = {
        "meta": lambda: meta_line(store),
        "spec8": lambda: spec8_table(lk),
        "ridge": lambda: ridge_table(lk),
        "sweeps": lambda: sweep_tables(lk),
        "sinkhorn": lambda: sinkhorn_table(lk),
        "optax": lambda: optax_table(store),
        "timing": lambda: timing_table(lk),
        "figure_sweeps": lambda: sweep_figure(lk, figures_dir / "sweeps.png"),
        "figure_shots": lambda: shots_figure(lk, figures_dir / "shots.png"),
    }
    for data in sc.DATA:
        fills[f"main_{data}"] = lambda d=data: main_summary(lk, d)
        fills[f"pairs_{data}"] = lambda d=data: pairs_table(lk, d)
        for k in sc.SHOTS:
            fills[f"full_{data}_{k}"] = lambda d=data, k=k: main_full(lk, d, k)
    text = TEMPLATE.read_text()

    def sub(match: re.Match) -> str:
        name = match.group(1)
        if name not in fills:
            raise KeyError(f"unknown placeholder {{{{{name}}}}} in {TEMPLATE}")
        return fills[name]()

    return re.sub(r"\{\{(\w+)\}\}", sub, text)
