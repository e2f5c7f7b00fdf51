"""`python -m experiments.fit`: the fit command line (`protorefine_jax.cli.fit`).

Kept as the entry point the design names; the code lives in the package
(`protorefine_jax/cli/fit.py` over `protorefine_jax/app/`), which the installed
console script `protorefine fit` runs too.
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads OpenBLAS
    from protorefine_jax.cli.fit import run

    sys.exit(run(sys.argv))
