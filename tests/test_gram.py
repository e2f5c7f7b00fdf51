"""`gram.times_pow2` against numpy's correctly rounded `ldexp`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from protorefine_jax.gram import times_pow2

# Exponents from 0 to the widest the Gram system passes (`2 shift`, |k| <= 554).
EXPONENTS = [0, 1, -1, 126, -126, 127, -149, 150, 277, -277, 300, -300, 554, -554]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_times_pow2_equals_exact_ldexp_wherever_input_and_result_are_normal(rng, dtype):
    info = np.finfo(dtype)
    span = (-140, 128) if dtype == np.float32 else (-1000, 1000)
    x = rng.standard_normal(20_000) * np.exp2(rng.integers(*span, 20_000).astype(float))
    with np.errstate(over="ignore"):  # float32 overflow to inf is one of the cases
        x = x.astype(dtype)
    x[:5] = [0.0, -0.0, np.inf, -np.inf, np.nan]

    def normal(v):
        return (np.abs(v) >= info.tiny) | (v == 0) | ~np.isfinite(v)

    with jax.enable_x64(dtype == np.float64):
        fn = jax.jit(times_pow2)
        for k in EXPONENTS:
            got = np.asarray(fn(jnp.asarray(x), k))
            assert got.dtype == dtype
            with np.errstate(over="ignore"):
                ref = np.ldexp(x, k)  # exact: numpy rounds once, correctly
            # XLA:CPU flushes subnormal inputs and outputs to zero (as jnp.ldexp does).
            keep = normal(x) & normal(ref)
            assert keep.sum() > 15_000
            np.testing.assert_array_equal(got[keep], ref[keep], err_msg=f"k={k}")
            # Overflow is inf with the input's sign, underflow a signed zero or subnormal.
            big = np.isinf(ref) & np.isfinite(x) & normal(x)
            assert np.array_equal(got[big], ref[big])


def test_times_pow2_takes_an_exponent_per_row(rng):
    x = rng.standard_normal((6, 5)).astype(np.float32)
    k = np.array([[-130], [-3], [0], [4], [140], [200]], np.int32)
    got = np.asarray(jax.jit(times_pow2)(jnp.asarray(x), jnp.asarray(k)))
    with np.errstate(over="ignore"):
        ref = np.ldexp(x, k)
    keep = (np.abs(ref) >= np.finfo(np.float32).tiny) & np.isfinite(ref)
    np.testing.assert_array_equal(got[keep], ref[keep])
    assert np.all(np.isinf(got[5])) and np.all(np.isinf(ref[5]))
