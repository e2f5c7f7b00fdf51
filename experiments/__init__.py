"""Experiments: the eval CLI, the benchmark and the reproduction study.

Importing this package changes nothing in the process. The CLIs set
`OPENBLAS_NUM_THREADS=1` when run as programs (`python -m experiments.eval`,
`experiments.research.study`; `experiments.bench` re-executes itself): on CPU, XLA's
threads and OpenBLAS's (used by jax for the Cholesky factor) compete for the
same cores, and one OpenBLAS thread is several times faster for the small
solves of the refinement (BENCHMARKS.md).
"""
