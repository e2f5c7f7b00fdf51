import jax
import jax.numpy as jnp
import pytest

from experiments.bench_memory import largest_batch, memory_fields, refine_programs


def test_largest_batch_extrapolates_the_two_largest_batches():
    mib = 1e9 / 2**20  # one GB in MiB
    rows = [
        {"batch": 1, "total_mb": 999.0},  # ignored: only the two largest batches count
        {"batch": 8, "total_mb": 2 * mib + 8 * 0.5 * mib},
        {"batch": 64, "total_mb": 2 * mib + 64 * 0.5 * mib},
    ]
    # 2 GB fixed + 0.5 GB per query: 24 GB holds 44 queries, 80 GB 156.
    assert largest_batch(rows, 24) == 44
    assert largest_batch(rows, 80) == 156


def test_largest_batch_is_none_without_growth():
    rows = [{"batch": 1, "total_mb": 5.0}, {"batch": 8, "total_mb": 5.0}]
    assert largest_batch(rows, 24) is None


def test_memory_fields_count_arguments_outputs_and_scratch():
    f = jax.jit(lambda x: jnp.sin(x @ x.T).sum(0))
    compiled = f.lower(jax.ShapeDtypeStruct((256, 64), jnp.float32)).compile()
    got = memory_fields(compiled)
    assert got["argument_mb"] == pytest.approx(256 * 64 * 4 / 2**20)
    assert got["output_mb"] == pytest.approx(256 * 4 / 2**20)
    assert got["total_mb"] >= got["argument_mb"] + got["output_mb"]


def test_refine_program_memory_grows_with_the_batch():
    (_, _, base), (_, _, plus) = refine_programs(m=16, n=6, c=8)
    small, big = (memory_fields(plus(b).compile())["total_mb"] for b in (1, 4))
    assert big > small
    assert memory_fields(base(1).compile())["argument_mb"] > 0
