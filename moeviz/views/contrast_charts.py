"""Views of a contrast between two sets of texts (`moeviz.analysis.contrast`): the risk difference
of every expert, the top experts with their intervals, and what steering them did to each set.
Pure functions; every figure reads back through `charts.figure_table` with named columns.

Colours: blue where set A selects the expert more often, red where B does (RdBu, as for signed
differences elsewhere in moeviz).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from moeviz.analysis.contrast import Contrast, SetEffect
from moeviz.views.charts import expert_axis
from moeviz.views.intervention_charts import LESS_LIKELY, MORE_LIKELY

A_COLOR, B_COLOR = MORE_LIKELY, LESS_LIKELY


def _layer_axis(layer_ids: list[int], labels: list[str]) -> dict:
    return {"title": {"text": "layer"}, "type": "category", "tickmode": "array", "tickvals": list(layer_ids),
                "ticktext": list(labels)}


def risk_difference_heatmap(result: Contrast) -> go.Figure:
    """Layer × expert: p_A − p_B, blue where A selects the expert more often; hover gives both
    rates and the interval."""
    difference = result.risk_difference
    low, high = result.interval
    scale = max(float(np.abs(difference).max()), 1e-9)
    custom = np.stack([result.rate_a, result.rate_b, low, high], axis=-1)
    fig = go.Figure(go.Heatmap(
        z=difference, x=np.arange(result.num_experts), y=list(result.layer_ids), customdata=custom,
        colorscale="RdBu", zmin=-scale, zmax=scale, zmid=0,
        colorbar={"title": {"text": "p_A − p_B"}},
        meta={"columns": {"x": "expert", "y": "layer", "z": "risk_difference"},
              "customdata": ["rate_a", "rate_b", "ci_low", "ci_high"]},
        hovertemplate=("layer %{y}, expert %{x}<br>A %{customdata[0]:.1%} · B %{customdata[1]:.1%}<br>"
                       "Δ %{z:+.3f} [%{customdata[2]:+.3f}, %{customdata[3]:+.3f}]<extra></extra>"),
    ))
    fig.update_layout(
        title={"text": f"How much more often set A selects each expert than set B (top-{result.top_k}; blue: A, "
                   "red: B)"},
        xaxis=expert_axis(result.num_experts), yaxis=_layer_axis(result.layer_ids, result.layer_labels),
        margin={"t": 50, "b": 40}, height=max(260, 60 + 36 * len(result.layer_ids)),
    )
    return fig


def top_experts_chart(ranking: pd.DataFrame, confidence: float) -> go.Figure:
    """The ranked experts of `Contrast.ranking` (best first) as points with their intervals; the
    x axis is the rank, each tick names the layer and expert."""
    difference = ranking["risk_difference"].to_numpy(dtype=np.float64)
    custom = ranking[["layer", "expert", "rate_a", "rate_b", "ci_low", "ci_high"]].to_numpy(dtype=np.float64)
    fig = go.Figure(go.Scatter(
        x=ranking["rank"].to_numpy(), y=difference, mode="markers",
        marker={"size": 9, "color": [A_COLOR if d > 0 else B_COLOR for d in difference]},
        error_y={"type": "data", "symmetric": False, "array": ranking["ci_high"].to_numpy() - difference,
                     "arrayminus": difference - ranking["ci_low"].to_numpy()},
        customdata=custom, name="risk difference",
        meta={"columns": {"x": "rank", "y": "risk_difference"},
              "customdata": ["layer", "expert", "rate_a", "rate_b", "ci_low", "ci_high"]},
        hovertemplate=("layer %{customdata[0]}, expert %{customdata[1]}<br>A %{customdata[2]:.1%} · B "
                       "%{customdata[3]:.1%}<br>Δ %{y:+.3f} [%{customdata[4]:+.3f}, %{customdata[5]:+.3f}]"
                       "<extra></extra>"),
    ))
    fig.add_hline(y=0, line={"color": "#555555", "width": 1})
    fig.update_layout(
        title={"text": f"Experts with the largest difference, {confidence:.0%} interval (Newcombe)"},
        xaxis={"title": {"text": "rank"}, "tickmode": "array", "tickvals": ranking["rank"].tolist(),
                   "ticktext": [f"L{layer} e{expert}" for layer, expert in zip(ranking["layer"], ranking["expert"])]},
        yaxis={"title": {"text": "p_A − p_B"}, "zeroline": False},
        margin={"t": 50, "b": 40}, height=340,
    )
    return fig


def set_effect_chart(effects: Mapping[str, SetEffect], what: str) -> go.Figure:
    """Mean Δ log p of the actual next token in each set after the intervention `what`."""
    names = list(effects)
    values = [effects[name].mean_delta_logprob for name in names]
    custom = [[effects[n].perplexity_before, effects[n].perplexity_after, effects[n].predicted_tokens] for n in names]
    fig = go.Figure(go.Bar(
        x=names, y=values, customdata=custom, marker_color=[A_COLOR, B_COLOR][: len(names)],
        meta={"columns": {"x": "set", "y": "mean_delta_logprob"},
              "customdata": ["perplexity_before", "perplexity_after", "predicted_tokens"]},
        hovertemplate=("%{x}: mean Δ log p %{y:+.4f}<br>perplexity %{customdata[0]:.3f} → %{customdata[1]:.3f}"
                       "<br>%{customdata[2]} predicted tokens<extra></extra>"),
    ))
    fig.add_hline(y=0, line={"color": "#555555", "width": 1})
    fig.update_layout(title={"text": f"Mean change in log p of the actual next token · {what}"},
                      xaxis={"title": {"text": "set"}, "type": "category"},
                      yaxis={"title": {"text": "mean Δ log p (nats)"}}, margin={"t": 50, "b": 40}, height=320)
    return fig
