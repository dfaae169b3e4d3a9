"""The report's explorer under an example view: a flow control, the question's words (and the
last position) and the example's knockout curve. Clicking a word lays its precomputed causal
map over the image; clicking a flow switches to that flow's window (the maps the words show)
and to its curve.

    html = word_picker(view, "view-0")   # after figure.to_html(div_id="view-0")
    page += PICKER_SCRIPT                # once per page, after the figures

The data travel in a ``<script type="application/json" id="view-0-maps">``: ``words`` (words
per window), ``maps`` (one grid, colour bound and caption per window and word, window after
window) and ``flows`` (per flow its window's index, centre, curve and caption). The script
restyles the view figure's hidden third trace (``mmlens.plotting.views.example_view_figure``)
with the picked word's grid in the picked flow's window and hides the attention trace;
"attention" brings it back. The curve figure (``view-0-curve``) holds the flow's curve (trace
0) and its window's point (trace 1). The view's div records the picked word in
``data-shown`` (its index, ``-1`` for the attention) and the flow in ``data-flow``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go

from mmlens.plotting.views import word_map_caption, word_map_grid

PICKER_SCRIPT = """<script>
function mmlensShow(box) {
  var plot = document.getElementById(box.dataset.plot);
  var data = JSON.parse(document.getElementById(box.dataset.plot + '-maps').textContent);
  var word = Number(box.dataset.word), flowIndex = Number(box.dataset.flow);
  var flow = data.flows[flowIndex];
  var caption = box.querySelector('.map-caption');
  if (word < 0 || !data.maps.length) {
    Plotly.restyle(plot, {visible: [true, false]}, [1, 2]);
    caption.textContent = data.maps.length ? box.dataset.attention : data.none;
  } else {
    var map = data.maps[(flow ? flow.window : 0) * data.words + word];
    Plotly.restyle(plot, {z: [map.z], zmin: -map.bound, zmax: map.bound}, [2]);
    Plotly.restyle(plot, {visible: [false, true]}, [1, 2]);
    caption.textContent = map.caption;
  }
  if (flow) {
    var curve = document.getElementById(box.dataset.plot + '-curve');
    Plotly.restyle(curve, {x: [flow.centres, [flow.centre]], y: [flow.values, [flow.point]],
                           name: [flow.name, flow.marker]}, [0, 1]);
    Plotly.relayout(curve, {'title.text': flow.title});
    box.querySelector('.curve-caption').textContent = flow.caption;
    plot.dataset.flow = flow.name;
  }
  plot.dataset.shown = String(word);
  box.querySelectorAll('.word').forEach(function (other) {
    other.style.fontWeight = Number(other.dataset.index) === word ? 'bold' : 'normal';
  });
  box.querySelectorAll('.flow').forEach(function (other) {
    other.style.fontWeight = Number(other.dataset.flow) === flowIndex ? 'bold' : 'normal';
  });
}
document.querySelectorAll('.words .word, .words .flow').forEach(function (item) {
  item.addEventListener('click', function () {
    var box = item.closest('.words');
    if (item.classList.contains('flow')) { box.dataset.flow = item.dataset.flow; }
    else { box.dataset.word = item.dataset.index; }
    mmlensShow(box);
  });
});
</script>
<style>.words .word,.words .flow{cursor:pointer;padding:1px 4px;margin:0 2px;
border:1px solid #bbb;border-radius:3px;background:#f6f6f6}
.words .flow{background:#eef3fb}</style>"""

ATTENTION = "Heatmap: the question's attention to each cell (mean over layers and heads)."
NOT_COMPUTED = ("The words' causal maps were not computed for this run (mmlens flow "
                "--no-word-maps); run it without that flag to add them.")


def word_picker(view: Mapping[str, Any], div_id: str) -> str:
    """The flow control, clickable words and curve under the view figure drawn into
    ``div_id``; empty for a view with neither maps nor flows (runs saved before them)."""
    entries = view.get("word_maps") or []
    flows = view.get("flows") or []
    if not entries and not flows:
        return ""
    n_words = sum(1 for entry in entries if entry.get("window", 0) == 0)
    maps = []
    for index in range(len(entries)):
        grid = word_map_grid(view, index)
        finite = np.abs(grid[np.isfinite(grid)])
        maps.append({"z": [[None if math.isnan(v) else round(v, 6) for v in row]
                           for row in grid.tolist()],
                     "bound": float(finite.max()) if finite.size and finite.max() > 0 else 1.0,
                     "caption": word_map_caption(view, index)})
    percent = view.get("flow_value", "rel_change") == "rel_change"
    data = {"words": n_words, "maps": maps, "none": NOT_COMPUTED,
            "flows": [_flow_entry(flow, percent) for flow in flows]}
    words = "".join(f"<span class='word' data-index='{index}'>{html.escape(entry['word'])}"
                    "</span>" for index, entry in enumerate(entries[:n_words]))
    pick = (f"<p>Click a word to see where in the image it took what the answer needed "
            f"(its causal map): <span class='word' data-index='-1'>attention</span>{words}</p>"
            if entries else f"<p class='no-maps'>{html.escape(NOT_COMPUTED)}</p>")
    flow_control = curve = ""
    if flows:
        buttons = "".join(f"<span class='flow' data-flow='{index}'>{html.escape(flow['name'])}"
                          "</span>" for index, flow in enumerate(flows))
        flow_control = ("<p>Pick a flow: its window (centred where it drops most for this "
                        f"example) sets the layers the maps block, and its curve is drawn "
                        f"below: {buttons}</p>")
        curve = (f"<p class='curve-caption'>{html.escape(data['flows'][0]['caption'])}</p>"
                 + curve_figure(data["flows"][0], percent).to_html(
                     full_html=False, include_plotlyjs=False, div_id=f"{div_id}-curve"))
    # "</" cannot close the script element early: JSON allows "<\/".
    payload = json.dumps(data, allow_nan=False).replace("</", "<\\/")
    return (f"<div class='words' data-plot='{div_id}' data-word='-1' data-flow='0' "
            f"data-attention='{html.escape(ATTENTION)}'>{flow_control}{pick}"
            f"<p class='map-caption'>{html.escape(ATTENTION)}</p>{curve}</div>"
            f"<script type='application/json' id='{div_id}-maps'>{payload}</script>")


def _flow_entry(flow: Mapping[str, Any], percent: bool) -> dict[str, Any]:
    """A flow as the script reads it: its window's index, curve, the window's point and
    captions, from the view's numbers."""
    values = dict(zip(flow["centres"], flow["values"], strict=True))
    point = values.get(flow["centre"])
    layers = flow["layers"]
    span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else f"{layers[0]}"
    unit = "%" if percent else ""
    if point is None or (isinstance(point, float) and math.isnan(point)):
        caption = (f"{flow['name']}: no knockout value for this example; the maps use the "
                   f"middle window, layers {span}.")
    else:
        caption = (f"{flow['name']}: blocking it in the window centred at layer "
                   f"{flow['centre']} (layers {span}) changes this example's answer most, "
                   f"{point:+.2f}{unit}; the maps block the words in the same layers.")
    return {"name": flow["name"], "window": flow["window"], "centre": flow["centre"],
            "centres": flow["centres"], "values": flow["values"], "point": point,
            "marker": f"window {span} (the maps')", "caption": caption,
            "title": f"This example's knockout curve: {flow['name']}"}


def curve_figure(flow: Mapping[str, Any], percent: bool) -> go.Figure:
    """A flow's curve for one example (trace 0) and its window's point (trace 1)."""
    figure = go.Figure([
        go.Scatter(x=flow["centres"], y=flow["values"], mode="lines+markers", name=flow["name"]),
        go.Scatter(x=[flow["centre"]], y=[flow["point"]], mode="markers", name=flow["marker"],
                   marker={"size": 14, "symbol": "circle-open", "line": {"width": 3}})])
    figure.update_layout(title=flow["title"], height=300, width=620,
                         margin={"t": 50, "b": 40},
                         xaxis_title="centre layer of the blocked window",
                         yaxis_title="relative change (%)" if percent else "change")
    return figure
