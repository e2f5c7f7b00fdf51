r"""Compiled memory of `detect` and `refine_and_score` per batch size, and the largest batch.

Nothing runs: each program is lowered with abstract inputs
(`jax.ShapeDtypeStruct`) and compiled, and `compiled.memory_analysis()` gives
its argument, output and temporary (scratch) bytes. The total
`arguments + outputs + temp` grows linearly with the batch (every per-query
buffer scales with it); the slope and intercept of the two largest batches
give the largest batch whose total fits a memory size: 24 GB (this machine's
RAM), 80 GB and 141 GB (GPU sizes). "By the same accounting": the figures are
the CPU compiler's buffer assignment; a GPU compile fuses and schedules
differently (cuDNN workspaces, allocator slack), so on a GPU they are an
estimate until `experiments/gpu_check.sh` reads the real peak.

  python -m experiments.bench_memory --out=bench_memory.json
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from protorefine_jax import RefineConfig, make_detect
from protorefine_jax.pipeline import _refine_and_score_batch

CAPACITIES_GB = (24, 80, 141)


def memory_fields(compiled) -> dict[str, float]:
    """Argument, output, temp and total MiB of a compiled program."""
    ma = compiled.memory_analysis()
    arg, out, temp = ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.temp_size_in_bytes
    alias = getattr(ma, "alias_size_in_bytes", 0)
    return {
        "argument_mb": arg / 2**20,
        "output_mb": out / 2**20,
        "temp_mb": temp / 2**20,
        "total_mb": (arg + out + temp - alias) / 2**20,
    }


def largest_batch(rows: list[dict[str, Any]], capacity_gb: float) -> int | None:
    """Largest batch whose linear total `a + b * B` (two largest batches) fits `capacity_gb`."""
    (b1, t1), (b2, t2) = [
        (r["batch"], r["total_mb"]) for r in sorted(rows, key=lambda r: r["batch"])[-2:]
    ]
    slope = (t2 - t1) / (b2 - b1)
    if slope <= 0:
        return None
    cap = capacity_gb * 1e9 / 2**20
    return int((cap - (t2 - slope * b2)) // slope)


def detect_programs(backbone: str, aggregation: str, size: int, n: int):
    """`(name, lower(B))` of PatchCore and PatchCore+ `detect` on a random-weight backbone."""
    from experiments.bench_sections import random_host

    host = random_host(backbone, aggregation, size)
    ext = host.detector.extractor
    detect = make_detect(ext.extract)
    bank = jax.ShapeDtypeStruct((n, ext.feature_dim), jnp.float32)
    label = backbone if aggregation == "official" else f"{backbone} ({aggregation})"
    for method, refine in (("patchcore", False), ("patchcore+", True)):
        cfg = host.detector.config(use_refinement=refine)

        def lower(b, cfg=cfg):
            images = jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8)
            return detect.lower(host.params, bank, images, cfg)

        yield f"detect {label}", method, lower


def refine_programs(m: int, n: int, c: int):
    """`(name, lower(B))` of `refine_and_score` at the PatchCore+ shape."""
    side = int(np.sqrt(m))
    bank = jax.ShapeDtypeStruct((n, c), jnp.float32)
    for method, refine in (("patchcore", False), ("patchcore+", True)):
        cfg = RefineConfig(grid_shape=(side, side), use_refinement=refine)

        def lower(b, cfg=cfg):
            return _refine_and_score_batch.lower(
                bank, jax.ShapeDtypeStruct((b, m, c), jnp.float32), cfg
            )

        yield f"refine_and_score m={m} n={n} c={c}", method, lower


def run(batch_sizes: Sequence[int], backbones: Sequence[str]) -> dict[str, Any]:
    """Rows per (program, method, batch) and the largest batch per capacity."""
    programs = []
    for spec in backbones:
        name, agg = spec.split(":") if ":" in spec else (spec, "official")
        programs += list(detect_programs(name, agg, 256, 102))
    programs += list(refine_programs(1024, 102, 1024))
    rows, fits = [], []
    for case, method, lower in programs:
        mine = []
        for b in batch_sizes:
            t0 = time.perf_counter()
            compiled = lower(b).compile()
            row = {"case": case, "method": method, "batch": b, **memory_fields(compiled)}
            row["compile_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(row), flush=True)
            mine.append(row)
        rows += mine
        fit = {"case": case, "method": method}
        fit.update({f"max_batch_{gb}gb": largest_batch(mine, gb) for gb in CAPACITIES_GB})
        fits.append(fit)
    return {"rows": rows, "fits": fits, "backend": jax.default_backend()}


def markdown(result: dict[str, Any]) -> str:
    """The two tables of BENCHMARKS.md ("Memory")."""
    lines = ["| program | method | batch | arguments MB | outputs MB | temp MB | total MB |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        lines.append(
            f"| {r['case']} | {r['method']} | {r['batch']} | {r['argument_mb']:,.1f} | "
            f"{r['output_mb']:,.1f} | {r['temp_mb']:,.1f} | {r['total_mb']:,.1f} |"
        )
    lines += [
        "",
        "| program | method | " + " | ".join(f"max batch {g} GB" for g in CAPACITIES_GB) + " |",
    ]
    lines.append("|---|---|" + "---|" * len(CAPACITIES_GB))
    for f in result["fits"]:
        cells = " | ".join(f"{f[f'max_batch_{g}gb']:,}" for g in CAPACITIES_GB)
        lines.append(f"| {f['case']} | {f['method']} | {cells} |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    """Compiles every program and batch, prints the tables, writes JSON."""
    del argv
    f = flags.FLAGS
    result = run([int(b) for b in f.batch_sizes], f.backbones)
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(markdown(result))
    if f.out:
        with open(f.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    flags.DEFINE_list("batch_sizes", ["1", "8", "64", "256"], "Batch sizes to compile.")
    flags.DEFINE_list(
        "backbones",
        ["efficientnet_lite0:simple", "wide_resnet50_2:official"],
        "detect backbones as name:aggregation.",
    )
    flags.DEFINE_string("out", None, "JSON output path.")
    app.run(main)
