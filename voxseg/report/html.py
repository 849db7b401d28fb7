"""The report's pages as HTML text: no network, no external script or style; pictures are files beside them.

Every string that comes from data (case names, class names, paths) is escaped here, and links to files are
URL-quoted, so a case called `<b>&1` shows as written and cannot break the page.
"""
from __future__ import annotations

import html
import json
import math
from typing import Any, Sequence
from urllib.parse import quote

from voxseg.report.overlay import FALSE_NEGATIVE, FALSE_POSITIVE, PLANES, label_colour

__all__ = ["case_page", "main_page"]

LAYER_TITLES = {"reference": "reference (outline)", "prediction": "prediction (filled)",
                "errors": "errors (false positive magenta, false negative cyan)",
                "uncertainty": "uncertainty (entropy, yellow to red)"}
POINT_TITLES = {"structure": "through the largest structure", "error": "through the largest error",
                "uncertain": "through the most uncertain region"}

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f2f2f2;position:sticky;top:0}
th.sort{cursor:pointer} th.sort:hover{background:#e0e8f0}
td.name,th.name{text-align:left}
tr.summary td{font-weight:bold;background:#fafafa}
td.bad{background:#fde0dc}
.legend .entry{white-space:nowrap}
.swatch{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle;border:1px solid #555}
.stack{position:relative;display:inline-block;margin:4px 10px 4px 0;vertical-align:top}
.stack img{display:block;image-rendering:pixelated}
.stack img.layer{position:absolute;left:0;top:0}
.planes figcaption{font-size:12px;color:#555}
figure{display:inline-block;margin:0 8px 8px 0}
img.missing{outline:3px solid red}
.note{color:#555;font-size:13px}
pre{background:#f6f6f6;padding:8px;font-size:12px;max-height:400px;overflow:auto}
"""

_SCRIPT = """
function sortBy(th){const table=th.closest('table');const body=table.tBodies[0];
const col=[...th.parentNode.children].indexOf(th);const up=th.dataset.order!=='asc';th.dataset.order=up?'asc':'desc';
const key=r=>{const v=parseFloat(r.children[col].dataset.value);return isNaN(v)?(up?Infinity:-Infinity):v;};
const text=r=>r.children[col].textContent;const numeric=th.dataset.type!=='text';
[...body.rows].sort((a,b)=>numeric?(up?key(a)-key(b):key(b)-key(a)):(up?1:-1)*text(a).localeCompare(text(b)))
.forEach(r=>body.appendChild(r));}
function imagesChecked(){let loaded=0,broken=0;document.querySelectorAll('img').forEach(i=>{
if(i.complete&&i.naturalWidth>0){loaded++;}else if(i.complete){broken++;i.classList.add('missing');
i.title='picture missing: '+i.getAttribute('src');}});
document.body.dataset.imagesLoaded=loaded;document.body.dataset.imagesBroken=broken;}
window.addEventListener('load',imagesChecked);
function showLayer(box){box.closest('section').querySelectorAll('img.layer-'+box.value).forEach(i=>{
i.style.display=box.checked?'':'none';});}
function setOpacity(v){document.querySelectorAll('img.filled').forEach(i=>{i.style.opacity=v/100;});}
function setZoom(v){document.querySelectorAll('.stack img').forEach(i=>{i.style.width=(i.naturalWidth*v)+'px';});}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(path: str) -> str:
    return esc(quote(path))


def _number(value: Any, digits: int) -> tuple[str, str]:
    """(shown text, data-value) of a metric; NaN / None show as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&mdash;", "nan"
    return f"{float(value):.{digits}f}", repr(float(value))


def cell(value: Any, digits: int, bad: bool = False) -> str:
    shown, data = _number(value, digits)
    return f'<td data-value="{data}"{" class=bad" if bad else ""}>{shown}</td>'


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{esc(title)}</title>"
            f"<meta name=viewport content='width=device-width'><style>{_STYLE}</style>"
            f"<script>{_SCRIPT}</script></head>\n<body>\n{body}\n</body></html>\n")


def legend(labels: dict[str, int], with_errors: bool) -> str:
    """Colour swatches of the label values, and of false positives / negatives."""
    def swatch(colour: Sequence[int], text: str) -> str:
        return f'<span class=entry><span class=swatch style="background:rgb{tuple(colour)}"></span>{esc(text)}</span>'

    parts = [swatch(label_colour(value), f"{name} ({value})") for name, value in labels.items() if value > 0]
    if with_errors:
        parts += [swatch(FALSE_POSITIVE, "false positive"), swatch(FALSE_NEGATIVE, "false negative")]
    return f"<p class=legend>{''.join(parts)}</p>"


def summary_table(summary: dict[str, Any]) -> str:
    """Per-class means, the foreground mean as the last row."""
    rows = []
    for name, mean in summary["mean"].items():
        rows.append(f"<tr><td class=name>{esc(name)}</td>{cell(mean['dice'], 4)}{cell(mean['iou'], 4)}"
                    f"{cell(mean['hd95'], 2)}{cell(mean['nsd'], 4)}<td>{mean['n']}</td>"
                    f"<td>{mean['n_hd95_nan']}</td></tr>")
    fg = summary["foreground_mean"]
    rows.append(f"<tr class=summary><td class=name>foreground mean</td>{cell(fg['dice'], 4)}{cell(fg['iou'], 4)}"
                f"{cell(fg['hd95'], 2)}{cell(fg['nsd'], 4)}<td>{summary['counts']['cases']}</td><td></td></tr>")
    header = ("<tr><th class=name>class</th><th>Dice</th><th>IoU</th><th>HD95 mm</th><th>NSD</th><th>cases</th>"
              "<th>no HD95</th></tr>")
    return f"<table class=means><thead>{header}</thead><tbody>{''.join(rows)}</tbody></table>"


def _case_columns(classes: Sequence[str], with_reference: bool) -> list[tuple[str, str, int]]:
    """(class, metric, digits) shown per case: Dice and HD95 for a few classes, Dice alone for many."""
    if not with_reference:
        return [(name, "pred_volume_ml", 2) for name in classes]
    metrics = [("dice", 3), ("hd95", 1)] if len(classes) <= 6 else [("dice", 3)]
    return [(name, metric, digits) for name in classes for metric, digits in metrics]


def cases_table(cases: list[dict[str, Any]], classes: Sequence[str], with_reference: bool) -> str:
    """One row per case (already in the order wanted), sortable by every column; thumbnails load lazily when there
    are many rows."""
    columns = _case_columns(classes, with_reference)
    lazy = " loading=lazy" if len(cases) > 40 else ""
    first = "mean Dice" if with_reference else "uncertainty"
    head = ["<th></th>", '<th class="sort name" data-type=text onclick="sortBy(this)">case</th>',
            f'<th class=sort onclick="sortBy(this)">{first}</th>']
    head += [f'<th class=sort onclick="sortBy(this)">{esc(name)}<br>'
             f'{"volume ml" if metric == "pred_volume_ml" else metric}</th>' for name, metric, _ in columns]
    rows = []
    for case in cases:
        cells = [f'<td><a href="{_href(case["page"])}"><img src="{_href(case["thumbnail"])}"{lazy} alt="'
                 f'{esc(case["name"])}"></a></td>',
                 f'<td class=name><a href="{_href(case["page"])}">{esc(case["name"])}</a></td>',
                 cell(case["score"], 3)]
        for name, metric, digits in columns:
            value = case["metrics"][name][metric] if case.get("metrics") else case["volumes_ml"].get(name)
            cells.append(cell(value, digits, bad=metric == "dice" and value is not None and value < 0.5))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f"<table class=cases><thead><tr>{''.join(head)}</tr></thead><tbody>\n" + "\n".join(rows)
            + "\n</tbody></table>")


def main_page(title: str, facts: list[tuple[str, str]], sections: list[tuple[str, str]]) -> str:
    """The report's first page: `facts` (label, text) at the top, then each (heading, HTML) section."""
    head = "".join(f"<tr><th class=name>{esc(k)}</th><td class=name>{esc(v)}</td></tr>" for k, v in facts)
    body = [f"<h1>{esc(title)}</h1>", f"<table class=facts>{head}</table>"]
    body += [f"<h2>{esc(heading)}</h2>\n{content}" for heading, content in sections]
    return _page(title, "\n".join(body))


def figure(src: str, caption: str) -> str:
    return f'<figure><img src="{_href(src)}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def plan_block(plan: dict[str, Any]) -> str:
    return (f"<details><summary>effective plan (plans.json)</summary><pre>{esc(json.dumps(plan, indent=2))}</pre>"
            "</details>")


FILLED_OPACITY = 55  # percent: the image stays visible under a filled layer


def _shown_at_first(point: str, layer: str) -> bool:
    """Errors are shown where the point is an error; elsewhere the prediction is (both at once hide each other)."""
    if layer == "errors":
        return point == "error"
    return not (layer == "prediction" and point == "error")


def _layer_boxes(point: str, layers: Sequence[str]) -> str:
    return "".join(f'<label><input type=checkbox value="{layer}"{" checked" if _shown_at_first(point, layer) else ""}'
                   f' onchange="showLayer(this)"> {esc(LAYER_TITLES[layer])}</label> ' for layer in layers)


def _controls() -> str:
    return (f"<p class=controls><label>filled layers' opacity <input type=range min=0 max=100 value={FILLED_OPACITY} "
            'oninput="setOpacity(this.value)"></label> <label>zoom <select onchange="setZoom(this.value)">'
            "<option value=1>1x</option><option value=2>2x</option><option value=3>3x</option></select></label></p>")


def case_page(name: str, facts_table: str, pictures: dict[str, dict[str, dict[str, str]]], legend_html: str,
              back: str) -> str:
    """A case's page: its numbers, then for each point of interest the three planes with their layers."""
    layers = [layer for layer in LAYER_TITLES if any(layer in planes[p] for planes in pictures.values()
                                                     for p in planes)]
    many = facts_table.count("<tr>") > 9  # a long table of classes goes below the pictures
    body = [f'<p><a href="{_href(back)}">&larr; all cases</a></p>', f"<h1>{esc(name)}</h1>",
            "" if many else facts_table, legend_html, _controls()]
    for point, planes in pictures.items():
        figures = []
        for plane in PLANES:
            files = planes[plane]
            stack = [f'<img class=base src="{_href(files["image"])}" alt="{esc(plane)} image">']
            for layer in (name for name in LAYER_TITLES if name in files):
                style = [] if _shown_at_first(point, layer) else ["display:none"]
                filled = layer != "reference"
                if filled:
                    style.append(f"opacity:{FILLED_OPACITY / 100:.2f}")
                stack.append(f'<img class="layer layer-{layer}{" filled" if filled else ""}" style="{";".join(style)}" '
                             f'src="{_href(files[layer])}" alt="{esc(layer)}">')
            figures.append(f"<figure><div class=stack>{''.join(stack)}</div><figcaption>{plane}</figcaption></figure>")
        body.append(f"<section><h2>{esc(POINT_TITLES.get(point, point))}</h2>"
                    f"<p class=controls>{_layer_boxes(point, layers)}</p><div class=planes>{''.join(figures)}</div>"
                    "</section>")
    if many:
        body.append(f"<h2>Per class</h2>{facts_table}")
    return _page(f"{name} - voxseg report", "\n".join(body))
