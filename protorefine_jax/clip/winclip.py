"""WinCLIP and WinCLIP+ (paper Sec. 5.2, Eq. 8-9): extract, build banks, score, detect.

The same composition as the CNN path (`features` + `pipeline`):

  feats = extract_multiscale(params, support_images, config)    # jitted
  banks = build_banks(feats, alpha=CORESET_ALPHA["mvtec"])      # WinClipBanks
  text = prompts.class_text_features(spec, params, tokenizer, "bottle")
  out = detect(params, banks, text, query_images, config)       # jitted

Scales: the full-image patch tokens and each window size (2x2, 3x3).

Zero-shot (WinCLIP): `P(anomalous)` = softmax over (normal, anomalous) of
cosine similarity / temperature (0.07), for the image embedding (`s0`) and
every window; window scores go to the patch grid by harmonic mean over the
windows covering each patch; the scales (image score broadcast, one grid per
window size) are fused by a harmonic mean, as anomalib's WinCLIP.

Few-shot: per scale, the cosine distance `(1 - cos) / 2` of each query
feature to the scale's memory, plain (WinCLIP, `use_refinement=False`) or
against the refined prototypes (WinCLIP+, `pipeline.score_query` with
`distance="cosine"`, lam 0.1); window scales are aggregated to the grid like
the zero-shot ones; the scales' grids are averaged. The memory: WinCLIP+
refines the per-scale coreset banks (alpha 0.5 / 0.3 / 0.2, paper Sec. 6.1);
plain WinCLIP scores against EVERY support patch token and window by default
(`WinClipConfig.plain_memory="full"`, as anomalib's WinCLIP and the paper's
reproduced baseline), or against the same coreset (`"coreset"`, the
like-for-like ablation). `build_banks` returns both (`WinClipBanks`).

Fidelity to anomalib's WinCLIP (`src/anomalib/models/image/winclip/`): the
full-image patch tokens are the last layer's tokens after post-LN,
unprojected (`project_patches=False`); prompt embeddings are averaged raw
(`prompts`); images are resized to 240 x 240 bicubic with antialias at the
data edge (`towers` docstring). Where this module still differs: the fused
map is blurred (sigma 4; docs/method.md, "Scoring") after the bilinear upsampling, which
anomalib does not do. anomalib's own window embeddings are constant under
open_clip >= 2.26 (README, WinCLIP section); the ones here are per window.

Fusion (Eq. 9): image score `(s0 + max_j s_j) / 2` with `s_j` the few-shot
grid; map = mean of the zero-shot and few-shot grids, upsampled and blurred
(`scoring.map_operators`). Without banks `detect` is zero-shot WinCLIP.

Calibrated WinCLIP+ (`calibrate`, `score(..., calibration=...)`; docs/method.md, "Scoring"):
PatchCore+'s support-set calibration (`protorefine_jax.calibration`) applied
per few-shot scale. `calibrate` holds out each quadrant of each support
image on the scale's own grid (patch grid, or window-position grid) and
keeps the robust location and scale of the host and refined scores there;
scoring fuses each scale's host score (nearest coreset prototype, the same
Gram system) and refined score with `calibration.fuse` BEFORE the windows
are aggregated to the patch grid, then maps the fused score back to the
host's distance units (`calibration.in_host_units`), so the harmonic window
aggregation, the scale average and Eq. 9 with the zero-shot probabilities
see the units they had. The zero-shot branch is untouched.
`config.refine.calibrated=False` (or no calibration) is the paper's WinCLIP+.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jax import Array

from protorefine_jax import calibration as calib
from protorefine_jax.bank import MemoryBank, build_bank
from protorefine_jax.calibration import ScoreCalibration
from protorefine_jax.clip.spec import VIT_B_16_PLUS_240, ClipSpec
from protorefine_jax.clip.towers import MultiscaleFeatures, encode_multiscale
from protorefine_jax.clip.windows import aggregate_windows, window_grid
from protorefine_jax.config import RefineConfig
from protorefine_jax.gram import matmul_precision, normalize_rows
from protorefine_jax.pipeline import Diagnostics, score_query
from protorefine_jax.scoring import map_operators

CORESET_ALPHA = {"mvtec": 0.5, "visa": 0.3, "mpdd": 0.2}
"""Coreset ratios of WinCLIP+ per dataset (paper Sec. 6.1)."""

Banks = Sequence[Array | MemoryBank]

PlainMemory = Literal["full", "coreset"]


@struct.dataclass
class WinClipConfig:
    """Settings of WinCLIP / WinCLIP+ (a pytree: floats traced, the rest static).

    Attributes:
      refine: few-shot scoring settings; `distance` must be `"cosine"`.
        `use_refinement=False` gives WinCLIP, True WinCLIP+. Its `grid_shape`
        and `image_size` are set per scale here (raw grids, no upsampling).
        Its `calibrated` (default True) chooses the calibrated WinCLIP+ when
        `score` is given a calibration (`calibrate`): per few-shot scale,
        the max of the robust z-scores of the host (nearest coreset
        prototype) and refined scores, computed on the scale's own patches
        or windows before they are aggregated to the grid, mapped back to
        the host's units (`calibration.in_host_units`) so the scale average
        and Eq. 9 keep their balance; the zero-shot branch is untouched.
        False: the refined score alone (the paper's WinCLIP+).
      temperature: softmax temperature of the zero-shot score (CLIP: 0.07).
      clip: CLIP architecture (static).
      window_sizes: window sides in patches (static; WinCLIP: 2 and 3).
      project_patches: full-image patch tokens through the visual projection
        (static). Default False: the last layer's tokens after post-LN,
        unprojected (`D` wide, 896 for ViT-B-16-plus-240), which is what
        anomalib's WinCLIP uses (OpenCLIP `output_tokens`); True projects
        them to `E` like the image and window embeddings.
      plain_memory: memory plain WinCLIP (`refine.use_refinement=False`)
        scores against when given `WinClipBanks` (static). `"full"`
        (default): every support patch token and window, as anomalib's
        WinCLIP and the paper's reproduced WinCLIP; `"coreset"`: the same
        coreset banks WinCLIP+ refines (like-for-like ablation, which makes
        the baseline weaker and the WinCLIP -> WinCLIP+ gain larger).
        WinCLIP+ always refines the coreset. A plain sequence of banks /
        arrays passed to `score` is used as given, whatever this says.
      window_aggregation: `"harmonic"` (WinCLIP) or `"mean"` (static).
      zero_shot_fusion: fuse zero-shot scales by `"harmonic"` mean (anomalib)
        or arithmetic `"mean"` (static).
      image_size: `(H, W)` of the output maps, None for the raw patch grid.
      blur_sigma: Gaussian blur of the maps, in map pixels (the paper's 4;
        docs/method.md, "Scoring").
    """

    refine: RefineConfig
    temperature: float = 0.07
    clip: ClipSpec = struct.field(pytree_node=False, default=VIT_B_16_PLUS_240)
    window_sizes: tuple[int, ...] = struct.field(pytree_node=False, default=(2, 3))
    project_patches: bool = struct.field(pytree_node=False, default=False)
    plain_memory: PlainMemory = struct.field(pytree_node=False, default="full")
    window_aggregation: Literal["harmonic", "mean"] = struct.field(
        pytree_node=False, default="harmonic"
    )
    zero_shot_fusion: Literal["harmonic", "mean"] = struct.field(
        pytree_node=False, default="harmonic"
    )
    image_size: tuple[int, int] | None = struct.field(pytree_node=False, default=(240, 240))
    blur_sigma: float = struct.field(pytree_node=False, default=4.0)

    def __post_init__(self):
        if self.refine.distance != "cosine":
            raise ValueError(
                f"WinCLIP scores with the cosine distance, got {self.refine.distance!r}."
            )
        for size in self.window_sizes:
            window_grid(self.clip.grid_size, size)
        if self.plain_memory not in ("full", "coreset"):
            raise ValueError(
                f"plain_memory must be 'full' (every support row, anomalib's WinCLIP) or "
                f"'coreset' (WinCLIP+'s banks), got {self.plain_memory!r}."
            )
        for name in ("window_aggregation", "zero_shot_fusion"):
            if getattr(self, name) not in ("harmonic", "mean"):
                raise ValueError(
                    f"{name} must be 'harmonic' or 'mean', got {getattr(self, name)!r}."
                )


def winclip_config(
    use_refinement: bool = True, clip: ClipSpec = VIT_B_16_PLUS_240, **kwargs: Any
) -> WinClipConfig:
    """WinCLIP+ (`use_refinement=True`) or WinCLIP defaults of the paper.

    Args:
      use_refinement: WinCLIP+ (refined prototypes) or plain WinCLIP.
      clip: CLIP architecture; maps default to its input size.
      **kwargs: `RefineConfig` overrides (e.g. `lam`, `num_iters`); keys that
        are `WinClipConfig` fields go there instead.

    Returns:
      A config with `distance="cosine"`, `m_step="optax"`, `lam=0.1`,
      `sinkhorn_iters=30`.
    """
    fields = set(WinClipConfig.__dataclass_fields__) - {"refine"}
    outer = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    # 30 Sinkhorn iterations: PatchCore+'s 10 (`RefineConfig`) was measured
    # on CNN features only (RESULTS.md, "EM and Sinkhorn iteration counts
    # against AUROC").
    refine_kwargs = dict(
        distance="cosine", m_step="optax", lam=0.1, sinkhorn_iters=30, image_size=None
    )
    refine_kwargs.update(kwargs)
    refine = RefineConfig(use_refinement=use_refinement, **refine_kwargs)
    outer.setdefault("image_size", (clip.image_size, clip.image_size))
    return WinClipConfig(refine=refine, clip=clip, **outer)


class WinClipOutput(NamedTuple):
    """Scores of a batch (fields as `pipeline.RefineOutput`, plus the branches).

    Attributes:
      image_scores: `[B]` fused image scores `s*` (Eq. 9); `s0` without banks.
      maps: `[B, H, W]` fused anomaly maps (`[B, h, w]` if `image_size` is None).
      patch_scores: `[B, h*w]` fused patch-grid scores.
      diagnostics: refinement health, worst case over scales: max marginal
        error, max W change, min least-squares residual (zeros without banks
        or refinement).
      zero_shot_scores: `[B]` `s0` from the image embedding.
      few_shot_scores: `[B]` `max_j s_j` of the few-shot grid (0 without banks).
      zero_shot_grid: `[B, h, w]` fused zero-shot patch grid.
      few_shot_grid: `[B, h, w]` scale-averaged few-shot grid (0 without banks).
    """

    image_scores: Array
    maps: Array
    patch_scores: Array
    diagnostics: Diagnostics
    zero_shot_scores: Array
    few_shot_scores: Array
    zero_shot_grid: Array
    few_shot_grid: Array


@jax.jit
def extract_multiscale(params: Any, images: Array, config: WinClipConfig) -> MultiscaleFeatures:
    """Multi-scale CLIP features of raw images (jitted; the `extract` of this host).

    Args:
      params: HF Flax CLIP params.
      images: `[B, S, S, 3]` RGB in [0, 255], `S = config.clip.image_size`.
      config: CLIP spec, window sizes, patch projection.

    Returns:
      `MultiscaleFeatures(image [B, E], patches [B, h*w, C], windows)`.
    """
    return encode_multiscale(
        config.clip, params, images, tuple(config.window_sizes), config.project_patches
    )


def scale_features(features: MultiscaleFeatures) -> tuple[Array, ...]:
    """Few-shot scales in bank order: full-image patches, then each window size."""
    return (features.patches, *features.windows)


@struct.dataclass
class WinClipBanks:
    """Per-scale few-shot memory of WinCLIP / WinCLIP+ (`build_banks`; a pytree).

    Iterating, indexing and `len` go to `coreset`, so code written for a
    per-scale list of `MemoryBank` (sizes, `describe`, degeneracy) keeps
    working; `score` picks `full` or `coreset` from the config.

    Attributes:
      coreset: one coreset `MemoryBank` per scale (`scale_features` order):
        what WinCLIP+ refines, and plain WinCLIP's memory with
        `plain_memory="coreset"`.
      full: per scale, `[k * m_s, c_s]` EVERY L2-normalised support row:
        plain WinCLIP's memory with `plain_memory="full"` (the default).
    """

    coreset: tuple[MemoryBank, ...]
    full: tuple[Array, ...]

    def __iter__(self):
        return iter(self.coreset)

    def __len__(self) -> int:
        return len(self.coreset)

    def __getitem__(self, index):
        return self.coreset[index]

    def memory(self, config: WinClipConfig) -> tuple[Array, ...]:
        """The per-scale rows `config` scores against (see `plain_memory`)."""
        if not config.refine.use_refinement and config.plain_memory == "full":
            return self.full
        return tuple(b.prototypes for b in self.coreset)


def build_banks(support: MultiscaleFeatures, alpha: float, **bank_kwargs: Any) -> WinClipBanks:
    """Per-scale memory from the support images' features: coreset banks and full memory.

    Rows are L2-normalised first, so the greedy coreset (squared Euclidean)
    works in the cosine geometry the scores use.

    Args:
      support: features of the `k` support images (`extract_multiscale`).
      alpha: coreset ratio of WinCLIP+ (`CORESET_ALPHA[dataset]`: 0.5 MVTec,
        0.3 VisA, 0.2 MPDD).
      **bank_kwargs: passed to `bank.build_bank` (seed, start_index, ...).

    Returns:
      `WinClipBanks`: coreset banks (each with its degeneracy verdict) and
      every support row, both in `scale_features` order.
    """
    full = tuple(normalize_rows(f.reshape(-1, f.shape[-1])) for f in scale_features(support))
    return WinClipBanks(coreset=tuple(build_bank(f, alpha, **bank_kwargs) for f in full), full=full)


def anomaly_probability(embeddings: Array, text_features: Array, temperature: Array) -> Array:
    """WinCLIP's zero-shot score: softmax(cos / T)[anomalous].

    Args:
      embeddings: `[..., E]` image or window embeddings.
      text_features: `[2, E]` normal / anomalous class embeddings.
      temperature: softmax temperature.

    Returns:
      `[...]` probabilities of the anomalous class.
    """
    logits = normalize_rows(embeddings) @ normalize_rows(text_features).T / temperature  # [..., 2]
    return jax.nn.softmax(logits, axis=-1)[..., 1]


def _fuse(grids: list[Array], how: str) -> Array:
    stack = jnp.stack(grids)
    if how == "harmonic":
        return stack.shape[0] / jnp.sum(1.0 / stack, axis=0)
    return jnp.mean(stack, axis=0)


def zero_shot_query(
    image: Array, windows: Sequence[Array], text_features: Array, config: WinClipConfig
) -> tuple[Array, Array]:
    """Zero-shot WinCLIP for ONE image.

    Args:
      image: `[E]` image embedding.
      windows: one `[n_windows_k, E]` per window size.
      text_features: `[2, E]`.
      config: window sizes, aggregation, fusion, temperature.

    Returns:
      `(s0 [], grid [h, w])`: image score and fused zero-shot patch grid.
    """
    grid = config.clip.grid_size
    s0 = anomaly_probability(image, text_features, config.temperature)
    grids = [jnp.full(grid, s0)]
    for size, win in zip(config.window_sizes, windows, strict=True):
        probs = anomaly_probability(win, text_features, config.temperature)
        grids.append(aggregate_windows(probs, grid, size, config.window_aggregation))
    return s0, _fuse(grids, config.zero_shot_fusion)


def scale_grids(config: WinClipConfig) -> tuple[tuple[int, int], ...]:
    """Grid of each few-shot scale (`scale_features` order): patches, then window positions."""
    grid = config.clip.grid_size
    return (grid, *(window_grid(grid, size) for size in config.window_sizes))


def calibrate(
    support: MultiscaleFeatures, config: WinClipConfig, *, alpha: float
) -> tuple[ScoreCalibration, ...]:
    """Per-scale support-set calibration of WinCLIP+ (`calibration.calibrate` per scale).

    Each scale's support rows are L2-normalised (as `build_banks` does), and
    each quadrant of each support image's grid of that scale (patch grid or
    window-position grid) is scored against a coreset (ratio `alpha`) of
    every other row of the scale, by the host and by `config.refine`'s
    refinement. A window straddling a quadrant's border shares patches with
    held-out windows, as PatchCore's aggregated neighbourhoods do.

    Args:
      support: features of the `k >= 1` support images (`extract_multiscale`).
      config: the WinCLIP+ config (refinement settings, window sizes).
      alpha: coreset ratio of the banks (`build_banks`'s).

    Returns:
      One `ScoreCalibration` per scale, in `scale_features` order (the
      `calibration` argument of `score`).

    Raises:
      ValueError: a scale's grid has no 2 x 2 quadrants (window as large as
        the patch grid), or `support` has other scales than `config`.
    """
    grids = scale_grids(config)
    for size, shape in zip(config.window_sizes, grids[1:], strict=True):
        if min(shape) < 2:
            raise ValueError(
                f"calibrating WinCLIP+ holds out quadrants of each scale's grid, but the "
                f"{size}x{size} windows form a {shape} grid (at least 2 x 2 needed): use "
                "smaller windows or fit with calibrate=False."
            )
    scales = scale_features(support)
    if len(scales) != len(grids):
        raise ValueError(
            f"the support features hold {len(scales)} scales but the config names "
            f"{len(grids)} (patches + window sizes {config.window_sizes}): extract them "
            "with the config you calibrate with."
        )
    out = []
    for shape, feats in zip(grids, scales, strict=True):
        k, m, c = feats.shape
        rows = normalize_rows(jnp.asarray(feats).reshape(k * m, c)).reshape(k, m, c)
        out.append(calib.calibrate(rows, config.refine, alpha=alpha, grid_shape=shape))
    return tuple(out)


def few_shot_query(
    scales: Sequence[Array],
    banks: Sequence[Array],
    config: WinClipConfig,
    calibration: Sequence[ScoreCalibration] | None = None,
) -> tuple[Array, Diagnostics]:
    """Few-shot WinCLIP / WinCLIP+ grid for ONE image.

    Args:
      scales: query features per scale (`scale_features` order, no batch axis).
      banks: `[n_s, c_s]` prototypes per scale, same order.
      config: refinement settings and window sizes.
      calibration: one `ScoreCalibration` per scale (`calibrate`), or None.
        Used by WinCLIP+ with `config.refine.calibrated`: each scale's
        patch / window scores are `calibration.fuse`d host and refined
        scores in the host's units (`calibration.in_host_units`), before
        window aggregation.

    Returns:
      `(grid [h, w], diagnostics)`: scale-averaged few-shot grid and the
      worst-case refinement diagnostics over scales.
    """
    grid = config.clip.grid_size
    sizes = (None, *config.window_sizes)
    calibrated = calibration is not None and config.refine.use_refinement
    calibrated = calibrated and config.refine.calibrated
    cals = tuple(calibration) if calibrated else (None,) * len(sizes)
    grids, diags = [], []
    for size, shape, feats, bank, cal in zip(
        sizes, scale_grids(config), scales, banks, cals, strict=True
    ):
        cfg = config.refine.replace(grid_shape=shape, image_size=None)
        out = score_query(bank, feats, cfg, cal)
        patch_scores = out.patch_scores
        if cal is not None:
            patch_scores = calib.in_host_units(patch_scores, cal)
        if size is None:
            grids.append(patch_scores.reshape(grid))
        else:
            grids.append(aggregate_windows(patch_scores, grid, size, config.window_aggregation))
        diags.append(out.diagnostics)
    worst = Diagnostics(
        jnp.max(jnp.stack([d.marginal_error for d in diags])),
        jnp.max(jnp.stack([d.w_rel_change for d in diags])),
        jnp.min(jnp.stack([d.lsq_residual for d in diags])),
    )
    return jnp.mean(jnp.stack(grids), axis=0), worst


def _bank_arrays(
    banks: WinClipBanks | Banks | None, config: WinClipConfig
) -> tuple[Array, ...] | None:
    if banks is None:
        return None
    if isinstance(banks, WinClipBanks):
        return banks.memory(config)
    return tuple(b.prototypes if isinstance(b, MemoryBank) else b for b in banks)


@jax.jit
def score(
    features: MultiscaleFeatures,
    banks: WinClipBanks | Banks | None,
    text_features: Array,
    config: WinClipConfig,
    calibration: Sequence[ScoreCalibration] | None = None,
) -> WinClipOutput:
    """Scores a batch from its features (jitted).

    Multi-scale batching: WinCLIP's per-image function (zero-shot scores plus
    `pipeline.score_query` once per few-shot scale, each scale with its own
    bank and grid shape) is vmapped over the batch here; the scales run one
    after another inside it, since their shapes differ (docs/method.md,
    "Batching").

    Every product here (cosines to the text features, the few-shot scores,
    the map upsampling) runs in full float32 (`gram.matmul_precision`:
    JAX's default on NVIDIA GPUs is TF32, a 10-bit mantissa) unless
    `config.refine.precision == "tf32"`.

    Args:
      features: query features, leading batch axis `B`.
      banks: `build_banks` output (plain WinCLIP scores against the memory
        `config.plain_memory` names, WinCLIP+ against the coresets), a
        sequence of per-scale banks / arrays used as given, or None for
        zero-shot WinCLIP.
      text_features: `[2, E]` from `prompts.class_text_features`.
      config: settings.
      calibration: one `ScoreCalibration` per few-shot scale (`calibrate`;
        traced, so a new support set never recompiles) for the calibrated
        WinCLIP+ (`WinClipConfig.refine`); None, plain WinCLIP or
        `config.refine.calibrated=False`: uncalibrated scores.

    Returns:
      `WinClipOutput` with batch axis `B`.
    """
    with matmul_precision(config.refine):
        return _score(features, banks, text_features, config, calibration)


def _score(
    features: MultiscaleFeatures,
    banks: WinClipBanks | Banks | None,
    text_features: Array,
    config: WinClipConfig,
    calibration: Sequence[ScoreCalibration] | None = None,
) -> WinClipOutput:
    bank_arrays = _bank_arrays(banks, config)
    grid = config.clip.grid_size
    scales = 1 + len(config.window_sizes)
    if bank_arrays is not None and len(bank_arrays) != scales:
        raise ValueError(
            f"expected {scales} banks (patches + one per window size), got {len(bank_arrays)}."
        )
    if calibration is not None and len(calibration) != scales:
        raise ValueError(
            f"expected {scales} calibrations (patches + one per window size, `calibrate`), "
            f"got {len(calibration)}; calibrate with the config you score with."
        )

    def one(image, patches, windows):
        s0, zs_grid = zero_shot_query(image, windows, text_features, config)
        if bank_arrays is None:
            zero = jnp.zeros((), zs_grid.dtype)
            return s0, zs_grid, s0, zs_grid, jnp.zeros_like(zs_grid), Diagnostics(zero, zero, zero)
        fs_grid, diag = few_shot_query((patches, *windows), bank_arrays, config, calibration)
        fused = 0.5 * (zs_grid + fs_grid)
        return 0.5 * (s0 + jnp.max(fs_grid)), fused, s0, zs_grid, fs_grid, diag

    image_scores, fused, s0, zs, fs, diag = jax.vmap(one)(
        features.image, features.patches, tuple(features.windows)
    )
    if config.image_size is None:
        maps = fused
    else:
        a, b = map_operators(grid, tuple(config.image_size), float(config.blur_sigma))
        maps = jnp.einsum("Hh,bhw,Ww->bHW", jnp.asarray(a), fused, jnp.asarray(b))
    return WinClipOutput(
        image_scores=image_scores,
        maps=maps,
        patch_scores=fused.reshape(fused.shape[0], -1),
        diagnostics=diag,
        zero_shot_scores=s0,
        few_shot_scores=jnp.max(fs, axis=(1, 2)),
        zero_shot_grid=zs,
        few_shot_grid=fs,
    )


@jax.jit
def detect(
    params: Any,
    banks: WinClipBanks | Banks | None,
    text_features: Array,
    images: Array,
    config: WinClipConfig,
    calibration: Sequence[ScoreCalibration] | None = None,
) -> WinClipOutput:
    """WinCLIP(+) end to end, one XLA program: features, zero-/few-shot scores, maps.

    Args:
      params: HF Flax CLIP params.
      banks: `build_banks` output (see `score`), per-scale banks / arrays used
        as given, or None for zero-shot WinCLIP.
      text_features: `[2, E]` class text embeddings.
      images: `[B, S, S, 3]` RGB in [0, 255].
      config: settings (`winclip_config(...)`).
      calibration: per-scale `calibrate` output for the calibrated
        WinCLIP+ (see `score`), or None.

    Returns:
      `WinClipOutput` (`image_scores [B]`, `maps [B, H, W]`, ...).
    """
    feats = extract_multiscale(params, images, config)
    return score(feats, banks, text_features, config, calibration)
