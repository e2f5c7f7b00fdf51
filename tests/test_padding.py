"""padding: the one fixed-batch padding every batched loop uses."""

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from protorefine_jax.padding import fixed_batches, pad_to, pad_to_multiple

REPO = Path(__file__).resolve().parents[1]


def test_pad_to_repeats_the_last_row_numpy_and_jax():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    want = np.array([[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]], np.float32)
    got = pad_to(x, 5)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, want)
    got = pad_to(jnp.asarray(x), 5)
    assert isinstance(got, jax.Array)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert pad_to(x, 3) is x  # nothing to pad: the array itself


def test_pad_to_pads_every_leaf_of_a_pytree():
    tree = {"a": np.arange(2), "b": (np.ones((2, 3)), jnp.zeros((2, 1)))}
    out = pad_to(tree, 4)
    np.testing.assert_array_equal(out["a"], [0, 1, 1, 1])
    assert out["b"][0].shape == (4, 3) and out["b"][1].shape == (4, 1)


def test_pad_to_multiple():
    padded, n = pad_to_multiple(np.arange(5), 4)
    assert n == 5
    np.testing.assert_array_equal(padded, [0, 1, 2, 3, 4, 4, 4, 4])
    padded, n = pad_to_multiple(np.arange(8), 4)
    assert n == 8 and len(padded) == 8


def test_fixed_batches_one_shape_and_the_real_rows():
    x = np.arange(10)[:, None] * np.ones((10, 3), np.int32)
    batches = list(fixed_batches(x, 4))
    assert [b.shape for b, _ in batches] == [(4, 3)] * 3
    assert [n for _, n in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b[:n] for b, n in batches]), x)
    np.testing.assert_array_equal(batches[-1][0][:, 0], [8, 9, 9, 9])
    assert list(fixed_batches(x[:0], 4)) == []


def test_padding_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"cannot pad 5 row\(s\) to 4"):
        pad_to(np.arange(5), 4)
    with pytest.raises(ValueError, match=r"cannot pad 0 row\(s\) to 4"):
        pad_to(np.arange(0), 4)
    with pytest.raises(ValueError, match=r"leaves of unequal leading size \[2, 3\]"):
        pad_to((np.arange(2), np.arange(3)), 4)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        list(fixed_batches(np.arange(3), 0))


def test_no_other_module_pads_by_repeating_the_last_row():
    """One padding: no module of the package or the experiments repeats `x[-1:]` itself."""
    offenders = []
    for path in [*REPO.glob("protorefine_jax/**/*.py"), *REPO.glob("experiments/**/*.py")]:
        if path.name == "padding.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            is_repeat = isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "repeat"
            if is_repeat and node.args and "[-1:]" in ast.unparse(node.args[0]):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders
