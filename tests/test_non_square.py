"""Non-square inputs: HEIGHTxWIDTH sizes through reading, features, maps, fit/predict and eval."""

import numpy as np
import pytest
from PIL import Image

from protorefine_jax.app import deploy, overlays, runner
from protorefine_jax.data.imageio import read_image, read_mask
from protorefine_jax.detectors import PatchCore
from protorefine_jax.features import get_extractor


@pytest.mark.parametrize(
    ("text", "size"), [("256", 256), ("224x544", (224, 544)), ("64X64", 64), ("32,48", (32, 48))]
)
def test_parse_image_size(text, size):
    assert deploy.parse_image_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "2x3x4", "axb", "-16x32"])
def test_parse_image_size_errors(text):
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        deploy.parse_image_size(text)


def test_read_image_and_mask_keep_orientation(tmp_path):
    # A wide image (W=120, H=40): left half dark, right half bright.
    img = np.zeros((40, 120, 3), np.uint8)
    img[:, 60:] = 200
    Image.fromarray(img).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png", (16, 48))
    ref = np.asarray(Image.fromarray(img).resize((48, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out, ref)
    assert out.shape == (16, 48, 3) and out[:, :20].max() < 50 and out[:, 28:].min() > 150
    mask = np.zeros((40, 120), np.uint8)
    mask[:, 90:] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    m = read_mask(tmp_path / "m.png", (16, 48), 127)
    assert m.shape == (16, 48) and m[:, 36:].all() and not m[:, :35].any()


def test_extractor_grid_and_errors():
    ex = get_extractor("efficientnet_lite0", "simple", (32, 64))
    params = ex.init_params(np.array([0, 0], np.uint32))
    feats = ex.extract(params, np.zeros((2, 32, 64, 3), np.uint8))
    assert ex.grid == (4, 8) and feats.shape == (2, 32, ex.feature_dim)
    with pytest.raises(ValueError, match=r"\[B, 32, 64, 3\]"):
        ex.extract(params, np.zeros((2, 64, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="multiple of 16"):
        get_extractor("efficientnet_lite0", "simple", (32, 40))


def test_detector_maps_follow_the_shape(rng):
    det = PatchCore.create("efficientnet_lite0", "simple", (32, 64))
    params = det.load_params("random")
    images = rng.integers(0, 255, (3, 32, 64, 3)).astype(np.uint8)
    cfg = det.config(num_iters=1, sinkhorn_iters=5)
    state = det.fit(params, images[:2], config=cfg)
    out = det.score(params, state, images, cfg)
    assert out.maps.shape == (3, 32, 64) and np.all(np.isfinite(out.image_scores))


def test_fit_predict_and_eval_with_a_wide_size(tmp_path):
    from protorefine_jax.data import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "d", ["fabric"], 2, 2, 3, image_size=64) / "fabric"
    s = deploy.FitSettings(
        support_dir=str(root / "train/good"),
        out=str(tmp_path / "m"),
        image_size=(32, 64),
        weights="random",
        method="patchcore",
        batch_size=4,
        progress=False,
    )
    meta = deploy.fit_model(s, log=lambda _: None)
    assert meta["image_size"] == [32, 64] and meta["config"]["image_size"] == [32, 64]
    summary = deploy.predict(
        deploy.PredictSettings(
            model=str(tmp_path / "m"),
            images=str(root / "test"),
            out=str(tmp_path / "p"),
            batch_size=4,
            progress=False,
        ),
        log=lambda _: None,
    )
    assert summary["scored"] == 5
    overlay = np.asarray(Image.open(next((tmp_path / "p/overlays").glob("*.png"))))
    # image | map, each 32 x 64, on top of the key strip (padded white to the strip's width)
    assert overlay.shape[0] > 32 and overlay.shape[1] == max(128, overlays.KEY_MIN_WIDTH)
    assert np.all(overlay[:32, 128:] == 255)
    assert not np.all(overlay[:32, :64] == 255)
    res = runner.run(
        runner.Settings(
            dataset="folder",
            data_dir=str(root.parent),
            workdir=str(tmp_path / "e"),
            image_size=(32, 64),
            weights="random",
            shots=(1,),
            seeds=(0,),
            methods=("patchcore",),
            batch_size=4,
            num_heatmaps=1,
            progress=False,
        )
    )
    assert res["rows"][0]["pixel_auroc"] is not None
    assert res["config"]["families"]["patchcore"]["features"]["grid"] == [4, 8]
