"""report.html: content, order, escaping, histogram counts; a real headless browser (slow)."""

import html
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from protorefine_jax.app.html_report import (
    Legend,
    ReportItem,
    SupportItem,
    histogram_svg,
    make_thumbnail,
    write_report,
)
from protorefine_jax.data.synthetic import render


def _items(n=12, labelled=False, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        split = "test_defect" if i % 3 == 0 else "test_good"
        sample = render("fabric", split, i, image_size=96)
        amap = np.zeros((96, 96))
        amap[sample.mask] = 1.0
        amap += 0.2 * rng.random((96, 96))
        score = float(amap.max() + rng.normal(0, 0.05))
        items.append(
            ReportItem(
                name=f"img_{i:02d}.png",
                score=score,
                anomalous=score > 0.6,
                thumbnail=make_thumbnail(sample.image, amap, 0.0, 1.0),
                link=f"overlays/img_{i:02d}.png",
                label=int(split == "test_defect") if labelled else None,
                group=sample.defect_type,
            )
        )
    return items


def _write(tmp_path, items, **kw):
    kw.setdefault("title", "predict: demo")
    kw.setdefault("settings", {"model": "m", "threshold": 0.6})
    kw.setdefault("thresholds", [("threshold", 0.6)])
    return write_report(tmp_path / "report.html", items, **kw)


def test_page_holds_every_scored_image_sorted_by_score(tmp_path):
    items = _items()
    items.append(ReportItem(name="broken.png", error="Cannot decode image broken.png: truncated"))
    page = _write(tmp_path, items).read_text()
    names = re.findall(
        r'<figure class="[^"]*" data-decision="[^"]*" data-wrong="\d" '
        r'data-name="([^"]+)"',
        page,
    )
    scored = sorted((it for it in items if it.score is not None), key=lambda it: -it.score)
    assert names == [it.name for it in scored]
    assert page.count('src="data:image/jpeg;base64,') == 12
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page  # offline: nothing fetched
    assert 'id="unreadable"' in page and "broken.png" in page and "truncated" in page
    assert "12 images scored" in page and "1 not readable" in page
    flagged = sum(it.anomalous for it in scored)
    assert page.count('data-decision="anomalous"') == flagged


def test_names_and_settings_are_escaped(tmp_path):
    item = ReportItem(name='<script>alert("x")</script>.png', score=1.0, anomalous=True)
    page = _write(tmp_path, [item], settings={"<b>": "<i>"}).read_text()
    assert "<script>alert" not in page
    assert html.escape('<script>alert("x")</script>.png') in page
    assert "&lt;b&gt;" in page and "&lt;i&gt;" in page


def test_histogram_counts_add_up_and_thresholds_are_drawn():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=200)
    labels = (rng.random(200) < 0.3).astype(int)
    svg = histogram_svg(scores, labels, [("normal-only", 0.5), ("F1", 1.0)], bins=20)
    counts = {"good": 0, "defective": 0}
    for kind, c in re.findall(r'<rect class="bar (\w+)".*?<title>\w+: (\d+) in', svg):
        counts[kind] += int(c)
    assert counts == {"good": int(np.sum(labels == 0)), "defective": int(np.sum(labels == 1))}
    assert svg.count('class="threshold"') == 2
    assert "normal-only = 0.5" in svg and "F1 = 1" in svg
    # A single value (zero spread) still draws.
    assert 'class="bar images"' in histogram_svg(np.ones(3), None, [])


def test_labelled_page_shows_labels_metrics_and_wrong_decisions(tmp_path):
    items = _items(labelled=True)
    page = _write(
        tmp_path,
        items,
        metrics={"image_auroc": 91.0, "pixel_auroc": None},
        thresholds=[("normal-only", 0.6), ("F1", 0.7)],
    ).read_text()
    assert "image_auroc" in page and "91.0" in page
    wrong = sum(it.anomalous != bool(it.label) for it in items)
    assert page.count('data-wrong="1"') == wrong
    assert 'value="wrong"' in page
    assert 'class="bar defective"' in page


def _support(n=3):
    items = []
    for i in range(n):
        image = render("fabric", "train", i, image_size=96).image
        items.append(SupportItem(name=f"sup_{i}.png", score=1.0 + 0.1 * i, thumbnail=image))
    items.append(SupportItem(name="<gone>.png", score=2.5, outlier=True, note="not found"))
    return items


def _per_folder():
    return [
        {
            "folder": "good",
            "label": "good",
            "images": 8,
            "scored": 8,
            "flagged": 1,
            "flagged_rate": 0.125,
        },
        {
            "folder": "<pit>",
            "label": "defective",
            "images": 4,
            "scored": 4,
            "flagged": 3,
            "flagged_rate": 0.75,
        },
    ]


def _keyed(tmp_path, items):
    return _write(
        tmp_path,
        items,
        legend=Legend(lo=0.2, hi=0.6, threshold=0.6),
        per_folder=_per_folder(),
        support=_support(),
        support_dir_given=True,
    )


def test_labelled_predict_page_has_folders_legend_and_support(tmp_path):
    items = _items(labelled=True)
    page = _keyed(tmp_path, items).read_text()
    # Per-folder rates, names escaped.
    assert 'id="per-folder"' in page and "&lt;pit&gt;/" in page and "75.0 %" in page
    assert "<pit>" not in page
    # Wrong decisions: counted in the summary, and a filter.
    good_flagged = sum(it.anomalous and not it.label for it in items)
    passed = sum(not it.anomalous and it.label for it in items)
    assert f"wrong decisions: {good_flagged + passed} ({good_flagged} good flagged, " in page
    assert 'value="wrong"' in page and 'class="bar good"' in page
    # The legend: a colour bar with the threshold, and what blue and red mean.
    assert 'id="legend-bar"' in page and 'class="legend-threshold"' in page
    assert "<b>blue</b> (0.2 and below)" in page and "<b>red</b> (0.6" in page
    # The support images: thumbnails with held-out scores; the outlier said; names escaped.
    support = page.split('id="support"', 1)[1]
    assert support.count("data:image/jpeg;base64,") == 3
    assert "held-out score <b>1.1</b>" in support and "&lt;gone&gt;.png" in support
    assert "left out of the threshold" in support and "not found" in support
    # An unlabelled page without these arguments is as before.
    plain = _write(tmp_path, _items()).read_text()
    assert 'id="legend-bar"' not in plain and 'id="support"' not in plain
    assert "wrong decisions:" not in plain and 'value="wrong"' not in plain


def test_threshold_label_at_the_right_edge_is_not_cut_off():
    svg = histogram_svg(np.array([0.0, 0.1, 0.2]), None, [("threshold", 0.2)])
    assert 'text-anchor="end" fill="#111111">threshold = 0.2<' in svg


def test_thumbnail_is_small_and_coloured():
    image = np.full((300, 200, 3), 128, np.uint8)
    amap = np.zeros((300, 200))
    amap[:50] = 1.0
    thumb = make_thumbnail(image, amap, 0.0, 1.0, size=120)
    assert thumb.shape == (120, 80, 3) and thumb.dtype == np.uint8
    assert thumb[0, 40, 0] > thumb[0, 40, 2]  # red where the map is high
    assert thumb[-1, 40, 2] > thumb[-1, 40, 0]  # blue where it is low


def _chromium():
    """The Debian `chromium` binary, installed with apt-get when missing (else skip)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and apt-get (as root) is not available")
    cmd = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=900)
    exe = shutil.which("chromium")
    if proc.returncode or not exe:
        pytest.skip(f"could not install chromium with apt-get: {proc.stderr[-500:]}")
    return exe


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path, request):
    exe = _chromium()
    items = _items(n=30, labelled=True)
    items.append(ReportItem(name="unreadable.png", error="Cannot decode image: truncated"))
    path = _write(
        tmp_path,
        items,
        metrics={"image_auroc": 90.0},
        thresholds=[("normal-only", 0.6), ("F1", 0.7)],
        threshold_note="normal-only threshold from 2 leave-one-out scores",
        legend=Legend(lo=0.2, hi=0.6, threshold=0.6),
        per_folder=_per_folder(),
        support=_support(),
        support_dir_given=True,
    )
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--allow-file-access-from-files",
        "--virtual-time-budget=5000",
    ]
    url = path.resolve().as_uri()
    dom = subprocess.run(
        [exe, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The load handler counted decoded thumbnails (naturalWidth > 0).
    decoded = re.search(r'data-thumbs-decoded="(\d+)"', dom.stdout)
    assert decoded and int(decoded.group(1)) == 30, dom.stdout[:500]
    assert dom.stdout.count('class="bar ') > 5 and 'id="histogram"' in dom.stdout
    support = re.search(r'data-support-decoded="(\d+)"', dom.stdout)
    assert support and int(support.group(1)) == 3
    assert 'id="legend-bar"' in dom.stdout and 'id="per-folder"' in dom.stdout
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [exe, *flags, "--window-size=1280,2400", f"--screenshot={shot}", url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2400, 1280)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    # Histogram bars: the good / defective fills (#3b8f4f, #c8413b) cover many pixels.
    green = (abs(r - 0x3B) < 12) & (abs(g - 0x8F) < 12) & (abs(b - 0x4F) < 12)
    red = (abs(r - 0xC8) < 12) & (abs(g - 0x41) < 12) & (abs(b - 0x3B) < 12)
    assert green.sum() > 300 and red.sum() > 100, (green.sum(), red.sum())
    # The legend's colour bar: the jet's dark red past the threshold (rgb(128, 0, 0)).
    dark_red = (abs(r - 128) < 10) & (g < 10) & (b < 10)
    assert dark_red.sum() > 50, dark_red.sum()
    # Thumbnails: many distinct colours (textures blended with the jet map).
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 2000
    keep = os.environ.get("PROTOREFINE_TEST_OUTPUT")
    if keep:  # a copy outside pytest's temporary folders, for people to look at
        os.makedirs(keep, exist_ok=True)
        shutil.copy(shot, os.path.join(keep, "report_screenshot.png"))
        shutil.copy(path, os.path.join(keep, "report.html"))
    print(f"screenshot: {shot}")
