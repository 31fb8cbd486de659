"""Figures of a model's training history (`moeviz.analysis.training`): router saturation,
load balance and selection biases per MoE layer over training, and the loss curves. Pure
functions; every figure reads back through `charts.figure_table` for its CSV download."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from moeviz.analysis.training import TrainingHistory

_STEP_AXIS = dict(title=dict(text="training step"))


def _per_layer_lines(h: TrainingHistory, values: np.ndarray, title: str, y_title: str, **yaxis) -> go.Figure:
    """One line per MoE layer over the history's points. values: float[points, moe_layers]"""
    fig = go.Figure([
        go.Scatter(x=h.steps, y=values[:, i].tolist(), mode="lines+markers", name=f"layer {layer}",
                   customdata=[[layer, p["tokens"]] for p in h.points],
                   meta={"customdata": ["layer", "tokens"], "columns": {"x": "step", "y": y_title.replace(" ", "_")}},
                   hovertemplate=f"layer {layer}, step %{{x}} (%{{customdata[1]:,}} tokens)<br>"
                                 f"{y_title} %{{y:.3f}}<extra></extra>")
        for i, layer in enumerate(h.moe_layers)
    ])
    fig.update_layout(title=dict(text=title), xaxis=_STEP_AXIS, yaxis=dict(title=dict(text=y_title), **yaxis),
                      legend=dict(title=dict(text="MoE layer")), margin=dict(t=60))
    return fig


def saturation_chart(h: TrainingHistory, saturation: np.ndarray) -> go.Figure:
    return _per_layer_lines(
        h, saturation, "Router saturation: share of each token's top-k the final model also picks (OLMoE Eq. 5)",
        "saturation", range=[0, 1.02], tickformat=".0%")


def load_cv_chart(h: TrainingHistory, cv: np.ndarray) -> go.Figure:
    return _per_layer_lines(h, cv, "Load imbalance on the held-out samples: coefficient of variation "
                                   "of the experts' loads (0 = even)", "load CV", rangemode="tozero")


def max_violation_chart(h: TrainingHistory, max_vio: np.ndarray) -> go.Figure:
    return _per_layer_lines(h, max_vio, "MaxVio on the held-out samples: (busiest expert − mean) / mean "
                                        "(arXiv 2408.15664 Eq. 4; 0 = even)", "MaxVio", rangemode="tozero")


def _expert_heatmap(h: TrainingHistory, z: np.ndarray, title: str, colour_title: str, **trace) -> go.Figure:
    """z: float[points, experts] -> experts down, training steps across."""
    fig = go.Figure(go.Heatmap(
        z=z.T.tolist(), x=[str(s) for s in h.steps], y=list(range(h.num_experts)),
        meta={"columns": {"x": "step", "y": "expert", "z": colour_title.replace(" ", "_")}},
        colorbar=dict(title=dict(text=colour_title)),
        hovertemplate=f"expert %{{y}}, step %{{x}}<br>{colour_title} %{{z:.4f}}<extra></extra>", **trace,
    ))
    fig.update_layout(title=dict(text=title), xaxis=dict(title=dict(text="training step"), type="category"),
                      yaxis=dict(title=dict(text="expert"), autorange="reversed"), margin=dict(t=60))
    return fig


def bias_chart(h: TrainingHistory, layer_index: int) -> go.Figure:
    """The selection bias b_i of every expert of one MoE layer over training (DeepSeek's
    auxiliary-loss-free balancing: added to the scores only to choose experts)."""
    layer = h.moe_layers[layer_index]
    limit = float(np.abs(h.biases[:, layer_index]).max()) or 1.0
    fig = _expert_heatmap(h, h.biases[:, layer_index], f"Layer {layer}: selection bias of each expert over training",
                          "bias", colorscale="RdBu", zmin=-limit, zmax=limit)
    fig.update_layout(meta={"layer": layer})
    return fig


def load_over_training_chart(h: TrainingHistory, loads: np.ndarray, layer_index: int) -> go.Figure:
    """Each expert's share of one layer's held-out selections at every point (1/E when even)."""
    layer = h.moe_layers[layer_index]
    fig = _expert_heatmap(h, loads[:, layer_index], f"Layer {layer}: each expert's share of the held-out "
                          f"selections (even: {1 / h.num_experts:.3f})", "load share", colorscale="Viridis", zmin=0)
    fig.update_layout(meta={"layer": layer})
    return fig


def loss_chart(log: pd.DataFrame) -> go.Figure:
    """Training loss per step (and its 50-step mean) and the held-out loss where it was measured."""
    width = min(50, len(log))
    smooth = log["loss"].rolling(width).mean()
    heldout = log[pd.to_numeric(log["heldout_loss"], errors="coerce").notna()]
    fig = go.Figure([
        go.Scatter(x=log["step"].tolist(), y=log["loss"].tolist(), mode="lines", name="training (per step)",
                   meta={"columns": {"x": "step", "y": "loss"}},
                   line=dict(width=1), opacity=0.35),
        go.Scatter(x=log["step"][width - 1:].tolist(), y=smooth[width - 1:].tolist(), mode="lines",
                   name=f"training ({width}-step mean)", meta={"columns": {"x": "step", "y": "loss"}}),
        go.Scatter(x=heldout["step"].tolist(), y=pd.to_numeric(heldout["heldout_loss"]).tolist(),
                   mode="lines+markers", name="held-out samples", meta={"columns": {"x": "step", "y": "loss"}}),
    ])
    fig.update_layout(title=dict(text="Language-model loss"), xaxis=_STEP_AXIS,
                      yaxis=dict(title=dict(text="cross-entropy (nats per token)")), margin=dict(t=60))
    return fig
