"""Charts for the routing lab: a replayed policy (`moeviz.analysis.policies.Assignment`) beside the
model's own routing. Pure functions to Plotly figures or escaped HTML; nothing loads a model.

Series colours: the model grey, the policy blue, dropped assignments red and hatched.
Experts keep their colours from `charts.expert_colors` in the token view and the bias chart.
"""

from __future__ import annotations

import html

import numpy as np
import plotly.colors
import plotly.graph_objects as go
from numpy.typing import ArrayLike

from moeviz.analysis import policies
from moeviz.analysis.metrics import MIN_CAPACITY
from moeviz.analysis.policies import Assignment
from moeviz.views.charts import expert_axis, expert_colors, token_label

MODEL_COLOR = "#7f7f7f"
POLICY_COLOR = plotly.colors.qualitative.D3[0]
DROPPED_COLOR = plotly.colors.qualitative.D3[3]
_LEGEND = dict(orientation="h", yanchor="top", y=-0.22, xanchor="left", x=0)  # below: long policy names


def _check_same_routing(reference: Assignment, policy: Assignment) -> None:
    if (reference.num_tokens, reference.num_experts) != (policy.num_tokens, policy.num_experts):
        raise ValueError(
            f"reference and policy must route the same tokens to the same experts; got "
            f"{reference.num_tokens} tokens × {reference.num_experts} experts and "
            f"{policy.num_tokens} × {policy.num_experts}"
        )


def policy_load_chart(reference: Assignment, policy: Assignment) -> go.Figure:
    """Share of tokens each expert processes, the model's routing beside the policy's.

    Traces: "model" bars (`policies.expert_load(reference)`), policy bars, then, when the
    policy drops anything, its dropped share (`policies.dropped_load`) stacked on its bars;
    a dashed line at the model's uniform load (k/E), and a dotted one at the capacity C/T
    when the policy has a capacity.
    """
    _check_same_routing(reference, policy)
    experts = np.arange(policy.num_experts)
    hover = "%{fullData.name}<br>expert %{x}: %{y:.3f} of tokens<extra></extra>"
    routed = policies.expert_load(policy)
    traces = [
        go.Bar(x=experts, y=policies.expert_load(reference), name=reference.policy, offsetgroup="model",
               marker=dict(color=MODEL_COLOR), hovertemplate=hover),
        go.Bar(x=experts, y=routed, name=policy.label, offsetgroup="policy",
               marker=dict(color=POLICY_COLOR), hovertemplate=hover),
    ]
    if policy.dropped.any():
        traces.append(go.Bar(
            x=experts, y=policies.dropped_load(policy), base=routed, name="dropped (over capacity)",
            offsetgroup="policy",  # no outline: it would draw a red line on experts that drop nothing
            marker=dict(color="white", line=dict(width=0), pattern=dict(shape="/", fgcolor=DROPPED_COLOR)),
            hovertemplate=hover,
        ))
    edges = [-0.5, policy.num_experts - 0.5]
    uniform = float(policies.expert_load(reference).mean())
    traces.append(go.Scatter(x=edges, y=[uniform, uniform], mode="lines", name=f"uniform, model ({uniform:.3g})",
                             line=dict(color="#555555", dash="dash", width=1.5),
                             hovertemplate=f"uniform {uniform:.3f}<extra></extra>"))
    if policy.capacity is not None:
        share = policy.capacity / policy.num_tokens
        traces.append(go.Scatter(x=edges, y=[share, share], mode="lines",
                                 name=f"capacity C = {policy.capacity} tokens",
                                 line=dict(color=DROPPED_COLOR, dash="dot", width=1.5),
                                 hovertemplate=f"capacity {share:.3f}<extra></extra>"))
    fig = go.Figure(traces)
    fig.update_layout(
        title=dict(text="Expert load: share of tokens each expert processes"),
        barmode="group",
        xaxis=dict(expert_axis(policy.num_experts), range=[-0.5, policy.num_experts - 0.5]),
        yaxis=dict(title=dict(text="share of tokens"), rangemode="tozero"),
        legend=_LEGEND,
    )
    return fig


def experts_per_token_chart(reference: Assignment, policy: Assignment) -> go.Figure:
    """Share of tokens processed by 0, 1, 2, ... experts, model and policy as grouped bars
    (`policies.experts_per_token` over the tokens, padded to the same length)."""
    _check_same_routing(reference, policy)
    counts = [policies.experts_per_token(a) for a in (reference, policy)]
    size = max(c.size for c in counts)
    x = np.arange(size)
    bars = [
        go.Bar(x=x, y=np.pad(c, (0, size - c.size)) / a.num_tokens, name=name, marker=dict(color=color),
               hovertemplate="%{fullData.name}<br>%{x} experts: %{y:.1%} of tokens<extra></extra>")
        for c, a, name, color in zip(counts, (reference, policy), (reference.policy, policy.label),
                                     (MODEL_COLOR, POLICY_COLOR))
    ]
    fig = go.Figure(bars)
    fig.update_layout(
        title=dict(text="Experts per token"),
        barmode="group",
        xaxis=dict(title=dict(text="experts processing the token"), tickmode="linear", tick0=0, dtick=1),
        yaxis=dict(title=dict(text="share of tokens"), tickformat=".0%", rangemode="tozero"),
        legend=_LEGEND,
    )
    return fig


def capacity_sweep_chart(
    capacity_factors: ArrayLike, shares: dict[str, ArrayLike], reference_factors: tuple[float, ...]
) -> go.Figure:
    """Share of tokens with an assignment dropped against the capacity factor α, one line per
    series (shares: {name: float[factors]}), with each series' value marked at the
    `reference_factors` (which must be among `capacity_factors`) and a dotted line at each."""
    if not shares:
        raise ValueError("shares is empty: pass at least one {name: float[factors]} series")
    factors = np.asarray(capacity_factors, dtype=float)
    where = {}
    for alpha in reference_factors:
        hits = np.flatnonzero(np.isclose(factors, alpha))
        if hits.size == 0:
            raise ValueError(f"reference capacity factor {alpha} is not among the swept factors")
        where[alpha] = hits[0]
    traces, marks = [], []
    for i, (name, values) in enumerate(shares.items()):
        values = np.asarray(values, dtype=float)
        if values.shape != factors.shape:
            raise ValueError(f"{name!r} has {values.size} values for {factors.size} capacity factors")
        color = plotly.colors.qualitative.D3[i % len(plotly.colors.qualitative.D3)]
        traces.append(go.Scatter(x=factors, y=values, mode="lines", name=token_label(name),
                                 line=dict(color=color, width=2),
                                 hovertemplate="%{fullData.name}<br>α = %{x:.2f}: %{y:.1%} dropped<extra></extra>"))
        marks.extend((alpha, values[index]) for alpha, index in where.items())
    traces.append(go.Scatter(
        x=[alpha for alpha, _ in marks], y=[value for _, value in marks], mode="markers",
        name="reference α", marker=dict(color="black", size=9, symbol="diamond"),
        hovertemplate="α = %{x}: %{y:.1%} dropped<extra></extra>",
    ))
    fig = go.Figure(traces)
    for alpha in reference_factors:
        fig.add_vline(x=alpha, line=dict(color="#555555", dash="dot", width=1),
                      annotation=dict(text=f"α = {alpha:g}", yanchor="bottom"), annotation_position="top")
    fig.update_layout(
        title=dict(text="Tokens dropped against capacity factor"),
        xaxis=dict(title=dict(text=f"capacity factor α  (C = max(⌈α·k·T/E⌉, {MIN_CAPACITY}))")),
        yaxis=dict(title=dict(text="tokens with an assignment dropped"), tickformat=".0%", rangemode="tozero"),
        legend=_LEGEND,
    )
    return fig


def bias_chart(bias: ArrayLike) -> go.Figure:
    """The final per-expert bias of bias balancing, bias: float[experts], one bar per expert
    in its colour: negative for experts that were overloaded."""
    bias = np.asarray(bias, dtype=float)
    if bias.ndim != 1 or bias.size == 0:
        raise ValueError(f"bias must be float[experts] with at least one expert, got shape {bias.shape}")
    fig = go.Figure(go.Bar(x=np.arange(bias.size), y=bias, name="bias", marker=dict(color=expert_colors(bias.size)),
                           hovertemplate="expert %{x}<br>bias %{y:+.4f}<extra></extra>"))
    fig.update_layout(
        title=dict(text="Final bias per expert (added to the scores for selection only)"),
        xaxis=dict(expert_axis(bias.size), range=[-0.5, bias.size - 0.5]),
        yaxis=dict(title=dict(text="bias b_i")),
    )
    return fig


def _tint(color: str) -> str:
    r, g, b = plotly.colors.hex_to_rgb(color)
    return f"rgba({r},{g},{b},0.45)"


def assignment_view_html(tokens: list[str], assignment: Assignment) -> str:
    """The text coloured by each token's first routed expert, as `charts.token_view_html`
    but for any assignment, with drops marked.

    One `<span class="moeviz-token">` per token, its `title` listing the experts with weights
    (or "dropped"). Tokens no expert processes have the extra class `moeviz-unrouted` (struck
    through, no colour); tokens that still have an expert but lost another `moeviz-dropped`.
    Every token with a dropped assignment has a dashed red outline. Token text is made
    visible and HTML-escaped by `charts.token_label`.
    """
    if len(tokens) != assignment.num_tokens:
        raise ValueError(f"{len(tokens)} tokens but the assignment routes {assignment.num_tokens}")
    colors = expert_colors(assignment.num_experts)
    routed = assignment.routed
    spans, first = [], []
    for token, ids, weights, dropped, used in zip(tokens, assignment.expert_ids, assignment.weights,
                                                  assignment.dropped, routed):
        title = " · ".join(
            f"expert {e}: dropped" if d else f"expert {e}: {w:.2f}" for e, w, d in zip(ids, weights, dropped) if e >= 0
        ) or "no expert chose this token"
        text = token_label(token) + "<br>" * token.count("\n")
        style = "padding:1px 1px;border-radius:3px;"
        if used.any():
            kind = "moeviz-token moeviz-dropped" if dropped.any() else "moeviz-token"
            expert = int(ids[used][0])
            first.append(expert)
            style += f"background-color:{_tint(colors[expert])};"  # black text reads on every tint
        else:
            kind = "moeviz-token moeviz-unrouted"
            style += "color:#777777;text-decoration:line-through;"
        if dropped.any():
            style += f"outline:1px dashed {DROPPED_COLOR};"
        spans.append(f'<span class="{kind}" title="{html.escape(title, quote=True)}" style="{style}">{text}</span>')

    experts, counts = np.unique(np.asarray(first, dtype=int), return_counts=True)
    swatches = [
        f'<span class="moeviz-swatch" title="{count} token{"" if count == 1 else "s"}" '
        f'style="background-color:{_tint(colors[expert])};padding:0 4px;margin:0 4px 2px 0;'
        f'border-radius:3px;display:inline-block">expert {expert}</span>'
        for expert, count in zip(experts, counts)
    ]
    unrouted = int((~routed.any(axis=1)).sum())
    lost = int(assignment.dropped.any(axis=1).sum())
    marks = (
        f'<span class="moeviz-mark" style="outline:1px dashed {DROPPED_COLOR};padding:0 4px;margin:0 4px">'
        f"dashed: an assignment dropped ({lost})</span>"
        '<span class="moeviz-mark" style="color:#777777;text-decoration:line-through;padding:0 4px;margin:0 4px">'
        f"struck through: no expert ({unrouted})</span>"
    )
    return (
        '<div class="moeviz-token-view" style="font-family:monospace;line-height:1.9;'
        f'white-space:pre-wrap;word-break:break-word">{"".join(spans)}</div>'
        '<div class="moeviz-legend" style="font-size:0.8em;margin-top:0.5em">'
        f'{html.escape(assignment.label)}, first routed expert: {"".join(swatches)}{marks}</div>'
    )
