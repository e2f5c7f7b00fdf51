"""`python -m experiments.eval`: the evaluation command line (`protorefine_jax.cli.eval`).

Kept as the entry point the design names; the code lives in the package
(`protorefine_jax/cli/eval.py` over `protorefine_jax/app/`), which the installed
console script `protorefine eval` runs too.
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads OpenBLAS
    from protorefine_jax.cli.eval import run

    run(sys.argv)
