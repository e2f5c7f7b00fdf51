"""Issue 28 (speed a user feels): predict's pipelined reader and writer, its profile, the
overlay encoder and the paginated report; behaviour only, no timing."""

import csv
import io
import re
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
from helpers import FAST_FIT, FAST_REFINE, demo_category
from PIL import Image

from experiments.bench_predict import sequential_predict
from protorefine_jax.app import deploy, html_report, report
from protorefine_jax.app.overlays import colour_map, encode_png, side_by_side
from protorefine_jax.app.prefetch import NO_STAGES, Stages, ordered_map
from protorefine_jax.data.errors import CorruptImageError

FAST = FAST_FIT


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_category(tmp_path_factory)


@pytest.fixture(scope="module")
def model(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "m"
    s = deploy.FitSettings(
        support_dir=str(demo / "train/good"), out=str(out), refine=FAST_REFINE, **FAST
    )
    deploy.fit_model(s, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def images(demo, tmp_path_factory):
    """The test images three times over (18), and a truncated file among them."""
    folder = tmp_path_factory.mktemp("imgs")
    files = sorted((demo / "test").rglob("*.png"))
    for copy in range(3):
        for p in files:
            shutil.copy(p, folder / f"{copy}_{p.parent.name}_{p.name}")
    (folder / "1_zz_truncated.png").write_bytes(files[0].read_bytes()[:200])
    return folder


def _predict(model, images, out, profile=None, batch_size=4, **kw):
    s = deploy.PredictSettings(
        model=str(model),
        images=str(images),
        out=str(out),
        batch_size=batch_size,
        progress=False,
        **kw,
    )
    return deploy.predict(s, log=lambda _: None, profile=profile)


# --------------------------------------------------------------------------- ordered_map


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_ordered_map_yields_in_input_order(workers):
    def slow_square(x):
        time.sleep(0.002 * ((x * 7) % 5))  # finishes out of order
        return x * x

    assert list(ordered_map(slow_square, range(40), workers)) == [x * x for x in range(40)]


def test_ordered_map_raises_at_the_failing_item_and_stops_the_pool():
    seen = []

    def fn(x):
        if x == 5:
            raise CorruptImageError("Cannot decode image broken/5.png: truncated")
        return x

    gen = ordered_map(fn, range(100), workers=2, depth=4)
    for x in gen:
        seen.append(x)
        if x == 4:
            break
    gen.close()
    assert seen == [0, 1, 2, 3, 4]
    with pytest.raises(CorruptImageError, match="broken/5.png"):
        list(ordered_map(fn, range(100), workers=2, depth=4))
    assert not [t for t in threading.enumerate() if t.name.startswith("ordered_map")]


def test_ordered_map_keeps_at_most_depth_items_ahead():
    started = []

    def fn(x):
        started.append(x)
        return x

    gen = ordered_map(fn, range(100), workers=2, depth=3)
    assert next(gen) == 0
    time.sleep(0.05)
    assert len(started) <= 4  # the one yielded and at most `depth` waiting
    gen.close()


def test_stages_add_up_and_no_stages_records_nothing():
    st = Stages()
    with st("decode", 3):
        pass
    st.add("decode", 0.5, 2)
    rep = st.report()["decode"]
    assert rep["calls"] == 2 and rep["items"] == 5 and rep["seconds"] >= 0.5
    with NO_STAGES("decode"):
        pass
    assert NO_STAGES.report() == {}


# --------------------------------------------------------------------------- reader


def test_read_chunks_equal_read_batch_in_order_and_errors_kept(images):
    files = sorted(images.glob("*.png"))
    chunks = list(deploy.read_chunks(files, 64, strict=False, chunk=4, workers=2))
    assert [c[0] for c in chunks] == list(range(0, len(files), 4))
    for start, pixels, ok, errors in chunks:
        ref_pixels, ref_ok, ref_errors = deploy.read_batch(files[start : start + 4], 64, False)
        np.testing.assert_array_equal(pixels, ref_pixels)
        assert ok == ref_ok and errors == ref_errors
    bad = [(start + i, e) for start, _, _, errs in chunks for i, e in errs.items()]
    assert len(bad) == 1 and files[bad[0][0]].name == "1_zz_truncated.png"
    assert "CorruptImageError" in bad[0][1] and "1_zz_truncated.png" in bad[0][1]


def test_read_chunks_strict_raises_the_error_naming_the_file(images):
    files = sorted(images.glob("*.png"))
    with pytest.raises(CorruptImageError, match="1_zz_truncated.png"):
        list(deploy.read_chunks(files, 64, strict=True, chunk=4, workers=2))


# --------------------------------------------------------------------------- outputs


def test_encode_png_is_lossless_and_readable(rng):
    for shape in [(1, 1, 3), (7, 5, 3), (64, 130, 3)]:
        rgb = rng.integers(0, 256, shape, dtype=np.uint8)
        back = np.asarray(Image.open(io.BytesIO(encode_png(rgb))))
        assert back.dtype == np.uint8 and back.shape == shape
        np.testing.assert_array_equal(back, rgb)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), np.float32))


def test_side_by_side_and_shared_colours_give_the_same_pixels(rng):
    image = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    amap = rng.normal(1.0, 0.5, (32, 48))
    colours = colour_map(amap, 0.5, 1.5)
    empty = np.zeros(amap.shape, bool)
    np.testing.assert_array_equal(
        side_by_side(image, colours), report.overlay(image, amap, empty, 0.5, 1.5)
    )
    np.testing.assert_array_equal(
        html_report.make_thumbnail(image, amap, 0.5, 1.5, colours=colours),
        html_report.make_thumbnail(image, amap, 0.5, 1.5),
    )


# --------------------------------------------------------------------------- predict


def test_predictions_identical_with_and_without_pipelining(model, images, tmp_path):
    profile = Stages()
    fast = _predict(model, images, tmp_path / "fast", profile=profile)
    with sequential_predict():
        slow = _predict(model, images, tmp_path / "slow")
    n = len(list(images.glob("*.png")))
    assert fast["scored"] == slow["scored"] == n - 1 and fast["unreadable"] == 1
    for name in ("predictions.csv", "predictions.jsonl"):
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "slow" / name).read_bytes()
    fast_png = sorted((tmp_path / "fast/overlays").glob("*.png"))
    slow_png = sorted((tmp_path / "slow/overlays").glob("*.png"))
    assert [p.name for p in fast_png] == [p.name for p in slow_png] and len(fast_png) == n - 1
    for a, b in zip(fast_png, slow_png, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    speed = re.compile(r"\d+ images in [^<]*images/s[^<]*")
    pages = [speed.sub("", (tmp_path / d / "report.html").read_text()) for d in ("fast", "slow")]
    assert pages[0] == pages[1]
    # The profile names every stage of the run.
    stages = set(profile.report())
    for name in (
        "decode",
        "resize",
        "transfer",
        "dispatch",
        "wait for detector",
        "wait for images",
        "colouring",
        "overlay drawing",
        "overlay encoding",
        "overlay writing",
        "thumbnail",
        "CSV and JSONL writing",
        "report writing",
    ):
        assert name in stages, (name, stages)
    assert profile.report()["decode"]["items"] == n  # the truncated file too


def test_strict_stops_at_the_bad_file_with_earlier_outputs_written(model, images, tmp_path):
    with pytest.raises(CorruptImageError, match="1_zz_truncated.png"):
        _predict(model, images, tmp_path / "out", strict=True, batch_size=2)
    summary = (tmp_path / "out/summary.json").read_text()
    files = sorted(p.name for p in images.glob("*.png"))
    before = files.index("1_zz_truncated.png") // 8 * 8  # the chunks (of 4 batches) before it
    assert before > 0
    assert f'"scored_before_error": {before}' in summary
    assert len(list((tmp_path / "out/overlays").glob("*.png"))) == before


def test_export_runtime_pipelined_gives_the_library_scores(model, images, tmp_path, demo):
    out = tmp_path / "m"
    s = deploy.FitSettings(
        support_dir=str(demo / "train/good"), out=str(out), refine=FAST_REFINE, export=True, **FAST
    )
    deploy.fit_model(s, log=lambda _: None)
    lib = _predict(out, images, tmp_path / "lib", runtime="library", overlays="none")
    exp = _predict(out, images, tmp_path / "exp", runtime="export", overlays="none")
    assert lib["scored"] == exp["scored"]
    rows = [list(csv.DictReader((tmp_path / d / "predictions.csv").open())) for d in ("lib", "exp")]
    np.testing.assert_allclose(
        [float(r["score"] or "nan") for r in rows[0]],
        [float(r["score"] or "nan") for r in rows[1]],
        rtol=1e-4,
    )


# --------------------------------------------------------------------------- report


def _items(n):
    thumb = np.full((16, 16, 3), 128, np.uint8)
    return [
        html_report.ReportItem(
            name=f"img_{i:05d}.png",
            score=float(i),
            anomalous=i % 3 == 0,
            thumbnail=html_report.encode_thumbnail(thumb) if i % 2 else thumb,
        )
        for i in range(n)
    ]


def test_report_is_paginated_and_lazy(tmp_path):
    n = 2 * html_report.PAGE_SIZE + 17
    page = html_report.render_report(_items(n), title="t", settings={})
    assert page.count("<figure") == n
    assert page.count(' src="data:image/jpeg') == html_report.PAGE_SIZE
    assert page.count(' data-src="data:image/jpeg') == n - html_report.PAGE_SIZE
    assert page.count('loading="lazy"') == n
    assert page.count('class="card hidden"') + page.count('class="card anom hidden"') == (
        n - html_report.PAGE_SIZE
    )
    assert 'id="pager"' in page and "<noscript>" in page
    # Encoded and array thumbnails give the same card.
    thumb = np.full((16, 16, 3), 128, np.uint8)
    a = html_report.ReportItem(name="a", score=1.0, anomalous=False, thumbnail=thumb)
    b = html_report.ReportItem(
        name="a", score=1.0, anomalous=False, thumbnail=html_report.encode_thumbnail(thumb)
    )
    assert html_report._card(a) == html_report._card(b)


@pytest.mark.slow
def test_paginated_report_in_headless_chromium(tmp_path):
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not installed")
    n = html_report.PAGE_SIZE + 30
    path = tmp_path / "report.html"
    html_report.write_report(path, _items(n), title="t", settings={})
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run(
        [exe, *flags, "--dump-dom", path.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    shown = re.findall(r'<figure class="card( anom)?"', dom.stdout)
    assert len(shown) == html_report.PAGE_SIZE
    assert re.search(r'id="page">1 of 2<', dom.stdout)
    decoded = re.search(r'data-thumbs-decoded="(\d+)"', dom.stdout)
    assert decoded and int(decoded.group(1)) == html_report.PAGE_SIZE
