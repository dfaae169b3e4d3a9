"""Figures (plotly) for knockouts, the logit lens, patching, attention between spans and causal
image maps, and an explorer of the maps (``explore``)."""

from mmlens.plotting.attention import attention_mass, attention_mass_heatmap, image_attention
from mmlens.plotting.attribution import attribution_figure
from mmlens.plotting.causal_maps import causal_map_figure, feature_map_figure, region_attention
from mmlens.plotting.curves import (
    knockout_curves,
    layer_span_heatmap,
    lens_trajectories,
    mean_with_band,
)
from mmlens.plotting.explore import explore

__all__ = [
    "attribution_figure",
    "attention_mass",
    "attention_mass_heatmap",
    "causal_map_figure",
    "explore",
    "feature_map_figure",
    "image_attention",
    "knockout_curves",
    "layer_span_heatmap",
    "lens_trajectories",
    "mean_with_band",
    "region_attention",
]
