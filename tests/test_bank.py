import jax.numpy as jnp
import numpy as np
import pytest

from protorefine_jax import build_bank
from protorefine_jax.bank import numerical_rank


def test_bank_rows_are_the_coreset_rows(rng):
    feats = rng.standard_normal((2, 100, 32)).astype(np.float32)
    bank = build_bank(jnp.asarray(feats), 0.1)
    flat = feats.reshape(-1, 32)
    np.testing.assert_array_equal(np.asarray(bank.prototypes), flat[np.asarray(bank.indices)])
    assert bank.prototypes.shape == (20, 32)


def test_bank_larger_than_feature_dim_is_flagged_degenerate(rng):
    feats = rng.standard_normal((4, 256, 64)).astype(np.float32)
    bank = build_bank(jnp.asarray(feats), 0.1)  # n = 102 > c = 64
    assert bank.degenerate
    assert "DEGENERATE" in bank.describe()


def test_small_bank_is_not_degenerate(rng):
    feats = rng.standard_normal((2, 256, 512)).astype(np.float32)
    bank = build_bank(jnp.asarray(feats), 0.05)  # n = 25 << c
    assert not bank.degenerate
    assert bank.bank_rank == 25


def test_numerical_rank_of_low_rank_matrix(rng):
    x = rng.standard_normal((200, 5)) @ rng.standard_normal((5, 40))
    assert numerical_rank(x) == 5


def test_nan_support_features_are_rejected(rng):
    feats = rng.standard_normal((50, 8)).astype(np.float32)
    feats[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"support_features contains 1 NaN"):
        build_bank(jnp.asarray(feats), 0.5)


def test_empty_support_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        build_bank(jnp.zeros((0, 8)), 0.5)
