"""Configuration of the refinement and scoring core.

`RefineConfig` is a pytree: fields that set shapes or pick code paths are
static (pytree aux data, a change recompiles), continuous hyper-parameters are
leaves (traced, so a sweep over them reuses one compiled program).

Its fields are of three kinds: the refinement (lam, epsilon, ridges, EM and
Sinkhorn settings, bank, precision), the method switches (`use_refinement`,
`use_transport`, `calibrated`) and the map rendering (`MAP_FIELDS`:
`grid_shape`, `image_size`, `blur_sigma`). The rendering is also a config of
its own, `MapConfig` (`RefineConfig.map_config`, `RefineConfig.with_map`),
for code that only turns patch scores into maps (`scoring.anomaly_map` takes
either); every field stays on `RefineConfig`, so existing calls are unchanged.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import numpy as np
from flax import struct

Distance = Literal["sqeuclidean", "cosine"]
Precision = Literal["float32", "tf32", "bfloat16", "float64"]
SinkhornMode = Literal["log", "absorbed"]
MStep = Literal["closed_form", "optax"]
Optimizer = Literal["sgd", "preconditioned"]
BankMode = Literal["refined", "union"]
Products = Literal["auto", "gram", "features"]

_DISTANCES = ("sqeuclidean", "cosine")
_M_STEPS = ("closed_form", "optax")
_OPTIMIZERS = ("sgd", "preconditioned")
_BANK_MODES = ("refined", "union")
_PRECISIONS = ("float32", "tf32", "bfloat16", "float64")
_SINKHORN_MODES = ("log", "absorbed")
_PRODUCTS = ("auto", "gram", "features")

# Accepted ranges of the traced fields: name -> (low, low inclusive, high).
# epsilon below 1e-3 of the mean cost leaves the plan's potentials resolving
# less than float32 can hold (1e-30 silently reproduced lam = 0); a relative
# ridge below 1e-6 can leave `G + delta I` numerically singular in float32
# (Cholesky of a rank-deficient G gave NaN at 1e-30); lr above 2 exceeds the
# stable step of the optax M-step (2 x the safe step). `tests/test_fuzz.py`
# covers these ranges.
RANGES = {
    "lam": (0.0, True, 1e6),
    "epsilon": (1e-3, True, 1e6),
    "ridge": (1e-6, True, 1e6),
    "ridge_wide": (1e-6, True, 1e6),
    "lr": (0.0, False, 2.0),
}

# The map-rendering fields, shared by `RefineConfig` and `MapConfig`. They never
# change a patch score (a calibration measured under one value serves all).
MAP_FIELDS = ("grid_shape", "image_size", "blur_sigma")


@struct.dataclass
class MapConfig:
    """How `[m]` patch scores become an `[H, W]` anomaly map (docs/method.md, "Scoring").

    The rendering fields of `RefineConfig` on their own (same names, defaults
    and checks; all static): `RefineConfig.map_config` gives a config's,
    `RefineConfig.with_map` sets them, `scoring.anomaly_map` takes either.

      >>> rendering = MapConfig(grid_shape=(28, 28), image_size=(224, 224))
      >>> config = RefineConfig().with_map(rendering)
      >>> config.map_config == rendering
      True

    Attributes:
      grid_shape: patch grid `(h, w)` with `h * w = m`; None means square.
      image_size: `(H, W)` of the map (bilinear upsample + blur); None: the
        raw `[h, w]` patch grid.
      blur_sigma: Gaussian blur sigma in map pixels, >= 0.
    """

    grid_shape: tuple[int, int] | None = struct.field(pytree_node=False, default=None)
    image_size: tuple[int, int] | None = struct.field(pytree_node=False, default=(256, 256))
    blur_sigma: float = struct.field(pytree_node=False, default=4.0)

    def __post_init__(self):
        _normalise_sizes(self)
        _check_blur_sigma(self.blur_sigma)


@struct.dataclass
class RefineConfig:
    """Everything `refine_and_score` needs besides the bank and the queries.

    The method is described in docs/method.md; RESULTS.md, "What ships, and
    why", lists the evidence for each shipped default. Ranges are what the code accepts.

    Static fields (changing one recompiles):
      distance: `"sqeuclidean"` (PatchCore+, paper Eq. 7) or `"cosine"`,
        meaning `(1 - cos) / 2` (WinCLIP+, Eq. 8).
      num_iters: EM iterations, int >= 1 (default 10, the paper's;
        RESULTS.md, "Hyper-parameter sweeps").
      sinkhorn_iters: Sinkhorn iterations per E-step, int >= 1, fixed (no
        data-dependent loop under vmap). Default 10 with `warm_start`: on the
        18 dev cells (5 seeds) the calibrated PatchCore+ image AUROC moves by
        -0.03 to +0.23 against 30 and the refinement costs 10-25 % less
        (RESULTS.md, "Sinkhorn: iterations and warm start" and "EM and
        Sinkhorn iteration counts against AUROC"). WinCLIP+ keeps 30
        (`clip.winclip_config`: not measured on CLIP features).
      sinkhorn_mode: `"log"` (every iteration in the log domain) or
        `"absorbed"` (default: one log-domain iteration, then kernel-mode
        iterations on the absorbed plan; `transport.sinkhorn_plan`). Same
        plan; a project choice by speed (docs/method.md, "Sinkhorn").
      warm_start: start each E-step from the previous E-step's dual
        potentials (default True; a project choice, RESULTS.md, "Sinkhorn: iterations and
        warm start").
      m_step: `"closed_form"` (default; the exact M-step, squared Euclidean
        only) or `"optax"` (`inner_steps` gradient steps on W with T fixed;
        the only choice for the cosine distance). docs/method.md, "M-step".
      optimizer: for `m_step="optax"`: `"sgd"` (plain `optax.sgd`) or
        `"preconditioned"` (default: gradient times `(G + delta I)^-1`, then
        sgd; RESULTS.md, "The optax M-step against the closed form").
      inner_steps: optax steps per M-step, int >= 1 (default 10).
      use_transport: keep the transport term of the M-step loss (default
        True). False gives "W only": W is the least-squares `W0`.
      use_refinement: False gives the host method (PatchCore / WinCLIP
        scoring against the bank itself); default True.
      calibrated: fuse the refined patch scores with the host's when a
        support-set calibration is given (`calibration.fuse`: the max of the
        two robust z-scores on held-out support patches; the shipped
        PatchCore+, RESULTS.md "Calibrated PatchCore+"). False, or no
        calibration passed, scores with the refined prototypes alone (the
        paper's PatchCore+). No effect on host scoring.
      bank: score against the `"refined"` prototypes `R = W M` (default) or
        the `"union"` of `M` and `R` (RESULTS.md, "Main results").
      grid_shape: patch grid `(h, w)` with `h * w = m`; None means square.
      image_size: `(H, W)` of the anomaly map (bilinear upsample + blur).
        None skips upsampling and blur and returns the raw `[h, w]` patch
        grid, for callers that build maps themselves (WinCLIP window scales).
      precision: arithmetic of the feature-space products `M M^T` and
        `F M^T`: `"float32"` (default, full), `"tf32"` (the backend default:
        TF32 on NVIDIA tensor cores, plain float32 on CPU), `"bfloat16"`
        (features rounded to bfloat16, float32 accumulation; the squared
        norms use the same rounded features) or `"float64"` (everything in
        float64: needs `jax.config.update("jax_enable_x64", True)` before the
        config is built; outputs are float64). Everything downstream of the
        products is float32 except under `"float64"`. BENCHMARKS.md,
        "Precision", measures each.
      blur_sigma: Gaussian blur sigma in map pixels, >= 0 (default 4, the
        paper's; kernel `2 * round(4 * sigma) + 1`, reflect padding, as scipy).
      products: how the bank enters the refinement's products (a speed
        setting: the same numbers in exact arithmetic, rounded differently).
        `"gram"`: through the Gram matrix `G = M M^T [n, n]` (`O(n^2)` per
        patch, the form of refine's module docstring); `"features"`: through
        the bank's rows, `W G = (W M) M^T` and the ridge solve in the
        `[c, c]` space (`O(n c)` per patch, no `[n, n]` array; closed-form
        M-step only); `"auto"` (default): the features once `n > 2 c`, where
        they are cheaper (`gram.uses_feature_form`), so every bank of at most
        `2 c` rows, those of the dev tables (1-4 shots) included, keeps the
        Gram form. A project choice (the paper is silent); BENCHMARKS.md,
        "Large banks", measures both.

    Traced fields (a new value does not recompile):
      lam: weight of the transport term, >= 0 (default 0.3, the paper's
        PatchCore+ value; WinCLIP+ uses 0.1). 0 is equivalent to W only in
        the loss. Kept at the paper's value although W only is as good on the
        dev data (RESULTS.md, "Main results" and "Hyper-parameter sweeps"):
        the transport term is the
        method.
      epsilon: entropic regularisation relative to the mean transport cost,
        > 0 (`epsilon_abs = epsilon * mean(C)`; default 0.05; RESULTS.md,
        "Hyper-parameter sweeps").
      ridge: ridge `delta` of the Gram solves relative to `trace(G) / n`,
        the mean eigenvalue of `G`, > 0 (default 1e-2; the paper's 1e-4
        collapses refinement when the bank spans the support features). Used
        by banks with fewer rows than feature dimensions. docs/method.md,
        "The ridge rule"; RESULTS.md, "The degenerate regime and its remedy".
      ridge_wide: the relative ridge of banks with at least as many
        (non-empty) rows as feature dimensions, `n >= c` (`G` singular), > 0
        (default 1e-1; RESULTS.md, "The degenerate regime and its remedy",
        wide banks). A project
        choice: set it equal to `ridge` for a single ridge.
        `bank.uses_wide_ridge` is the rule.
      lr: optax step size relative to the safe step, > 0 (default 1): for
        `"sgd"` the step is `lr / L` with `L` the Lipschitz constant of the
        squared-Euclidean gradient (`2 (1 + lam) lambda_max(G + delta I) / m`,
        by power iteration); for `"preconditioned"` it is
        `lr * m / (2 (1 + lam))`, so `lr = 1` is a Newton step for the
        squared-Euclidean loss. Relative steps keep one default valid across
        feature scales (a project choice: the paper gives no step size).
    """

    lam: float = 0.3
    epsilon: float = 0.05
    ridge: float = 1e-2
    ridge_wide: float = 1e-1
    lr: float = 1.0
    distance: Distance = struct.field(pytree_node=False, default="sqeuclidean")
    num_iters: int = struct.field(pytree_node=False, default=10)
    sinkhorn_iters: int = struct.field(pytree_node=False, default=10)
    sinkhorn_mode: SinkhornMode = struct.field(pytree_node=False, default="absorbed")
    warm_start: bool = struct.field(pytree_node=False, default=True)
    m_step: MStep = struct.field(pytree_node=False, default="closed_form")
    optimizer: Optimizer = struct.field(pytree_node=False, default="preconditioned")
    inner_steps: int = struct.field(pytree_node=False, default=10)
    use_transport: bool = struct.field(pytree_node=False, default=True)
    use_refinement: bool = struct.field(pytree_node=False, default=True)
    calibrated: bool = struct.field(pytree_node=False, default=True)
    bank: BankMode = struct.field(pytree_node=False, default="refined")
    grid_shape: tuple[int, int] | None = struct.field(pytree_node=False, default=None)
    image_size: tuple[int, int] | None = struct.field(pytree_node=False, default=(256, 256))
    blur_sigma: float = struct.field(pytree_node=False, default=4.0)
    precision: Precision = struct.field(pytree_node=False, default="float32")
    products: Products = struct.field(pytree_node=False, default="auto")

    @property
    def map_config(self) -> MapConfig:
        """The map-rendering fields (`MAP_FIELDS`) as a `MapConfig`."""
        return MapConfig(**{name: getattr(self, name) for name in MAP_FIELDS})

    def with_map(self, rendering: MapConfig) -> RefineConfig:
        """This config with `rendering`'s map fields (the refinement untouched)."""
        return self.replace(**{name: getattr(rendering, name) for name in MAP_FIELDS})

    def __post_init__(self):
        _normalise_sizes(self)
        _check_choice("distance", self.distance, _DISTANCES)
        _check_choice("m_step", self.m_step, _M_STEPS)
        _check_choice("optimizer", self.optimizer, _OPTIMIZERS)
        _check_choice("bank", self.bank, _BANK_MODES)
        _check_choice("precision", self.precision, _PRECISIONS)
        _check_choice("sinkhorn_mode", self.sinkhorn_mode, _SINKHORN_MODES)
        _check_choice("products", self.products, _PRODUCTS)
        if self.products == "features" and self.m_step != "closed_form":
            raise ValueError(
                'products="features" needs m_step="closed_form" (the optax M-step is '
                'written against the Gram matrix); use products="auto" or "gram".'
            )
        if self.m_step == "closed_form" and self.distance != "sqeuclidean":
            raise ValueError(
                'm_step="closed_form" exists only for distance="sqeuclidean"; '
                'use m_step="optax" with distance="cosine".'
            )
        for name in ("num_iters", "sinkhorn_iters", "inner_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if self.precision == "float64" and not jax.config.jax_enable_x64:
            raise ValueError(
                'precision="float64" needs 64-bit JAX: call '
                'jax.config.update("jax_enable_x64", True) at startup (or set '
                "JAX_ENABLE_X64=1) before building the config."
            )
        _check_blur_sigma(self.blur_sigma)
        # Traced fields arrive as tracers when jax rebuilds the config inside a
        # transformation; only concrete values (Python or numpy numbers,
        # concrete arrays) can be checked here.
        for name, (low, inclusive, high) in RANGES.items():
            value = _concrete_number(name, getattr(self, name))
            if value is None:
                continue
            ok = math.isfinite(value) and (value >= low if inclusive else value > low)
            if not ok or value > high:
                bracket = "[" if inclusive else "("
                raise ValueError(
                    f"{name} must be a finite number in {bracket}{low:g}, {high:g}], got {value!r}."
                )


def _concrete_number(name: str, value) -> float | None:
    """`value` as a float if it is a concrete number, None if it is traced/opaque.

    Python numbers, numpy scalars and concrete 0-d arrays are numbers; tracers
    and the placeholders jax puts in pytrees are skipped. Strings, booleans
    and arrays of other shapes are refused.
    """
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, bool | np.bool_ | str | bytes):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if isinstance(value, int | float | np.generic | np.ndarray | jax.Array):
        arr = np.asarray(value)
        real = np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
        if arr.shape != () or not real:
            raise ValueError(f"{name} must be a real scalar, got {value!r}.")
        return float(arr)
    return None


def _normalise_sizes(config) -> None:
    """`grid_shape` and `image_size` as tuples of ints (lists: unhashable static fields)."""
    for name in ("grid_shape", "image_size"):
        value = getattr(config, name)
        if value is not None:
            object.__setattr__(config, name, tuple(int(v) for v in value))


def _check_blur_sigma(value) -> None:
    sigma = _concrete_number("blur_sigma", value)
    if sigma is not None and not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"blur_sigma must be finite and >= 0, got {value}.")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
