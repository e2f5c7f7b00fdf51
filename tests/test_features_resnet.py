"""Wide-ResNet-50-2 in Flax against torchvision (fixture) and the converter's error paths.

The fixture ``tests/fixtures/wrn50_2_random.npz`` holds torchvision's ``layer2`` /
``layer3`` outputs for synthetic weights; ``tests/fixtures/make_torch_fixtures.py``
documents how it was made (torch in a separate venv). Here the same weights are
regenerated with numpy, written to a checkpoint file, loaded through the
extractor's ``load_params`` and run through the Flax model.
"""

import importlib.util
import os

import jax
import numpy as np
import pytest

from protorefine_jax.features import CheckpointError, get_extractor, resnet

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
_spec = importlib.util.spec_from_file_location(
    "synthetic_weights", os.path.join(FIXTURES, "synthetic_weights.py")
)
synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic)


@pytest.fixture(scope="module")
def reference():
    return np.load(os.path.join(FIXTURES, "wrn50_2_random.npz"))


@pytest.fixture(scope="module")
def state():
    return {k: synthetic.synthetic_weight(k, s) for k, s in resnet.expected_shapes().items()}


def test_synthetic_weights_match_the_fixture(reference, state):
    # Guards against the generator drifting from what the torch script used.
    assert int(reference["seed"]) == synthetic.SEED
    for key, checksum in zip(reference["checksum_keys"], reference["checksums"], strict=True):
        np.testing.assert_allclose(state[str(key)].astype(np.float64).sum(), checksum, rtol=1e-12)
    np.testing.assert_allclose(synthetic.synthetic_input().sum(), reference["input_sum"], rtol=1e-6)


def test_parity_with_torchvision(tmp_path, reference, state):
    path = str(tmp_path / "wrn_synthetic.npz")
    full = dict(state)
    full["layer4.0.conv1.weight"] = np.zeros((512, 1024, 1, 1), np.float32)  # ignored
    full["fc.weight"] = np.zeros((1000, 2048), np.float32)  # ignored
    full["bn1.num_batches_tracked"] = np.zeros((), np.int64)  # ignored
    np.savez(path, **full)
    variables = get_extractor("wide_resnet50_2").load_params(path)

    x = synthetic.synthetic_input().transpose(0, 2, 3, 1)  # NCHW -> NHWC, already normalised
    layer2, layer3 = jax.jit(resnet.WideResNet50_2().apply)(variables, x)
    for name, got in (("layer2", layer2), ("layer3", layer3)):
        want = reference[name].transpose(0, 2, 3, 1)
        assert got.shape == want.shape, name
        scale = np.abs(want).max()
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * scale)
        assert np.abs(np.asarray(got) - want).max() / scale < 1e-4, name


def test_param_tree_matches_module_init(state):
    converted = resnet.params_from_state_dict(state)
    shapes = jax.eval_shape(
        resnet.WideResNet50_2().init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)
    )
    same = jax.tree.map(lambda a, b: a.shape == b.shape, converted, shapes)
    assert all(jax.tree.leaves(same))


def test_load_params_requires_a_path():
    with pytest.raises(ValueError, match="wide_resnet50_2 has no shipped weights.*path"):
        get_extractor("wide_resnet50_2").load_params()


def test_missing_checkpoint_names_the_file(tmp_path):
    path = str(tmp_path / "wide_resnet50_2-95faca4d.pth")
    with pytest.raises(CheckpointError, match="not found: .*wide_resnet50_2-95faca4d.pth"):
        get_extractor("wide_resnet50_2").load_params(path)


def test_missing_key_names_file_and_key(tmp_path, state):
    path = str(tmp_path / "partial.npz")
    partial = {k: v for k, v in state.items() if not k.startswith("layer1.")}
    np.savez(path, **{k: partial[k] for k in list(partial)[:5]})  # stem only
    with pytest.raises(CheckpointError, match=r"partial.npz: missing key 'layer1.0.conv1.weight'"):
        get_extractor("wide_resnet50_2").load_params(path)


def test_wrong_shape_names_file_and_key(tmp_path):
    # A plain ResNet-50 has 64-wide bottlenecks where WRN-50-2 has 128.
    path = str(tmp_path / "resnet50.npz")
    resnet50 = resnet.expected_shapes(width_multiplier=1)
    np.savez(path, **{k: np.zeros(s, np.float32) for k, s in list(resnet50.items())[:8]})
    with pytest.raises(
        CheckpointError,
        match=r"resnet50.npz: key 'layer1.0.conv1.weight' has shape \(64, 64, 1, 1\)",
    ):
        get_extractor("wide_resnet50_2").load_params(path)
