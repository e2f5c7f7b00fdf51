"""Shared test helpers."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# The suite is dominated by XLA:CPU compiles of tiny programs; LLVM's -O0 backend
# compiles them 1.4-2x faster. HLO-level passes (and so the arithmetic the tests
# check against their references) are unchanged; generated machine code is slower,
# which no test measures. Set PROTOREFINE_TEST_FULL_OPT=1 to test the optimised
# backend. Read by XLA when the backend starts, so it must be set before any test
# runs JAX (subprocesses the tests start inherit it).
if not os.environ.get("PROTOREFINE_TEST_FULL_OPT"):
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()

# Many tests compile the same tiny programs (the same detector shapes in several
# files, the eager ops every worker compiles for itself, the subprocesses the
# tests start). One JAX compilation cache for the whole run lets a worker or a
# subprocess load what another already compiled (the eval's WinCLIP test: 52 s
# cold, 22 s warm). The cache lives in a directory of this run only (the xdist
# workers and the subprocesses share it through the environment) and is removed
# when the run ends, so no run reuses another's programs. Cache hits skip the
# XLA backend compile only: tracing, and so every recompile count the tests
# assert, is unchanged. A cache directory set by the caller is used as is.
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE = _CACHE_ENV not in os.environ
if _OWN_CACHE:
    # Set in the process that loads this first (the xdist controller): the
    # workers it starts inherit the variable, so they share its directory,
    # which goes when that process exits (also when a script imported this).
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="protorefine-jax-cache-")
    atexit.register(shutil.rmtree, os.environ[_CACHE_ENV], ignore_errors=True)
    # Every program, however small or quick to compile, is worth sharing here.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

if _OWN_CACHE:  # the environment is read when jax is imported: set it too, in case that was earlier
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def rng():
    return np.random.default_rng(0)
