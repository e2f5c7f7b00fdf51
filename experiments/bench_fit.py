r"""Where `fit`'s time goes, at several numbers of good images (issue 28).

Runs `deploy.fit_model` (what `python -m experiments.fit` runs) once per
support size `k`, each in a fresh process (compilation included, as a user
meets it), and splits its wall time into stages by wrapping the functions
that do the work (exclusive times: a stage nested in another is not counted
twice):

- `read`: decoding and resizing the support images (`deploy.read_batch`);
- `backbone`: the support images' features (`PatchCore.features`);
- `views`: the nuisance views, warping and their backbone passes
  (`PatchCore.view_features`);
- `bank`: the deployed bank (`build_bank`);
- `coreset`: the hold-out banks: every other greedy coreset (exact
  hold-outs), or the banks cut from the deployed one (`calibration.cover`,
  `calibration.shared_banks`, above `HoldoutBudget.exact_max` images);
- `hold-outs`: the hold-outs' host and refined scoring (above `exact_max`
  the cross-image host scores too);
- `cross`: the exact cross-image hold-outs (their coresets included);
- `support maps`: the support images scored by the fitted detector (the
  map colour scale);
- `other`: the rest (threshold, metadata, writing the model).

`coreset_calls` counts greedy coreset selections of the whole fit.

  python -m experiments.bench_fit --shots=2,8,16,32,50 --out=bench_fit.json
  # 200 good images: metal_plate has 54, so the pool is repeated (copies
  # named apart in a temporary folder; identical images, the same cost)
  python -m experiments.bench_fit --shots=200 --repeat_pool
  # the fastest-growing parts alone, at 200 images (features repeated)
  python -m experiments.bench_fit --probe=200

The support folder defaults to metal_plate's good training images
(`/work/shared/data/mpdd/metal_plate/train/good`).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from absl import flags

DEFAULT_SUPPORT = "/work/shared/data/mpdd/metal_plate/train/good"
STAGES = (
    "read",
    "backbone",
    "views",
    "bank",
    "coreset",
    "hold-outs",
    "cross",
    "support maps",
    "other",
)

FLAGS = flags.FlagValues()
flags.DEFINE_list("shots", "2,8,16,32,50", "Support sizes k to fit.", flag_values=FLAGS)
flags.DEFINE_string("support_dir", DEFAULT_SUPPORT, "Folder of good images.", flag_values=FLAGS)
flags.DEFINE_bool(
    "repeat_pool",
    False,
    "When k exceeds the folder's images, repeat them (copies in a temporary folder).",
    flag_values=FLAGS,
)
flags.DEFINE_string("image_size", "256", "Input size.", flag_values=FLAGS)
flags.DEFINE_string("out", "", "Optional JSON of every row.", flag_values=FLAGS)
flags.DEFINE_integer("child", 0, "Internal: fit this k in this process.", flag_values=FLAGS)
flags.DEFINE_integer(
    "probe",
    0,
    "Instead of fits: time the parts of a fit of this many images that grow fastest (the "
    "deployed bank's coreset, the cover, the quadrant banks, one refined quadrant), on the "
    "folder's features repeated (with a 1e-3 jitter, so the greedy loop meets no duplicates).",
    flag_values=FLAGS,
)


class StageTimer:
    """Exclusive wall time per stage: each wrapped call's time minus its wrapped callees'."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list] = []

    def wrap(self, label: str, fn: Callable, inherit: bool = False) -> Callable:
        """`fn` timed under `label` (`inherit`: under the caller's stage when nested)."""
        import jax

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name = self._stack[-1][0] if inherit and self._stack else label
            self._stack.append([name, 0.0])
            t0 = time.perf_counter()
            try:
                out = jax.block_until_ready(fn(*args, **kwargs))
            finally:
                took = time.perf_counter() - t0
                _, inner = self._stack.pop()
                self.seconds[name] = self.seconds.get(name, 0.0) + took - inner
                self.calls[label] = self.calls.get(label, 0) + 1
                if self._stack:
                    self._stack[-1][1] += took
            return out

        return timed


def _patch(timer: StageTimer) -> None:
    """Wraps the stage functions of whichever code is imported (missing ones are skipped)."""
    from protorefine_jax import calibration
    from protorefine_jax.app import deploy
    from protorefine_jax.detectors import patchcore

    targets: list[tuple[Any, str, str, bool]] = [
        (deploy, "read_batch", "read", False),
        (patchcore.PatchCore, "features", "backbone", True),
        (patchcore.PatchCore, "view_features", "views", False),
        (patchcore.PatchCore, "score", "support maps", False),
        (patchcore, "build_bank", "bank", False),
        (calibration, "held_out_units", "hold-outs", False),
        (calibration, "cross_image_units", "cross", False),
        (calibration, "shared_held_out", "hold-outs", False),
        (calibration, "cover", "coreset", False),
        (calibration, "shared_banks", "coreset", False),
    ]
    for owner, attr, label, inherit in targets:
        if hasattr(owner, attr):
            setattr(owner, attr, timer.wrap(label, getattr(owner, attr), inherit))
    # The hold-outs' coresets are their own stage; the cross-image ones stay in `cross`.
    coreset_in_cross = timer.wrap("cross", calibration.greedy_coreset)
    coreset_alone = timer.wrap("coreset", calibration.greedy_coreset)

    def coreset(*a, **kw):
        inside_cross = bool(timer._stack) and timer._stack[-1][0] == "cross"
        return (coreset_in_cross if inside_cross else coreset_alone)(*a, **kw)

    calibration.greedy_coreset = coreset
    # Every greedy selection (bank, hold-outs, cross) counts in `coreset_calls`.
    from protorefine_jax import coreset as coreset_lib

    counted = coreset_lib.greedy_coreset_indices

    def count(*a, **kw):
        timer.calls["greedy_coreset_indices"] = timer.calls.get("greedy_coreset_indices", 0) + 1
        return counted(*a, **kw)

    for module in (coreset_lib, sys.modules.get("protorefine_jax.pipeline")):
        if module is not None and hasattr(module, "greedy_coreset_indices"):
            module.greedy_coreset_indices = count


def fit_once(k: int, support_dir: str, image_size: str) -> dict[str, Any]:
    """One fit of `k` images (the CLI's defaults); its stage split and total seconds."""
    import numpy as np

    from protorefine_jax.app import deploy
    from protorefine_jax.app.runner import machine_info

    timer = StageTimer()
    _patch(timer)
    n_pool = len(deploy.list_images(support_dir)[1])
    with tempfile.TemporaryDirectory() as tmp:
        settings = deploy.FitSettings(
            support_dir=support_dir,
            out=os.path.join(tmp, "model"),
            shots=k if k < n_pool else 0,
            image_size=deploy.parse_image_size(image_size),
            progress=False,
        )
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        meta = deploy.fit_model(settings, log=lambda _: None)
        total = time.perf_counter() - t0
    split = {s: round(timer.seconds.get(s, 0.0), 2) for s in STAGES[:-1]}
    split["other"] = round(total - sum(timer.seconds.values()), 2)
    return {
        "k": k,
        "total_s": round(total, 2),
        "split_s": split,
        "coreset_calls": timer.calls.get("greedy_coreset_indices", 0),
        "threshold": meta["threshold"]["value"],
        "outliers": meta["threshold_calibration"]["outliers"],
        "load_average": [round(load0, 2), *[round(x, 2) for x in os.getloadavg()]],
        "machine": machine_info(),
        "held_out_mean": float(np.mean(meta["threshold_calibration"]["scores"])),
    }


def probe(k: int, support_dir: str) -> dict[str, Any]:
    """Seconds of the fastest-growing parts of a fit of `k` images (`--probe`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from protorefine_jax import calibration
    from protorefine_jax.app import deploy
    from protorefine_jax.coreset import greedy_coreset
    from protorefine_jax.padding import fixed_batches

    s = deploy.FitSettings(support_dir=support_dir, progress=False)
    _, files = deploy.list_images(support_dir)
    images, _, _ = deploy.read_batch(files, s.image_size, strict=True)
    detector, params, config = deploy.build_detector(s)
    feats = np.concatenate(
        [np.asarray(detector.features(params, b)) for b, _ in fixed_batches(images, 8)]
    )[: len(files)]
    feats = np.concatenate([feats] * -(-k // len(feats)))[:k]
    feats = feats + 1e-3 * np.random.default_rng(0).standard_normal(feats.shape, np.float32)
    m, c = feats.shape[1:]
    flat = jnp.asarray(feats.reshape(-1, c))
    out: dict[str, Any] = {"k": k, "load_before": os.getloadavg()[0]}
    t0 = time.perf_counter()
    centres = np.asarray(greedy_coreset(flat, detector.alpha))
    out["bank_coreset_s"] = time.perf_counter() - t0
    out["bank_rows"] = int(centres.size)
    t0 = time.perf_counter()
    cov = calibration.cover(flat, detector.alpha, centres)
    out["cover_s"] = time.perf_counter() - t0
    quads = calibration.quadrant_rows(detector.extractor.grid)
    t0 = time.perf_counter()
    banks = calibration.shared_banks([i * m + quads[0] for i in range(k)], detector.alpha, cov)
    out["quadrant_banks_s_per_quadrant_position"] = time.perf_counter() - t0
    cfg = calibration._holdout_config(k * m, c, detector.alpha, config)
    query = jnp.asarray(feats[:1, quads[0]])
    for name in ("refined_quadrant_first_s", "refined_quadrant_s"):
        t0 = time.perf_counter()
        jax.block_until_ready(
            calibration._refined_against(flat, banks.rows[:1], banks.used[:1], query, cfg)
        )
        out[name] = time.perf_counter() - t0
    out["budget_units"] = calibration.budget_units(16, centres.size)
    out["load_after"] = os.getloadavg()[0]
    return {key: round(v, 2) if isinstance(v, float) else v for key, v in out.items()}


def pool_folder(support_dir: str, k: int, tmp: str) -> str:
    """A folder of `k` images: `support_dir`'s, repeated (copies named apart) when fewer."""
    from protorefine_jax.app import deploy

    _, files = deploy.list_images(support_dir)
    if k <= len(files):
        return support_dir
    for i in range(k):
        src = files[i % len(files)]
        shutil.copyfile(src, os.path.join(tmp, f"{i:04d}_{src.name}"))
    return tmp


def markdown_rows(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table: k, total, each stage, coreset calls, load."""
    head = "| k | total s | " + " | ".join(STAGES) + " | coreset calls | load before / after |"
    lines = [head, "|" + "---|" * (len(STAGES) + 4)]
    for r in rows:
        cells = [str(r["k"]), f"{r['total_s']:.1f}"]
        cells += [f"{r['split_s'][s]:.1f}" for s in STAGES]
        cells += [str(r["coreset_calls"]), f"{r['load_average'][0]} / {r['load_average'][1]}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    """Fits each `--shots` in a child process and prints the split."""
    FLAGS(list(argv))
    if FLAGS.probe:
        print(json.dumps(probe(FLAGS.probe, FLAGS.support_dir)))
        return
    if FLAGS.child:
        print("ROW " + json.dumps(fit_once(FLAGS.child, FLAGS.support_dir, FLAGS.image_size)))
        return
    rows = []
    for k in (int(x) for x in FLAGS.shots):
        with tempfile.TemporaryDirectory() as tmp:
            folder = FLAGS.support_dir
            if FLAGS.repeat_pool:
                folder = pool_folder(FLAGS.support_dir, k, tmp)
            cmd = [
                sys.executable,
                "-m",
                "experiments.bench_fit",
                f"--child={k}",
                f"--support_dir={folder}",
                f"--image_size={FLAGS.image_size}",
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [x for x in res.stdout.splitlines() if x.startswith("ROW ")]
        if res.returncode or not line:
            print(res.stdout[-2000:], res.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"fit of k={k} failed (exit {res.returncode})")
        row = json.loads(line[-1][4:])
        rows.append(row)
        print(
            f"k={k}: {row['total_s']:.1f} s "
            + ", ".join(f"{s} {v:.1f}" for s, v in row["split_s"].items())
            + f"; coreset calls {row['coreset_calls']}; load {row['load_average']}",
            flush=True,
        )
    print(markdown_rows(rows))
    if FLAGS.out:
        Path(FLAGS.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv)
