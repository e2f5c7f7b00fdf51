"""The one method table of eval and study: detector family plus config overrides.

`patchcore` / `winclip` are the host methods; `patchcore+` / `winclip+` the
refined ones with the configuration the flags give (whose defaults are the
detectors' shipped ones). The suffixed variants pin one ablation each, so one
run can put them side by side with identical support sets (RESULTS.md). The
`...paper` variants pin the paper's / SPEC's settings (`PAPER`) so that the
study's tables do not move when a shipped default does. `STUDY_MAIN` names the
rows of the study's main table (its labels) by method.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Method:
    """One row family of the results table.

    Attributes:
      name: method name used on the command line and in results.
      host: `"patchcore"` (CNN features) or `"winclip"` (CLIP features).
      overrides: `RefineConfig` fields set on top of the flag-built config.
      online: score the test stream with `online_refine_and_score`.
      description: one line for `--help` and reports.
      host_options: host settings beyond `RefineConfig` (WinCLIP:
        `WinClipConfig` fields such as `plain_memory`).
      stream_calibration: calibrated PatchCore+ whose statistics are updated
        from the test images seen before each one (`stream_calibration`;
        opt-in, it reads unlabelled test images).
    """

    name: str
    host: str
    overrides: dict[str, Any]
    online: bool = False
    description: str = ""
    host_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    stream_calibration: bool = False


# The paper's settings as explicit fields (its single ridge 1e-4, closed-form
# M-step, refined scores alone). `REPRODUCTION` adds the solver of the study's
# reproduction (RESULTS.md, "Reproducing SPEC section 8 first"): 100 cold
# log-domain Sinkhorn iterations.
PAPER = dict(
    lam=0.3,
    epsilon=0.05,
    ridge=1e-4,
    ridge_wide=1e-4,
    num_iters=10,
    m_step="closed_form",
    calibrated=False,
)
REPRODUCTION = dict(PAPER, sinkhorn_iters=100, warm_start=False, sinkhorn_mode="log")


def _methods() -> dict[str, Method]:
    table = [
        Method("patchcore", "patchcore", {"use_refinement": False}, description="PatchCore"),
        Method("patchcore+", "patchcore", {}, description="PatchCore+ (flags' M-step)"),
        Method(
            "patchcore+stream",
            "patchcore",
            {},
            description="PatchCore+ calibrated on the stream of past test images (opt-in)",
            stream_calibration=True,
        ),
        Method(
            "patchcore+uncalibrated",
            "patchcore",
            {"calibrated": False},
            description="PatchCore+ scored by the refined prototypes alone (the paper's)",
        ),
        Method(
            "patchcore+closed",
            "patchcore",
            {"m_step": "closed_form"},
            description="PatchCore+, closed-form M-step",
        ),
        Method(
            "patchcore+sgd",
            "patchcore",
            {"m_step": "optax", "optimizer": "sgd"},
            description="PatchCore+, plain optax SGD M-step",
        ),
        Method(
            "patchcore+precond",
            "patchcore",
            {"m_step": "optax", "optimizer": "preconditioned"},
            description="PatchCore+, preconditioned optax M-step",
        ),
        Method(
            "patchcore+w_only",
            "patchcore",
            {"use_transport": False},
            description="least-squares W only (no transport term)",
        ),
        Method(
            "patchcore+union",
            "patchcore",
            {"bank": "union"},
            description="PatchCore+, scoring bank = M union R",
        ),
        Method(
            "patchcore+online",
            "patchcore",
            {},
            online=True,
            description="online PatchCore+ (refined prototypes join the bank)",
        ),
        Method(
            "patchcore+paper",
            "patchcore",
            PAPER,
            description="PatchCore+ with the paper's settings (ridge 1e-4)",
        ),
        Method(
            "patchcore+w_only_paper",
            "patchcore",
            {**PAPER, "use_transport": False},
            description="W only with the paper's settings",
        ),
        Method(
            "winclip",
            "winclip",
            {"use_refinement": False},
            description="WinCLIP, every support token and window (anomalib)",
        ),
        Method(
            "winclip_coreset",
            "winclip",
            {"use_refinement": False},
            description="WinCLIP against WinCLIP+'s coreset banks (like-for-like ablation)",
            host_options={"plain_memory": "coreset"},
        ),
        Method("winclip+", "winclip", {}, description="WinCLIP+"),
        Method(
            "winclip+uncalibrated",
            "winclip",
            {"calibrated": False},
            description="WinCLIP+ scored by the refined prototypes alone (the paper's)",
        ),
        Method(
            "winclip+w_only",
            "winclip",
            {"use_transport": False},
            description="WinCLIP+ without transport term",
        ),
    ]
    return {m.name: m for m in table}


METHODS = _methods()

STUDY_MAIN = {
    "patchcore": "patchcore",
    "patchcore+ (paper)": "patchcore+paper",
    "patchcore+": "patchcore+",
    "W only": "patchcore+w_only",
    "W only (paper)": "patchcore+w_only_paper",
    "patchcore+ optax sgd": "patchcore+sgd",
    "patchcore+ optax precond": "patchcore+precond",
    "patchcore+ union": "patchcore+union",
    "online patchcore+": "patchcore+online",
}
"""Row label of the study's main table -> method (the labels RESULTS.md shows)."""


def get_method(name: str) -> Method:
    """The method called `name`; unknown names list the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]
