"""`BenchSettings`: what a benchmark run measures (shared by bench and its sections).

Its own module so that `bench` (the CLI), `bench_sections` and
`bench_analyses` all import it from below and none imports another in a circle.
"""

from __future__ import annotations

import dataclasses

from protorefine_jax.detectors import patchcore


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """Everything a benchmark run needs; `main` fills it from flags.

    Empty tuples and None mean "the default for this backend" (`resolve`).
    """

    sections: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] = ()
    winclip_batch_sizes: tuple[int, ...] = ()
    repeats: int = 5
    warmup: int = 1
    backbones: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite2", "wide_resnet50_2")
    detect_backbone: str = "wide_resnet50_2"
    aggregation: str = "official"
    extract_aggregations: tuple[str, ...] = ("official",)
    image_size: int = 256
    shots: int = 2
    alpha: float = patchcore.ALPHA
    pc_grid: int = 32
    pc_n: int = 102
    pc_c: int = 1024
    wc_grid: int = 15
    wc_c: int = 640
    wc_alpha: float | None = None  # None: WinCLIP+'s MVTec ratio (`clip.winclip`)
    clip_model: str = "ViT-B-16-plus-240"
    precision: str = "float32"
    profile_batch: int | None = None
    devices: int | None = None
    sharding_batch: int | None = None
    precision_backbone: str = "efficientnet_lite0"
    precision_weights: str = ""
    precision_categories: tuple[str, ...] = ("fabric", "grain")
    precision_counts: tuple[int, int, int] = (10, 10, 10)
    precision_seed: int = 0
