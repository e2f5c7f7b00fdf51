"""`report.html`: one static, offline page of a predict or eval run.

The page holds the run's settings, a histogram of image scores with the
decision threshold(s) (inline SVG), and a grid of thumbnails with their
anomaly-map overlays, most anomalous first, each with its file name, score
and decision (and, for labelled runs, the label and whether the decision is
right). Images that could not be read are listed with the reason.

Everything is inline (CSS, a few lines of JavaScript for filtering, JPEG
thumbnails as data URIs, ~4 KB each), so the file works offline and alone;
links to full-size overlays beside it work when the run folder is kept
together. Thumbnails, not full images, keep a few thousand images at a few
megabytes. The grid is paginated (`PAGE_SIZE` cards a page, the filters
applied first): the thumbnails of other pages are neither decoded nor laid
out until their page is shown, so a run of 10,000 images stays responsive.
Without JavaScript every card is shown, with the first page's thumbnails.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from protorefine_jax.app.overlays import jet, legend_svg, normalise
from protorefine_jax.io.paths import write_output

THUMB_SIZE = 160
HIST_BINS = 40
GOOD_COLOUR, BAD_COLOUR, ALL_COLOUR = "#3b8f4f", "#c8413b", "#5a6f8f"
LINE_COLOURS = ("#111111", "#8a2be2", "#d2691e")


@dataclasses.dataclass
class ReportItem:
    """One image on the page.

    Attributes:
      name: file name (or path relative to the input folder).
      score: image score; None when the image could not be scored.
      anomalous: the decision (`score > threshold`); None without a score.
      thumbnail: `[h, w, 3]` uint8 overlay thumbnail (see `make_thumbnail`), or
        that thumbnail already encoded (`encode_thumbnail`: what a long run keeps).
      link: relative path of a full-size overlay, or None.
      label: 0 good / 1 defective for labelled runs, None otherwise.
      group: e.g. the defect type folder (shown under the name).
      error: why the image could not be read or scored.
    """

    name: str
    score: float | None = None
    anomalous: bool | None = None
    thumbnail: np.ndarray | EncodedThumbnail | None = None
    link: str | None = None
    label: int | None = None
    group: str | None = None
    error: str | None = None


@dataclasses.dataclass
class SupportItem:
    """One good image the model was fitted on.

    Attributes:
      name: its file name as fit recorded it.
      score: its held-out score (the model's units), None when not recorded.
      outlier: fit found it far above the others and left it out of the threshold.
      thumbnail: `[h, w, 3]` uint8 or None (no `--support_dir`, or not found there).
      note: why no thumbnail is shown, or None.
    """

    name: str
    score: float | None = None
    outlier: bool = False
    thumbnail: np.ndarray | None = None
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class Legend:
    """What the map colours mean: `lo` is drawn blue, `hi` red; `threshold` the decisions'."""

    lo: float
    hi: float
    threshold: float | None = None


def make_thumbnail(
    image: np.ndarray,
    amap: np.ndarray,
    lo: float,
    hi: float,
    size: int = THUMB_SIZE,
    *,
    normalised: np.ndarray | None = None,
    colours: np.ndarray | None = None,
) -> np.ndarray:
    """Image blended with its jet-coloured map, longest side `size`.

    Args:
      image: `[H, W, 3]` uint8.
      amap: `[H, W]` anomaly map.
      lo: map value drawn blue (one scale for the whole page).
      hi: map value drawn red.
      size: longest side of the thumbnail in pixels.
      normalised: `overlays.normalise(amap, lo, hi)` when the caller has it already.
      colours: `overlays.colour_map(amap, lo, hi)` when the caller has it already.

    Returns:
      `[h, w, 3]` uint8.
    """
    norm = normalise(amap, lo, hi) if normalised is None else normalised
    # The map's opacity grows with its value: normal regions show the image.
    alpha = (0.15 + 0.6 * norm)[..., None]
    colours = jet(norm) if colours is None else colours  # = colour_map(amap, lo, hi)
    blend = (1 - alpha) * np.asarray(image, np.float64) / 255.0 + alpha * colours
    pil = Image.fromarray((np.clip(blend, 0, 1) * 255).astype(np.uint8))
    pil.thumbnail((size, size), Image.Resampling.BILINEAR)
    return np.asarray(pil)


@dataclasses.dataclass(frozen=True)
class EncodedThumbnail:
    """A thumbnail already encoded for the page (`encode_thumbnail`): ~5 KB, not ~60 KB of pixels.

    Attributes:
      uri: the JPEG as a `data:` URI.
      width: pixels.
      height: pixels.
    """

    uri: str
    width: int
    height: int


def encode_thumbnail(thumb: np.ndarray) -> EncodedThumbnail:
    """`[h, w, 3]` uint8 -> the `EncodedThumbnail` the page shows (the same bytes as an array)."""
    h, w = np.shape(thumb)[:2]
    return EncodedThumbnail(_data_uri(thumb), int(w), int(h))


def _data_uri(thumb: np.ndarray | EncodedThumbnail) -> str:
    if isinstance(thumb, EncodedThumbnail):
        return thumb.uri
    buf = io.BytesIO()
    Image.fromarray(np.asarray(thumb, np.uint8)).save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumb_size(thumb: np.ndarray | EncodedThumbnail) -> tuple[int, int]:
    """`(height, width)`."""
    if isinstance(thumb, EncodedThumbnail):
        return thumb.height, thumb.width
    return tuple(np.shape(thumb)[:2])


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def histogram_svg(
    scores: np.ndarray,
    labels: np.ndarray | None,
    thresholds: Sequence[tuple[str, float]],
    bins: int = HIST_BINS,
    width: int = 720,
    height: int = 220,
) -> str:
    """Inline SVG histogram of `scores` (stacked good / defective when labelled).

    Args:
      scores: `[N]` image scores.
      labels: `[N]` 0/1 or None.
      thresholds: `(name, value)` drawn as vertical dashed lines.
      bins: number of bins.
      width: SVG width in pixels.
      height: SVG height in pixels.

    Returns:
      The `<svg>` element as a string.
    """
    scores = np.asarray(scores, np.float64)
    values = [v for _, v in thresholds if v is not None and math.isfinite(v)]
    lo = float(min([scores.min(), *values])) if scores.size else 0.0
    hi = float(max([scores.max(), *values])) if scores.size else 1.0
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.02 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    edges = np.linspace(lo, hi, bins + 1)
    if labels is None:
        series = [("images", ALL_COLOUR, np.histogram(scores, edges)[0])]
    else:
        labels = np.asarray(labels)
        series = [
            ("good", GOOD_COLOUR, np.histogram(scores[labels == 0], edges)[0]),
            ("defective", BAD_COLOUR, np.histogram(scores[labels == 1], edges)[0]),
        ]
    total = sum(s[2] for s in series)
    top = max(int(np.max(total)) if len(total) else 1, 1)
    left, right, upper, lower = 48, 12, 26, 34
    pw, ph = width - left - right, height - upper - lower
    x = lambda v: left + (v - lo) / (hi - lo) * pw
    y = lambda c: upper + ph - c / top * ph
    parts = [
        f'<svg id="histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="histogram of {scores.size} image scores">',
        f'<rect x="{left}" y="{upper}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>',
    ]
    base = np.zeros(bins)
    for name, colour, counts in series:
        for i, c in enumerate(counts):
            if c == 0:
                continue
            x0, x1 = x(edges[i]), x(edges[i + 1])
            y1, y0 = y(base[i]), y(base[i] + c)
            parts.append(
                f'<rect class="bar {name}" x="{x0:.1f}" y="{y0:.1f}" '
                f'width="{max(x1 - x0 - 1, 1):.1f}" '
                f'height="{y1 - y0:.1f}" fill="{colour}"><title>{name}: {int(c)} in '
                f"[{edges[i]:.4g}, {edges[i + 1]:.4g})</title></rect>"
            )
        base = base + counts
    for t in np.linspace(lo + pad, hi - pad, 5):
        parts.append(
            f'<text x="{x(t):.1f}" y="{height - lower + 16}" font-size="11" '
            f'text-anchor="middle">{t:.3g}</text>'
        )
    for count, yy in ((top, upper + 4), (0, upper + ph)):
        parts.append(
            f'<text x="{left - 6}" y="{yy}" font-size="11" text-anchor="end">{count}</text>'
        )
    parts.append(
        f'<text x="{left + pw / 2:.1f}" y="{height - 4}" font-size="11" '
        'text-anchor="middle">image score</text>'
    )
    for i, (name, value) in enumerate(thresholds):
        if value is None or not math.isfinite(value):
            continue
        colour = LINE_COLOURS[i % len(LINE_COLOURS)]
        parts.append(
            f'<line class="threshold" x1="{x(value):.1f}" x2="{x(value):.1f}" y1="{upper - 4}" '
            f'y2="{upper + ph}" stroke="{colour}" stroke-width="2" stroke-dasharray="5,3"/>'
        )
        # Near the right edge the label goes to the left of its line (else it is cut off).
        right_side = x(value) > left + 0.7 * pw
        tx, anchor = (x(value) - 4, "end") if right_side else (x(value) + 4, "start")
        parts.append(
            f'<text x="{tx:.1f}" y="{upper - 8 + 12 * i}" font-size="11" text-anchor="{anchor}" '
            f'fill="{colour}">{html.escape(name)} = {value:.4g}</text>'
        )
    legend_x = left + pw - 8
    for j, (name, colour, _) in enumerate(reversed(series)):
        yy = upper + 14 + 14 * j
        parts.append(
            f'<rect x="{legend_x - 10}" y="{yy - 9}" width="10" height="10" fill="{colour}"/>'
        )
        parts.append(
            f'<text x="{legend_x - 14}" y="{yy}" font-size="11" text-anchor="end">'
            f"{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px 24px;color:#222}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:18px 0 6px}
.summary{margin:4px 0 8px;color:#444}
table.kv{border-collapse:collapse;font-size:12px} table.kv td{border:1px solid #ddd;padding:2px 6px;
vertical-align:top} table.kv td:first-child{color:#555;white-space:nowrap}
.controls{margin:8px 0;font-size:13px} .controls label{margin-right:12px}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(172px,1fr));gap:8px}
.card{border:1px solid #ddd;border-radius:4px;padding:5px;margin:0;background:#fff;font-size:11px}
.card img{display:block;max-width:160px;max-height:160px;margin:0 auto 4px}
.card .name{word-break:break-all;font-family:ui-monospace,Menlo,monospace}
.anom{border-color:#c8413b;box-shadow:0 0 0 1px #c8413b inset}
.badge{display:inline-block;padding:0 5px;border-radius:3px;color:#fff;font-weight:600}
.b-anom{background:#c8413b} .b-good{background:#3b8f4f} .b-err{background:#777}
.wrong{color:#c8413b;font-weight:600} .right{color:#3b8f4f}
.hidden{display:none}
table.folders{border-collapse:collapse;font-size:13px;margin:4px 0}
table.folders td,table.folders th{border:1px solid #ddd;padding:2px 8px;text-align:right}
table.folders td:first-child,table.folders th:first-child{text-align:left}
.legend{font-size:13px;color:#333;max-width:760px} .legend svg{display:block;margin:4px 0}
#support{display:grid;grid-template-columns:repeat(auto-fill,minmax(132px,1fr));gap:6px}
#support .card img{max-width:120px;max-height:120px}
.outlier{border-color:#d2691e}
"""

JS = """
var PAGE_SIZE=%(page_size)d, page=0;
function showThumb(c){
  var i=c.querySelector('img[data-src]');
  if(i){ i.src=i.getAttribute('data-src'); i.removeAttribute('data-src'); }
}
function applyFilter(){
  var mode=document.querySelector('input[name=show]:checked').value;
  var text=document.getElementById('q').value.toLowerCase();
  var match=[];
  document.querySelectorAll('#grid .card').forEach(function(c){
    var ok=(mode==='all'||c.dataset.decision===mode||(mode==='wrong'&&c.dataset.wrong==='1'))
      &&(!text||c.dataset.name.toLowerCase().indexOf(text)>=0);
    c.classList.add('hidden'); if(ok) match.push(c);
  });
  var pages=Math.max(1,Math.ceil(match.length/PAGE_SIZE));
  page=Math.min(Math.max(page,0),pages-1);
  match.slice(page*PAGE_SIZE,(page+1)*PAGE_SIZE).forEach(function(c){
    c.classList.remove('hidden'); showThumb(c);});
  document.getElementById('shown').textContent=match.length;
  document.getElementById('page').textContent=(page+1)+' of '+pages;
  document.getElementById('prev').disabled=page===0;
  document.getElementById('next').disabled=page>=pages-1;
}
function turn(step){ page+=step; applyFilter(); window.scrollTo(0,
  document.getElementById('grid').offsetTop-80); }
window.addEventListener('DOMContentLoaded',function(){
  document.getElementById('pager').classList.remove('hidden');
  document.getElementById('prev').addEventListener('click',function(){turn(-1);});
  document.getElementById('next').addEventListener('click',function(){turn(1);});
  document.querySelectorAll('.controls input').forEach(function(e){
    function reset(){ page=0; applyFilter(); }
    e.addEventListener('input',reset); e.addEventListener('change',reset);});
  applyFilter();
});
window.addEventListener('load',function(){
  var imgs=document.querySelectorAll('#grid img');
  var ok=0; imgs.forEach(function(i){ if(i.complete&&i.naturalWidth>0) ok++; });
  document.body.setAttribute('data-thumbs-decoded',ok);
  var sup=0; document.querySelectorAll('#support img').forEach(function(i){
    if(i.complete&&i.naturalWidth>0) sup++; });
  document.body.setAttribute('data-support-decoded',sup);
  document.body.setAttribute('data-load-ms',Math.round(performance.now()));
});
"""
# Thumbnails per page of the report's grid: the page stays responsive with 10,000 images.
# Cards past the first page carry their thumbnail in `data-src` (not decoded, not laid
# out) until their page is shown; without JavaScript every card is listed, the
# thumbnails of the first page only.
PAGE_SIZE = 200


def _kv_table(d: dict[str, Any]) -> str:
    rows = []
    for k, v in d.items():
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        rows.append(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(text)}</td></tr>")
    return '<table class="kv">' + "".join(rows) + "</table>"


def _card(item: ReportItem, first_page: bool = True) -> str:
    if item.anomalous is None and item.score is not None:
        decision, badge = "scored", ""  # no threshold to decide with
    elif item.anomalous is None:
        decision, badge = "error", '<span class="badge b-err">not scored</span>'
    elif item.anomalous:
        decision, badge = "anomalous", '<span class="badge b-anom">anomalous</span>'
    else:
        decision, badge = "good", '<span class="badge b-good">good</span>'
    wrong = (
        item.label is not None and item.anomalous is not None and item.anomalous != bool(item.label)
    )
    img = ""
    if item.thumbnail is not None:
        h, w = _thumb_size(item.thumbnail)
        src = "src" if first_page else "data-src"  # later pages: set by the page's script
        img = (
            f'<img {src}="{_data_uri(item.thumbnail)}" width="{w}" height="{h}" '
            f'alt="{html.escape(item.name)}" loading="lazy" decoding="async">'
        )
        if item.link:
            img = f'<a href="{html.escape(item.link)}">{img}</a>'
    lines = [f'<div class="name">{html.escape(item.name)}</div>']
    if item.group:
        lines.append(f"<div>{html.escape(item.group)}</div>")
    lines.append(f"<div>score <b>{_fmt(item.score)}</b> {badge}</div>")
    if item.label is not None:
        verdict = "" if item.anomalous is None else ("wrong" if wrong else "right")
        truth = "defective" if item.label else "good"
        lines.append(f'<div>label {truth} <span class="{verdict}">{verdict}</span></div>')
    if item.error:
        lines.append(f"<div>{html.escape(item.error)}</div>")
    cls = "card anom" if item.anomalous else "card"
    cls += "" if first_page else " hidden"
    return (
        f'<figure class="{cls}" data-decision="{decision}" data-wrong="{int(wrong)}" '
        f'data-name="{html.escape(item.name)}">{img}<figcaption>{"".join(lines)}</figcaption>'
        "</figure>"
    )


def _legend_html(legend: Legend) -> str:
    thr = "" if legend.threshold is None else f" The decision threshold is {legend.threshold:.4g}."
    return (
        '<div class="legend" id="legend">'
        + legend_svg(legend.lo, legend.hi, legend.threshold)
        + "<p>Colours show the anomaly-map value of each region, in the model's own score "
        f"units: <b>blue</b> ({legend.lo:.4g} and below) is what the good images the model was "
        f"fitted on typically show; green and yellow are in between; <b>red</b> ({legend.hi:.4g} "
        f"and above) reaches the decision threshold.{html.escape(thr)} An image's score is its "
        "highest region score; the image is flagged anomalous when its score is above the "
        "threshold. In the thumbnails the colour is stronger where the value is higher; the "
        "overlay files carry this colour bar with the image's score marked.</p></div>"
    )


def _per_folder_html(rows: Sequence[dict[str, Any]]) -> str:
    head = "<tr><th>folder</th><th>label</th><th>images</th><th>scored</th><th>flagged</th>"
    head += "<th>flagged rate</th></tr>"
    body = []
    for r in rows:
        rate = "-" if r.get("flagged_rate") is None else f"{100 * r['flagged_rate']:.1f} %"
        body.append(
            f"<tr><td>{html.escape(str(r['folder']))}/</td><td>{html.escape(str(r['label']))}</td>"
            f"<td>{int(r['images'])}</td><td>{int(r['scored'])}</td><td>{int(r['flagged'])}</td>"
            f"<td>{rate}</td></tr>"
        )
    return '<table class="folders" id="per-folder">' + head + "".join(body) + "</table>"


def _support_html(support: Sequence[SupportItem], given: bool) -> str:
    cards = []
    for it in support:
        img = ""
        if it.thumbnail is not None:
            h, w = it.thumbnail.shape[:2]
            img = (
                f'<img src="{_data_uri(it.thumbnail)}" width="{w}" height="{h}" '
                f'alt="{html.escape(it.name)}">'
            )
        lines = [f'<div class="name">{html.escape(it.name)}</div>']
        lines.append(f"<div>held-out score <b>{_fmt(it.score)}</b></div>")
        if it.outlier:
            lines.append("<div>far above the others: left out of the threshold</div>")
        if it.note:
            lines.append(f"<div>{html.escape(it.note)}</div>")
        cls = "card outlier" if it.outlier else "card"
        cards.append(
            f'<figure class="{cls}">{img}<figcaption>{"".join(lines)}</figcaption></figure>'
        )
    intro = (
        "Each was scored with its own regions held out of the model (the model's units, as "
        "the scores above); the threshold is derived from these scores."
    )
    if not given:
        intro += " Pass --support_dir=&lt;the folder fitted on&gt; to see them as thumbnails."
    return f'<p class="legend">{intro}</p><div id="support">' + "".join(cards) + "</div>"


def render_report(
    items: Sequence[ReportItem],
    *,
    title: str,
    settings: dict[str, Any],
    thresholds: Sequence[tuple[str, float]] = (),
    threshold_note: str = "",
    metrics: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
    legend: Legend | None = None,
    per_folder: Sequence[dict[str, Any]] | None = None,
    support: Sequence[SupportItem] | None = None,
    support_dir_given: bool = False,
) -> str:
    """The page as a string (see the module docstring).

    Args:
      items: every image of the run, scored or not (any order; sorted here).
      title: page title.
      settings: the run's settings (shown as a table).
      thresholds: `(name, value)`; the first is the one the decisions used.
      threshold_note: one line on where the threshold comes from.
      metrics: labelled runs: metric name -> value.
      notes: extra lines shown under the summary.
      legend: what the map colours mean (a colour bar and the words), or None.
      per_folder: labelled predict runs: rows of `predict_labels.summarise`.
      support: the good images the model was fitted on, or None.
      support_dir_given: whether their folder was given (else the page says how).

    Returns:
      The HTML document.
    """
    scored = [it for it in items if it.score is not None]
    failed = [it for it in items if it.score is None]
    scored.sort(key=lambda it: -float(it.score))
    scores = np.array([it.score for it in scored], np.float64)
    labelled = bool(scored) and all(it.label is not None for it in scored)
    labels = np.array([it.label for it in scored]) if labelled else None
    flagged = sum(bool(it.anomalous) for it in scored)
    summary = f"{len(scored)} images scored, {flagged} anomalous, {len(scored) - flagged} good" + (
        f", {len(failed)} not readable" if failed else ""
    )
    if labelled:
        good_flagged = sum(bool(it.anomalous) and it.label == 0 for it in scored)
        defect_passed = sum(it.anomalous is False and it.label == 1 for it in scored)
        summary += (
            f"; wrong decisions: {good_flagged + defect_passed} ({good_flagged} good flagged, "
            f"{defect_passed} defective passed)"
        )
    wrong_radio = (
        '<label><input type="radio" name="show" value="wrong"> wrong decisions</label>'
        if labelled
        else ""
    )
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<div class="summary" id="summary">{html.escape(summary)}</div>',
    ]
    if threshold_note:
        body.append(f'<div class="summary">{html.escape(threshold_note)}</div>')
    body += [f'<div class="summary">{html.escape(n)}</div>' for n in notes]
    if metrics:
        body += ["<h2>Metrics</h2>", _kv_table(metrics)]
    if per_folder:
        body += ["<h2>Per folder (labels from the folder names)</h2>", _per_folder_html(per_folder)]
    body += [
        "<h2>Scores</h2>",
        histogram_svg(scores, labels, thresholds) if scores.size else "<p>no scores</p>",
    ]
    if legend is not None:
        body += ["<h2>How to read the colours</h2>", _legend_html(legend)]
    body += [
        "<details><summary>Settings</summary>",
        _kv_table(settings),
        "</details>",
        "<h2>Images, most anomalous first</h2>",
        '<div class="controls">show: '
        '<label><input type="radio" name="show" value="all" checked> all</label>'
        '<label><input type="radio" name="show" value="anomalous"> anomalous</label>'
        '<label><input type="radio" name="show" value="good"> good</label>'
        f"{wrong_radio}"
        '<label>name contains <input id="q" type="search" size="16"></label>'
        f'<span id="shown">{len(scored)}</span> shown '
        f'<span id="pager" class="hidden">({PAGE_SIZE} per page: <button id="prev" '
        'type="button">previous</button> page <span id="page">1</span> <button id="next" '
        'type="button">next</button>)</span></div>',
        '<div id="grid">',
        *(_card(it, i < PAGE_SIZE) for i, it in enumerate(scored)),
        "</div>",
    ]
    if failed:
        body += [
            f"<h2>Not readable ({len(failed)})</h2>",
            '<table class="kv" id="unreadable">',
            *(
                f"<tr><td>{html.escape(it.name)}</td><td>{html.escape(it.error or '')}</td></tr>"
                for it in failed
            ),
            "</table>",
        ]
    if support is not None:
        body += [
            f"<h2>The good images the model was fitted on ({len(support)})</h2>",
            _support_html(support, support_dir_given),
        ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{CSS}</style><script>{JS % {'page_size': PAGE_SIZE}}</script>"
        "<noscript><style>#grid .card.hidden{display:block}</style></noscript>"
        "</head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(
    path: str | Path, items: Sequence[ReportItem], *, root: str | Path | None = None, **kwargs: Any
) -> Path:
    """Writes `render_report(items, **kwargs)` to `path`; returns the path.

    `root`: the output folder `path` lies in (default: its parent); the file
    is written by `paths.write_output` (atomic, never through a symlink below
    `root`).
    """
    path = Path(path)
    root = path.parent if root is None else Path(root)
    return write_output(root, path.relative_to(root).as_posix(), render_report(items, **kwargs))


def write_eval_report(
    path: str | Path,
    *,
    title: str,
    names: Sequence[str],
    labels: np.ndarray,
    scores: np.ndarray,
    maps: np.ndarray,
    load_images,
    metrics: dict[str, Any],
    settings: dict[str, Any],
    chunk: int = 64,
    root: str | Path | None = None,
) -> Path:
    """The page of one evaluation run (one category, method, shot count and seed).

    Decisions use the F1-optimal threshold on these same test images (an
    oracle threshold, as in the F1-max metric; said on the page).

    Args:
      path: output file.
      title: page title.
      names: `[T]` test file names.
      labels: `[T]` 0/1.
      scores: `[T]` image scores.
      maps: `[T, H, W]` anomaly maps.
      load_images: `indices -> [n, H, W, 3]` uint8 test images (read in chunks).
      metrics: the run's metrics.
      settings: what the page should show about the run.
      chunk: images decoded at a time.
      root: the output folder (see `write_report`).

    Returns:
      `path`.
    """
    from protorefine_jax.threshold import f1_threshold

    labels = np.asarray(labels)
    scores = np.asarray(scores, np.float64)
    thr = f1_threshold(labels, scores).value if 0 < labels.sum() < labels.size else None
    lo, hi = float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9))
    items = []
    for start in range(0, len(names), chunk):
        idx = np.arange(start, min(start + chunk, len(names)))
        images = load_images(idx)
        for j, i in enumerate(idx):
            items.append(
                ReportItem(
                    name=names[i],
                    score=float(scores[i]),
                    anomalous=None if thr is None else bool(scores[i] > thr),
                    thumbnail=make_thumbnail(images[j], maps[i], lo, hi),
                    label=int(labels[i]),
                )
            )
    return write_report(
        path,
        items,
        root=root,
        title=title,
        settings=settings,
        thresholds=[] if thr is None else [("F1-optimal (oracle)", thr)],
        threshold_note="decisions at the F1-optimal threshold on these test images (oracle, as "
        "the F1-max metric); deployment thresholds: experiments.fit",
        metrics=metrics,
    )
