"""predict's labels from the folder layout, what they say (rates, AUROC, wrong decisions),
and the key on the overlays: no model needed."""

import itertools

import numpy as np
import pytest

from protorefine_jax.app import html_report, overlays, predict_labels, report
from protorefine_jax.app.predict_labels import LabelLayoutError, from_layout, summarise


def _tree(root, names):
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"")
    return root


def test_labels_from_good_beside_defect_folders(tmp_path):
    names = ["good/a.png", "good/b.png", "pitting/c.png", "scratch/sub/d.png"]
    _tree(tmp_path, names)
    for mode in ("auto", "on"):
        labels = from_layout(tmp_path, names, mode)
        assert labels.base == "" and labels.labels == (0, 0, 1, 1)
        assert labels.folders == ("good", "good", "pitting", "scratch")
    assert from_layout(tmp_path, names, "off") is None


def test_labels_from_the_mvtec_category_layout(tmp_path):
    names = ["test/good/000.png", "test/broken_large/000.png", "test/contamination/001.png"]
    _tree(tmp_path, names)
    labels = from_layout(tmp_path, names, "auto")
    assert labels.base == "test" and labels.labels == (0, 1, 1)
    assert labels.folders == ("good", "broken_large", "contamination")


def test_no_layout_auto_is_unlabelled_and_on_is_an_error(tmp_path):
    names = ["a.png", "b/c.png"]
    _tree(tmp_path, names)
    assert from_layout(tmp_path, names, "auto") is None
    with pytest.raises(LabelLayoutError, match="needs a good/ folder"):
        from_layout(tmp_path, names, "on")
    with pytest.raises(ValueError, match="--labels must be one of"):
        from_layout(tmp_path, names, "yes")


def test_images_outside_the_label_folders(tmp_path):
    names = ["good/a.png", "pitting/b.png", "loose.png"]
    _tree(tmp_path, names)
    notes = []
    assert from_layout(tmp_path, names, "auto", notes.append) is None
    assert "outside good/" in notes[0] and "loose.png" in notes[0]
    with pytest.raises(LabelLayoutError, match=r"1 image\(s\) lie outside.*loose.png"):
        from_layout(tmp_path, names, "on")


def _rows():
    # (file, score, label folder); threshold 0.5.
    data = [
        ("good/1.png", 0.10, "good"),
        ("good/2.png", 0.70, "good"),  # flagged: wrong
        ("good/3.png", 0.30, "good"),
        ("good/4.png", 0.55, "good"),  # flagged: wrong
        ("good/5.png", None, "good"),  # unreadable: not in the rates
        ("pitting/1.png", 0.90, "pitting"),
        ("pitting/2.png", 0.30, "pitting"),  # passed: wrong (a tie with good/3)
        ("pitting/3.png", 0.80, "pitting"),
        ("scratch/1.png", 0.40, "scratch"),  # passed: wrong
    ]
    rows = []
    for file, score, folder in data:
        decision = "unreadable" if score is None else ("anomalous" if score > 0.5 else "good")
        label = "good" if folder == "good" else "defective"
        rows.append(
            {"file": file, "score": score, "decision": decision, "folder": folder, "label": label}
        )
    return rows


def _auroc_by_pairs(good, bad):
    """P(defective scores above good), ties counting half: the AUROC by definition."""
    wins = sum((b > g) + 0.5 * (b == g) for g, b in itertools.product(good, bad))
    return 100.0 * wins / (len(good) * len(bad))


def test_per_folder_rates_auroc_and_wrong_decisions_by_hand():
    out = summarise(_rows(), 0.5)
    per = {f["folder"]: f for f in out["per_folder"]}
    assert [f["folder"] for f in out["per_folder"]] == ["good", "pitting", "scratch"]
    assert per["good"] == {
        "folder": "good",
        "label": "good",
        "images": 5,
        "scored": 4,
        "flagged": 2,
        "flagged_rate": 0.5,
    }
    assert per["pitting"]["flagged"] == 2 and per["pitting"]["flagged_rate"] == pytest.approx(2 / 3)
    assert per["scratch"]["flagged_rate"] == 0.0
    assert out["good"]["flagged_rate"] == 0.5  # false alarms
    assert out["defective"] == {"images": 4, "scored": 4, "flagged": 2, "flagged_rate": 0.5}
    # 4 good x 4 defective pairs: defective above good in 11, one tie (0.30 / 0.30).
    want = _auroc_by_pairs([0.10, 0.70, 0.30, 0.55], [0.90, 0.30, 0.80, 0.40])
    assert want == pytest.approx(100 * 11.5 / 16)
    assert out["image_auroc"] == pytest.approx(want, abs=1e-9) and out["auroc_note"] is None
    wrong = out["wrong_decisions"]
    assert wrong["count"] == 4
    assert [w["file"] for w in wrong["good_flagged"]] == ["good/2.png", "good/4.png"]
    assert [w["file"] for w in wrong["defective_passed"]] == ["pitting/2.png", "scratch/1.png"]
    rows = predict_labels.summary_rows(out)
    assert rows[-2]["folder"] == "all good" and rows[-1]["flagged"] == 2
    text = predict_labels.describe(out)
    assert "good/ (good): 2 of 4 flagged (50 %)" in text and "AUROC 71.9 %" in text


def test_one_class_has_no_auroc_but_rates():
    rows = [r for r in _rows() if r["label"] == "good"]
    out = summarise(rows, 0.5)
    assert out["image_auroc"] is None and "only good images" in out["auroc_note"]
    assert out["good"]["flagged_rate"] == 0.5 and out["defective"]["images"] == 0


def test_one_colouring_function():
    # The overlays, the thumbnails and the legend share overlays.jet (no private copy).
    assert not hasattr(report, "_jet") and not hasattr(html_report, "_jet")
    np.testing.assert_allclose(
        overlays.jet(np.array([0.0, 0.5, 1.0])), [[0, 0, 0.5], [0.5, 1, 0.5], [0.5, 0, 0]]
    )
    image = np.full((8, 8, 3), 100, np.uint8)
    amap = np.linspace(0, 2, 64).reshape(8, 8)
    blend = report.overlay(image, amap, np.zeros((8, 8), bool), 0.0, 1.0)[:, 8:]
    want = ((0.5 * image / 255 + 0.5 * overlays.colour_map(amap, 0.0, 1.0)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(blend, want)


def test_overlay_key_has_a_colour_bar_with_the_threshold_marked():
    picture = np.full((64, 128, 3), 90, np.uint8)
    lo, hi = 2.0, 6.0
    out = overlays.with_key(picture, lo, hi, threshold=hi, score=7.5, decision="anomalous")
    assert out.shape == (64 + overlays.KEY_HEIGHT, overlays.KEY_MIN_WIDTH, 3)
    np.testing.assert_array_equal(out[:64, :128], picture)
    strip = out[64:].astype(int)
    row = strip[25]  # through the middle of the bar (rows 20..29)
    x0, x1 = overlays.BAR_LEFT, overlays.KEY_MIN_WIDTH - overlays.BAR_LEFT
    top = hi + overlays.KEY_OVERHANG * (hi - lo)

    def x_of(v):
        return round(x0 + (v - lo) / (top - lo) * (x1 - x0))

    # Blue at lo, red past the threshold, green halfway; black at the threshold.
    assert row[x0 + 1][2] > 100 and row[x0 + 1][0] == 0
    assert row[x1 - 2][0] > 100 and row[x1 - 2][2] == 0
    mid = row[x_of((lo + hi) / 2)]
    assert mid[1] > 200 and mid[0] < 160 and mid[2] < 160
    assert (row[x_of(hi) : x_of(hi) + 2] == 0).all()
    # The score, the threshold and the decision are written above the bar (dark text pixels).
    assert (strip[2:16, x0 : x0 + 200] < 100).any()
    # The same inputs give the same pixels.
    np.testing.assert_array_equal(
        out, overlays.with_key(picture, lo, hi, threshold=hi, score=7.5, decision="anomalous")
    )
