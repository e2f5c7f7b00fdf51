"""Multi-device sharding (4 fake CPU devices, in a subprocess: the library and the eval's
`--devices`) and jax.export."""

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np

from protorefine_jax import RefineConfig, build_bank, make_detect
from protorefine_jax.export import export_detect, load_detect

CFG = RefineConfig(num_iters=3, sinkhorn_iters=20, image_size=(32, 32))


def patchify_extract(params, images):
    """A tiny stand-in backbone: 4x4 patches through a linear map."""
    b = images.shape[0]
    patches = images.reshape(b, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(b, 64, 48) @ params


SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from protorefine_jax import RefineConfig, build_bank, make_detect, refine_and_score
    from protorefine_jax.sharding import run_sharded
    from test_sharding_export import CFG, patchify_extract

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((48, 40)) / 50, jnp.float32)
    images = jnp.asarray(rng.random((6, 32, 32, 3)) * 255, jnp.float32)
    bank = build_bank(patchify_extract(w, images[:2]), 0.1).prototypes
    feats = patchify_extract(w, images)
    one = refine_and_score(bank, feats, CFG)
    four = run_sharded(refine_and_score, (bank, feats, CFG), batch_argnum=1)
    # 6 queries on 4 devices: padded to 8, then cut back.
    assert four.maps.shape == one.maps.shape, four.maps.shape
    np.testing.assert_allclose(four.image_scores, one.image_scores, rtol=1e-5)
    np.testing.assert_allclose(four.maps, one.maps, rtol=1e-5, atol=1e-5)
    detect = make_detect(patchify_extract)
    d1 = detect(w, bank, images, CFG)
    d4 = run_sharded(detect, (w, bank, images, CFG), batch_argnum=2)
    np.testing.assert_allclose(d4.maps, d1.maps, rtol=1e-5, atol=1e-5)

    # The eval's --devices: Host features and offline scores split over the mesh.
    import pytest
    from protorefine_jax.app.batching import BatchedDetector, device_mesh, score_features
    from protorefine_jax.detectors import PatchCore
    det = PatchCore.create("efficientnet_lite0", "simple", 64)
    params = det.load_params("random")
    pics = (rng.random((7, 64, 64, 3)) * 255).astype(np.uint8)
    mesh = device_mesh(4, 4)
    assert mesh.size == 4 and device_mesh(1, 4) is None and device_mesh(0, 8).size == 4
    f1 = BatchedDetector(det, params, 4).features(pics)
    f4 = BatchedDetector(det, params, 4, mesh).features(pics)  # 7 images: the last batch padded
    assert isinstance(f4, np.ndarray) and f4.shape == f1.shape, f4.shape
    np.testing.assert_allclose(f4, f1, rtol=1e-4, atol=1e-4 * np.abs(f1).max())
    cfg = det.config(num_iters=2)
    state = det.fit_features(f1[:2], alpha=0.5, config=cfg)
    s1 = score_features(det, state, f1[2:], cfg, 4)
    s4 = score_features(det, state, f1[2:], cfg, 4, None, mesh)
    np.testing.assert_allclose(s4.image_scores, s1.image_scores, rtol=1e-4)
    np.testing.assert_allclose(s4.maps, s1.maps, rtol=1e-4, atol=1e-5 * np.abs(s1.maps).max())
    bad = f1[2:].copy()
    bad[1, 3, 0] = np.nan  # checked on the device, then named from the host
    with pytest.raises(ValueError, match="not finite|NaN"):
        score_features(det, state, bad, cfg, 4, None, mesh)
    with pytest.raises(ValueError, match="multiple of 4"):
        device_mesh(4, 6)
    with pytest.raises(ValueError, match="JAX sees 4 local"):
        device_mesh(5, 5)
    print("SHARDED-OK")
    """
)


def test_four_fake_devices_give_the_single_device_results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    paths = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600
    )
    assert "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]


def test_exported_detect_reloads_and_reproduces_the_scores(rng, tmp_path):
    w = jnp.asarray(rng.standard_normal((48, 40)) / 50, jnp.float32)
    images = jnp.asarray(rng.random((3, 32, 32, 3)) * 255, jnp.float32)
    bank = build_bank(patchify_extract(w, images[:1]), 0.25).prototypes
    detect = make_detect(patchify_extract)
    path = tmp_path / "detect.jaxexport"
    path.write_bytes(export_detect(detect, w, bank, CFG, (32, 32, 3)))
    reloaded = load_detect(path.read_bytes())
    scores, maps, patch_scores = reloaded(images)
    ref = detect(w, bank, images, CFG)
    # Squared feature norms are ~1e3; a differently fused program rounds the
    # cancelling ||f||^2 + ||r||^2 - 2<f, r> at ~1e-5 of that.
    feat_sq = float(jnp.mean(jnp.sum(patchify_extract(w, images) ** 2, -1)))
    np.testing.assert_allclose(scores, ref.image_scores, rtol=1e-4)
    np.testing.assert_allclose(maps, ref.maps, rtol=1e-4, atol=1e-5 * feat_sq)
    np.testing.assert_allclose(patch_scores, ref.patch_scores, rtol=1e-4, atol=1e-5 * feat_sq)
    # The batch axis is symbolic: another batch size runs from the same artifact.
    assert reloaded(images[:1])[1].shape == (1, 32, 32)


def test_host_devices_are_requested_by_the_command_line_only_before_jax_starts(monkeypatch):
    from jax._src import xla_bridge

    from protorefine_jax.cli.common import request_host_devices

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    request_host_devices(1)  # one device: nothing to ask for
    assert "XLA_FLAGS" not in os.environ
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
    request_host_devices(3)
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=3"
    request_host_devices(5)  # the user's (or an earlier) count stays
    assert os.environ["XLA_FLAGS"].endswith("count=3")
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    request_host_devices(4)  # JAX has started: too late, left for device_mesh to name the fix
    assert "XLA_FLAGS" not in os.environ
