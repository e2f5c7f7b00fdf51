"""`protorefine eval|fit|predict [flags]`: the installed console script."""

from __future__ import annotations

import os
import sys

TOOLS = ("eval", "fit", "predict")
USAGE = (
    "usage: protorefine {eval,fit,predict} [flags]\n"
    "  eval     few-shot evaluation on a dataset (AUROC, AUPRO tables)\n"
    "  fit      fit a detector on a folder of good images; writes a model directory\n"
    "  predict  score a folder of images with a fitted model; writes a report\n"
    "`protorefine <tool> --help` lists the tool's flags."
)


def main(argv: list[str] | None = None) -> int:
    """Dispatches to the tool named by the first argument."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    tool = argv[1]
    if tool not in TOOLS:
        print(f"error: unknown tool {tool!r}.\n{USAGE}", file=sys.stderr)
        return 2
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads OpenBLAS
    rest = [f"protorefine {tool}", *argv[2:]]
    if tool == "eval":
        from protorefine_jax.cli import eval as tool_module

        tool_module.run(rest)  # absl's app.run exits itself
        return 0
    if tool == "fit":
        from protorefine_jax.cli import fit as tool_module
    else:
        from protorefine_jax.cli import predict as tool_module
    return int(tool_module.run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
