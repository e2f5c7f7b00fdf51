"""`python -m experiments.predict`: the predict command line (`protorefine_jax.cli.predict`).

Kept as the entry point the design names; the code lives in the package
(`protorefine_jax/cli/predict.py` over `protorefine_jax/app/`), which the installed
console script `protorefine predict` runs too.
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads OpenBLAS
    from protorefine_jax.cli.predict import run

    sys.exit(run(sys.argv))
