"""The report's word picker: under an example view, the question's words (and the last
position); clicking one lays that word's precomputed causal map over the image.

    html = word_picker(view, "view-0")   # after figure.to_html(div_id="view-0")
    page += PICKER_SCRIPT                # once per page, after the figures

The maps travel in a ``<script type="application/json" id="view-0-maps">`` (one grid, colour
bound and caption per word); the script restyles the view figure's hidden third trace
(``mmlens.plotting.views.example_view_figure``) with the picked word's grid and hides the
attention trace; "attention" brings it back. The figure's div records the picked word in
``data-shown`` (its index, ``-1`` for the attention).
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from mmlens.plotting.views import word_map_caption, word_map_grid

PICKER_SCRIPT = """<script>
document.querySelectorAll('.words .word').forEach(function (word) {
  word.addEventListener('click', function () {
    var box = word.closest('.words');
    var plot = document.getElementById(box.dataset.plot);
    var maps = JSON.parse(document.getElementById(box.dataset.plot + '-maps').textContent);
    var index = Number(word.dataset.index);
    var caption = box.querySelector('.map-caption');
    if (index < 0) {
      Plotly.restyle(plot, {visible: [true, false]}, [1, 2]);
      caption.textContent = box.dataset.attention;
    } else {
      var map = maps[index];
      Plotly.restyle(plot, {z: [map.z], zmin: -map.bound, zmax: map.bound}, [2]);
      Plotly.restyle(plot, {visible: [false, true]}, [1, 2]);
      caption.textContent = map.caption;
    }
    plot.dataset.shown = String(index);
    box.querySelectorAll('.word').forEach(function (other) {
      other.style.fontWeight = other === word ? 'bold' : 'normal';
    });
  });
});
</script>
<style>.words .word{cursor:pointer;padding:1px 4px;margin:0 2px;border:1px solid #bbb;
border-radius:3px;background:#f6f6f6}</style>"""


def word_picker(view: Mapping[str, Any], div_id: str) -> str:
    """The clickable words under the view figure drawn into ``div_id``, with their maps;
    empty for a view without ``word_maps`` (runs saved before them)."""
    entries = view.get("word_maps") or []
    if not entries:
        return ""
    maps = []
    for index in range(len(entries)):
        grid = word_map_grid(view, index)
        maps.append({"z": np.round(grid, 6).tolist(),
                     "bound": float(np.nanmax(np.abs(grid))) or 1.0,
                     "caption": word_map_caption(view, index)})
    words = "".join(f"<span class='word' data-index='{index}'>{html.escape(entry['word'])}"
                    "</span>" for index, entry in enumerate(entries))
    attention = "Heatmap: the question's attention to each cell (mean over layers and heads)."
    # "</" cannot close the script element early: JSON allows "<\/".
    data = json.dumps(maps).replace("</", "<\\/")
    return (f"<div class='words' data-plot='{div_id}' data-attention='{html.escape(attention)}'>"
            f"<p>Click a word to see where in the image it took what the answer needed "
            f"(its causal map): <span class='word' data-index='-1'>attention</span>{words}</p>"
            f"<p class='map-caption'>{html.escape(attention)}</p></div>"
            f"<script type='application/json' id='{div_id}-maps'>{data}</script>")
