"""Derived numbers and markdown of an `experiments.bench` result.

`ratios` pairs base and refined rows of the same section, case and batch;
`markdown` renders the whole result (machine line, one table per section,
ratios, profile, sharding, precision).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from experiments.bench_lib import columns, table

# Section whose `extract` row holds the feature extraction of a detect section.
_EXTRACT_SECTION = {"detect": "extract", "winclip": "winclip"}


def ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Refined / base time per (section, case, batch), with the backbone share.

    Args:
      rows: measured rows of the `refine`, `detect` and `winclip` sections
        (and `extract`, for the backbone's time per image).

    Returns:
      One entry per pair: base and refined ms per image, the ratio, and for
      `detect` (`winclip`) the ms per image of the `extract` row of the same
      backbone (CLIP model) and batch in the `extract` (`winclip`) section.
    """
    pairs = {"patchcore": "patchcore+", "winclip": "winclip+"}
    index = {(r["section"], r["case"], r["method"], r["batch"]): r for r in rows}
    out = []
    for (section, case, method, batch), base in index.items():
        refined = index.get((section, case, pairs.get(method), batch))
        if section not in ("refine", "detect", "winclip") or refined is None:
            continue
        entry = {
            "section": section,
            "case": case,
            "batch": batch,
            "base": method,
            "base_ms_per_image": base["ms_per_image"],
            "refined_ms_per_image": refined["ms_per_image"],
            "ratio": refined["median_s"] / base["median_s"],
            "ratio_of_min": refined["min_s"] / base["min_s"],
            "refined_images_per_s": refined["images_per_s"],
        }
        ext = index.get((_EXTRACT_SECTION.get(section), case, "extract", batch))
        if ext is not None:
            entry["extract_ms_per_image"] = ext["ms_per_image"]
            entry["backbone_pct_of_refined"] = 100 * ext["ms_per_image"] / refined["ms_per_image"]
        out.append(entry)
    return out


_TIMING = columns(
    "case=case, method=method, batch=batch, lower s=lower_s, compile s=compile_s, "
    "ms/img=ms_per_image, spread %=spread_pct, img/s=images_per_s, GFLOP/img=gflop_per_image, "
    "XLA GFLOP/img=xla_gflop_per_image, TFLOP/s=tflop_per_s, temp MB=temp_mb, peak MB=peak_mb"
)
_RATIOS = columns(
    "section=section, case=case, batch=batch, base=base, base ms/img=base_ms_per_image, "
    "refined ms/img=refined_ms_per_image, ratio=ratio, ratio of min=ratio_of_min, "
    "refined img/s=refined_images_per_s, backbone ms/img=extract_ms_per_image, "
    "backbone % of refined=backbone_pct_of_refined"
)
_SHARDING = columns(
    "case=case, method=method, devices=devices, batch=batch, ms/img=ms_per_image, "
    "img/s=images_per_s, speedup=speedup, efficiency=efficiency, "
    "run_sharded img/s=run_sharded_images_per_s, "
    "outputs sharded=output_sharded, rel diff vs 1 device=rel_diff_vs_1_device"
)
_PRECISION = columns(
    "category=category, method=method, precision=precision, "
    "max abs image diff=max_abs_image_diff, rel image diff=rel_image_diff, "
    "max abs map diff=max_abs_map_diff, rel map diff=rel_map_diff, "
    "image AUROC=image_auroc, pixel AUROC=pixel_auroc"
)
_SECTION_TITLES = {
    "extract": "Feature extraction",
    "refine": "`refine_and_score` alone",
    "detect": "End-to-end `detect` (PatchCore vs PatchCore+)",
    "winclip": "End-to-end WinCLIP vs WinCLIP+ `detect`",
}


def markdown(result: dict[str, Any]) -> str:
    """The whole result as markdown tables."""
    m = result["machine"]
    parts = [
        f"Machine: {m['device']} x{m['num_devices']} ({m['backend']}), "
        f"{m['cpu_count']} CPUs ({m['cpu_model']}), jax {m['jax']}, "
        f"load average at start {m['load_average']}, at end {result['load_average_end']}; "
        f"sections {', '.join(result['settings']['sections'])}; "
        f"{result['settings']['repeats']} timed repeats (median); wall {result['wall_s']:.0f} s."
    ]
    rows = result.get("rows", [])
    for section, title in _SECTION_TITLES.items():
        sel = [r for r in rows if r["section"] == section]
        if sel:
            parts.append(f"### {title}\n\n" + table(_TIMING, sel))
    if result.get("ratios"):
        title = "### Refined / base (same run, interleaved calls)\n\n"
        parts.append(title + table(_RATIOS, result["ratios"]))
    prof = result.get("profile")
    if prof:
        batch = result["settings"]["profile_batch"]
        parts.append(
            f"### Profile of the refinement (batch {batch})\n\n" + table(_TIMING, prof["rows"])
        )
        shapes = [k for k in ("patchcore_shape", "winclip_shape") if k in prof]
        keys = sorted({k for shape in shapes for k in prof[shape]})
        derived = [{"quantity": k, **{x: prof[x].get(k) for x in shapes}} for k in keys]
        cols = [("quantity (from min times)", "quantity")] + [(x, x) for x in shapes]
        parts.append(table(cols, derived))
    if result.get("sharding"):
        title = "### Scaling over devices (batch sharded)\n\n"
        parts.append(title + table(_SHARDING, result["sharding"]))
    prec = result.get("precision")
    if prec:
        title = f"### Precision vs float32 ({prec['features']['backbone']}, {prec['shots']}-shot)"
        parts.append(title + "\n\n" + table(_PRECISION, prec["rows"]))
    return "\n\n".join(parts) + "\n"
