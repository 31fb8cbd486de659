"""Views of two variants of one model on the same text (`moeviz.analysis.variants`): agreement per
layer, the tokens where their first choices differ, and Δ log p of each actual next token.
Pure functions; token text reaches HTML and Plotly only through `charts.token_label` (escaped).
"""

from __future__ import annotations

import html

import plotly.graph_objects as go

from moeviz.analysis.variants import VariantComparison
from moeviz.views.charts import token_label
from moeviz.views.intervention_charts import logprob_delta_chart

FIRST_COLOR, OVERLAP_COLOR = "#1f77b4", "#ff7f0e"
DIFFERS = "#fdae61"  # where the two first choices differ
LEFT_OUT = "#e8e8e8"  # special tokens the statistics leave out


def agreement_chart(comparison: VariantComparison) -> go.Figure:
    """Per MoE layer: first-choice agreement and top-k overlap of B with A."""
    trace = comparison.a
    fig = go.Figure()
    for name, values, color in (("first-choice agreement", comparison.first_choice_agreement, FIRST_COLOR),
                                (f"top-{trace.top_k} overlap", comparison.topk_overlap, OVERLAP_COLOR)):
        fig.add_trace(go.Bar(
            x=list(trace.layer_ids), y=values, name=name, marker_color=color,
            meta={"columns": {"x": "layer", "y": "share"}},
            hovertemplate=f"{name}<br>layer %{{x}}: %{{y:.1%}} of tokens<extra></extra>",
        ))
    fig.update_layout(
        title={"text": "How often model B routes as model A does"},
        barmode="group",
        xaxis={"title": {"text": "layer"}, "type": "category", "tickmode": "array", "tickvals": list(trace.layer_ids),
                   "ticktext": [trace.layer_label(n) for n in trace.layer_ids]},
        yaxis={"title": {"text": "share of tokens"}, "tickformat": ".0%", "range": [0, 1.02]},
        legend={"orientation": "h", "y": -0.2}, margin={"t": 50, "b": 40}, height=340,
    )
    return fig


def delta_logprob_chart(comparison: VariantComparison) -> go.Figure:
    """Bars of log p_B − log p_A of each actual next token (positions 1..T−1)."""
    fig = logprob_delta_chart(comparison.a.tokens, comparison.logprobs_a, comparison.logprobs_b)
    fig.update_layout(title={"text": "log p of each actual next token, model B minus model A (blue: B finds it likelier)"})
    return fig


def disagreement_view_html(comparison: VariantComparison, layer_id: int) -> str:
    """The text with the tokens whose first-choice expert differs between A and B at `layer_id`
    highlighted (class `moeviz-differs`, `data-position`); each span's title gives both top-k.
    Special tokens the statistics leave out are grey. Safe for `st.html`."""
    a, b = comparison.a, comparison.b
    layer = a.layer_index(layer_id)
    differs = comparison.first_choice_differs[layer]
    counted = comparison.counted

    def picks(trace) -> str:
        return ", ".join(f"{e}" for e in trace.topk_ids[layer, position])

    spans = []
    for position, token in enumerate(a.tokens):
        marked = bool(differs[position] and counted[position])
        title = f"A: experts {picks(a)} · B: experts {picks(b)}"
        classes = "moeviz-token" + (" moeviz-differs" if marked else "") + ("" if counted[position] else " moeviz-left-out")
        background = DIFFERS if marked else (LEFT_OUT if not counted[position] else "transparent")
        spans.append(
            f'<span class="{classes}" data-position="{position}" title="{html.escape(title, quote=True)}" '
            f'style="padding:1px 1px;border-radius:3px;background-color:{background}">'
            f'{token_label(token) + "<br>" * token.count(chr(10))}</span>')
    shown = int((differs & counted).sum())
    legend = (f'<span style="background-color:{DIFFERS};padding:0 4px;margin:0 4px">first choice differs</span>'
              f"{shown} of {int(counted.sum())} tokens at {html.escape(a.layer_label(layer_id))}; hover a token for "
              "both top-k")
    return (
        '<div class="moeviz-token-view" style="font-family:monospace;line-height:1.9;'
        f'white-space:pre-wrap;word-break:break-word">{"".join(spans)}</div>'
        f'<div class="moeviz-legend" style="font-size:0.8em;margin-top:0.5em">{legend}</div>'
    )

