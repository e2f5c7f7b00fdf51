"""The methods the eval CLI knows: host family plus `RefineConfig` overrides.

`patchcore` / `winclip` are the host methods; `patchcore+` / `winclip+` the
refined ones with the configuration the flags give (whose defaults are the
shipped ones). The suffixed variants pin one ablation each, so one run can put
them side by side with identical support sets (RESULTS.md).
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
    """

    name: str
    host: str
    overrides: dict[str, Any]
    online: bool = False
    description: str = ""
    host_options: dict[str, Any] = dataclasses.field(default_factory=dict)


def _methods() -> dict[str, Method]:
    table = [
        Method("patchcore", "patchcore", {"use_refinement": False}, description="PatchCore"),
        Method("patchcore+", "patchcore", {}, description="PatchCore+ (flags' M-step)"),
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
            "winclip+w_only",
            "winclip",
            {"use_transport": False},
            description="WinCLIP+ without transport term",
        ),
    ]
    return {m.name: m for m in table}


METHODS = _methods()


def get_method(name: str) -> Method:
    """The method called `name`; unknown names list the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]
