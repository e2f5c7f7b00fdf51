"""What a user is told about a fitted memory bank: plain advice, diagnostics only on request.

`MemoryBank.describe()` is a researcher's line (ranks, "DEGENERATE", the
ridge rule). A user needs to know whether the model is usable and what to
do: `bank_advice` says that, and `bank_diagnostics` keeps the researcher's
line for `--verbose` (fit) and results.json (eval rows: `banks`).

The degenerate regime (the bank spans the good images' features, so the
least-squares step could reproduce a defect too) is what the shipped ridges
are for: `ridge = 1e-2`, and `ridge_wide = 1e-1` for banks with at least as
many prototypes as feature dimensions (RESULTS.md, section 2, "The degenerate
regime and its remedy": with the paper's 1e-4 the 4-shot AUROC fell from 99.7
to 80.6 on metal_plate; 1e-2 and 1e-1 both held). So a degenerate bank with
those ridges is a note, and one with a smaller ridge a warning with the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# The smallest relative ridge RESULTS.md section 2 found safe in the degenerate regime.
SAFE_RIDGE = 1e-2


def refine_config(config: Any) -> Any:
    """The `RefineConfig` of a detector's config (`WinClipConfig` holds one as `refine`)."""
    from protorefine_jax.config import RefineConfig

    # The explicit union of the two detectors' configs: PatchCore's RefineConfig,
    # WinCLIP's WinClipConfig (which holds one as `refine`).
    return config if isinstance(config, RefineConfig) else config.refine


def bank_diagnostics(banks: Sequence[Any]) -> str:
    """The researcher's line: every bank's size, ranks and degeneracy (`MemoryBank.describe`)."""
    return "; ".join(b.describe() for b in banks)


def bank_advice(banks: Sequence[Any], config: Any) -> list[str]:
    """Plain lines about the banks of a fitted state (none when there is nothing to say).

    Args:
      banks: the state's `MemoryBank`s.
      config: the `RefineConfig` the model scores with (or a config holding
        one as `refine`, e.g. `WinClipConfig`).
    """
    config = refine_config(config)
    if not config.use_refinement:
        return []  # plain PatchCore: the bank's span does not matter
    lines = []
    for bank in banks:
        if not bool(bank.degenerate):
            continue
        n, c = bank.prototypes.shape
        wide = n >= c
        name = "ridge_wide" if wide else "ridge"
        ridge = float(getattr(config, name))
        what = (
            f"the memory bank ({n} prototypes of {c} features) covers every direction the good "
            "images' features use, so refinement alone could reproduce a defect"
        )
        if ridge >= SAFE_RIDGE:
            lines.append(
                f"note: {what}; the model's ridge ({name}={ridge:g}) is the remedy for exactly "
                "this case (RESULTS.md, section 2). The model is usable as is; nothing to do."
            )
        else:
            lines.append(
                f"warning: {what}, and --{name}={ridge:g} is below the {SAFE_RIDGE:g} found safe "
                "there (RESULTS.md, section 2: with 1e-4 the AUROC fell from 99.7 to 80.6 on "
                f"metal_plate). Defects may be missed: fit again without --{name} (the shipped "
                "value), or with --method=patchcore."
            )
        break  # one line says it for every bank
    return lines


def show_banks(banks: Sequence[Any], config: Any, verbose: bool, log) -> None:
    """Logs `bank_advice`, and with `verbose` the researcher's `bank_diagnostics` too."""
    for line in bank_advice(banks, config):
        log(line)
    if verbose:
        log("diagnostics: " + bank_diagnostics(banks))


def refinement_check_line(check: Any) -> str | None:
    """One plain sentence on fit's refinement check (`calibration.RefinementCheck`), or None."""
    if check is None:
        return None
    host, fused = float(check.host_auroc), float(check.fused_auroc)
    n, p = int(check.images), int(check.pasted)
    tested = (
        f"on {n} good image(s) with {p} pasted defects each, held out as in the calibration, "
        f"PatchCore+ tells the defects from normal variation with AUROC {fused:.1f}, "
        f"PatchCore alone with {host:.1f}"
    )
    if check.keep:
        return "refinement check: " + tested + "; the model fuses both halves."
    return (
        "refinement check: "
        + tested
        + " (significantly better), so this model scores with the PatchCore half alone, in "
        "PatchCore+'s units (the threshold and reports read as usual). Nothing to do; "
        "--pseudo_anomalies=0 fuses both halves regardless."
    )


def show_refinement_check(check: Any, log) -> None:
    """Logs `refinement_check_line` when a check ran."""
    line = refinement_check_line(check)
    if line:
        log(line)
