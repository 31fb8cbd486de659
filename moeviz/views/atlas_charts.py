"""Figures and tables of the expert atlas (`moeviz.analysis.atlas`): an expert's card, a
layer's overview, segment consistency against chance. Pure functions of atlas results; every
figure reads back through `charts.figure_table` for its CSV download. No torch."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from moeviz.analysis.atlas import Atlas, Context, ExpertCard, LayerAtlas, SegmentConsistency
from moeviz.views.charts import coactivation_heatmap, expert_load_chart, token_label

_CHANCE_LINE = dict(color="#888888", width=1.5, dash="dash")


def _chance_line(name: str, y: float, span: tuple[float, float]) -> go.Scatter:
    return go.Scatter(x=list(span), y=[y, y], mode="lines", name=f"{name} ({y:.3g})", line=_CHANCE_LINE,
                      hovertemplate=f"{name} {y:.3f}<extra></extra>", meta=dict(reference=name, value=y))


def top_tokens_chart(card: ExpertCard, chance: float) -> go.Figure:
    """The expert's top tokens (by count), each bar the share of that token id's occurrences
    routed to the expert (OLMoE Eq. 8), against chance k/E."""
    tokens = card.top_tokens
    labels = [f"{token_label(t.token)} · {t.token_id}" for t in tokens]
    bars = go.Bar(
        x=[t.share for t in tokens], y=labels, orientation="h", name="share of the token's occurrences",
        customdata=[[t.token_id, token_label(t.token), t.count] for t in tokens],
        meta={"customdata": ["token_id", "token", "count"]},
        hovertemplate="%{customdata[1]} (id %{customdata[0]})<br>%{customdata[2]} routed here, "
                      "%{x:.1%} of its occurrences<extra></extra>",
    )
    fig = go.Figure([bars, go.Scatter(x=[chance, chance], y=[labels[0], labels[-1]] if labels else [],
                                      mode="lines", name=f"chance k/E ({chance:.3g})", line=_CHANCE_LINE,
                                      meta=dict(reference="chance k/E", value=chance))])
    fig.update_layout(
        title=dict(text=f"Expert {card.expert}: top tokens (vocabulary specialization, OLMoE Eq. 8)"),
        xaxis=dict(title=dict(text="share of the token's occurrences routed here"), range=[0, 1.02], tickformat=".0%"),
        yaxis=dict(autorange="reversed", type="category"),
        height=max(260, 28 * len(tokens) + 120),
    )
    return fig


def domain_chart(card: ExpertCard, uniform: float) -> go.Figure:
    """The expert's share of each domain's tokens (OLMoE Eq. 7), against the uniform k/E."""
    domains = list(card.domain_share)
    bars = go.Bar(x=[token_label(d) for d in domains], y=list(card.domain_share.values()), name="domain share",
                  hovertemplate="%{x}: %{y:.1%} of its tokens<extra></extra>")
    fig = go.Figure([bars, _chance_line("uniform k/E", uniform, (-0.5, len(domains) - 0.5))])
    fig.update_layout(
        title=dict(text=f"Expert {card.expert}: share of each domain's tokens (domain specialization, OLMoE Eq. 7)"),
        xaxis=dict(title=dict(text="domain"), type="category"),
        yaxis=dict(title=dict(text="share of the domain's tokens"), tickformat=".0%", rangemode="tozero"),
    )
    return fig


def partners_chart(card: ExpertCard, top: int = 10) -> go.Figure:
    """The experts most often chosen with this one (OLMoE Eq. 6: together / this one fires)."""
    partners = card.partners[:top]
    bars = go.Bar(x=[f"expert {e}" for e, _ in partners], y=[share for _, share in partners], name="co-activation",
                  hovertemplate="%{x}: with expert " + str(card.expert) + " on %{y:.1%} of its tokens<extra></extra>")
    fig = go.Figure([bars])
    fig.update_layout(
        title=dict(text=f"Expert {card.expert}: co-activation partners (OLMoE Eq. 6)"),
        xaxis=dict(type="category"),
        yaxis=dict(title=dict(text=f"share of expert {card.expert}'s tokens"), tickformat=".0%", range=[0, 1.02]),
    )
    return fig


def layer_load_chart(layer: LayerAtlas) -> go.Figure:
    """Each expert's share of the layer's top-k assignments, against the uniform 1/E."""
    experts = len(layer.counts)
    shares = np.array([card.load_share for card in layer.experts])
    return expert_load_chart(shares, 1 / experts, title=f"{layer.label}: share of the top-k assignments")


def coactivation_chart(layer: LayerAtlas) -> go.Figure:
    """Eq. 6 as a heatmap: row e, column f = share of e's tokens that also chose f."""
    fig = coactivation_heatmap(np.round(layer.coactivation, 4))
    fig.update_traces(colorbar=dict(title=dict(text="share of row's tokens", side="right")),
                      hovertemplate="expert %{y} fires: expert %{x} too on %{z:.1%}<extra></extra>")
    fig.update_layout(title=dict(text=f"{layer.label}: co-activation (OLMoE Eq. 6, rows: the expert that fires)"))
    return fig


def segment_chart(segments: SegmentConsistency, layer_labels: list[str], metric: str) -> go.Figure:
    """SRP or SCH (`metric`: "srp" or "sch") against segment length n, one line per layer,
    and the chance level of uniform independent routing dashed."""
    values, chance = getattr(segments, metric), getattr(segments, f"{metric}_chance")
    lengths = list(segments.lengths)
    traces = [go.Scatter(x=lengths, y=[None if np.isnan(v) else float(v) for v in values[i]], mode="lines+markers",
                         name=token_label(label), hovertemplate="%{fullData.name}, n = %{x}: %{y:.3f}<extra></extra>")
              for i, label in enumerate(layer_labels)]
    traces.append(go.Scatter(x=lengths, y=[float(v) for v in chance], mode="lines", name="chance", line=_CHANCE_LINE,
                             hovertemplate="chance, n = %{x}: %{y:.3f}<extra></extra>", meta=dict(reference="chance")))
    title = ("Segment routing best performance (SRP)" if metric == "srp"
             else f"Segment cache best hit rate (SCH), cache of {segments.cache_size} experts")
    fig = go.Figure(traces)
    fig.update_layout(
        title=dict(text=title, subtitle=dict(text="arXiv 2505.16056; higher: a segment keeps to fewer experts")),
        xaxis=dict(title=dict(text="segment length n (tokens)"), type="log", tickvals=lengths, ticktext=[str(n) for n in lengths]),
        yaxis=dict(title=dict(text=metric.upper()), range=[0, 1.02]),
    )
    return fig


def layer_table(atlas: Atlas) -> pd.DataFrame:
    """One row per MoE layer: MaxVio, CV, Jain's index, tokens per expert, dead experts."""
    rows = []
    for layer in atlas.layers:
        spread = layer.tokens_per_expert
        rows.append({"layer": layer.label, "tokens": layer.tokens, "MaxVio": layer.maxvio, "CV": layer.cv,
                     "Jain": layer.jain, "min": spread["min"], "median": spread["median"], "p95": spread["p95"],
                     "max": spread["max"], "dead experts": ", ".join(map(str, layer.dead_experts)) or "none"})
    return pd.DataFrame(rows)


def expert_table(layer: LayerAtlas, uniform: float, top: int = 5) -> pd.DataFrame:
    """One row per expert of a layer: load, its top tokens, its strongest domain and entropies."""
    rows = []
    for card in layer.experts:
        best = max(card.domain_share, key=card.domain_share.get) if card.domain_share else ""
        rows.append({
            "expert": card.expert, "load share": card.load_share, "× uniform": card.load_share * len(layer.experts),
            "top tokens": " ".join(repr(t.token) for t in card.top_tokens[:top]),
            "top token share": card.top_tokens[0].share if card.top_tokens else 0.0,
            "top domain": best, "domain share": card.domain_share.get(best, 0.0),
            "domain share × uniform": card.domain_share.get(best, 0.0) / uniform if uniform else 0.0,
            "domain entropy (0 specialist, 1 generalist)": card.domain_entropy,
            "token entropy / layer's": card.token_entropy / layer.vocabulary_entropy if layer.vocabulary_entropy else 0.0,
        })
    return pd.DataFrame(rows)


def context_html(context: Context) -> str:
    """A max-activating example: the tokens around it, the token itself highlighted. Token text
    is escaped; newlines show as ↵."""
    spans = []
    for i, token in enumerate(context.tokens):
        text = html.escape(token.replace("\n", "↵"), quote=False)
        if i == context.focus:
            spans.append(f'<mark class="moeviz-focus" style="background:#ffd54f;padding:0 2px">{text}</mark>')
        else:
            spans.append(f"<span>{text}</span>")
    return (f'<div class="moeviz-context" style="font-family:monospace;white-space:pre-wrap">{"".join(spans)}'
            f'<small style="color:#888"> — {html.escape(context.doc)}, token {context.position}, '
            f"score {context.score:.3f}</small></div>")
