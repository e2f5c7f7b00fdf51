"""Shared test helpers."""

from __future__ import annotations

import os
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

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def rng():
    return np.random.default_rng(0)
