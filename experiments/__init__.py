"""Experiments: the eval CLI, the benchmark and the reproduction study.

On CPU, XLA's threads and OpenBLAS's (used by jax for the Cholesky factor)
compete for the same cores; one OpenBLAS thread is several times faster for
the small solves of the refinement (BENCHMARKS.md). Set before numpy loads.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
