"""Views of an intervention's effect: the text coloured by how the log-probability of each
token changed, the change per position, the routing change per layer, and the model's top
predictions before and after. Pure functions of arrays and token strings; nothing loads a model.

Colours: blue where the intervened model finds the actual token more likely, red where less
(diverging RdBu, as for signed differences); the intervened layers orange, the others grey.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from numpy.typing import ArrayLike

from moeviz.views.charts import token_label

MORE_LIKELY, LESS_LIKELY = "#2166ac", "#b2182b"  # RdBu's ends
INTERVENED_COLOR = plotly.colors.qualitative.D3[1]
OTHER_COLOR = "#7f7f7f"


def _deltas(tokens: list[str], before: ArrayLike, after: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before.shape != after.shape or before.shape != (len(tokens) - 1,):
        raise ValueError(
            f"Expected one log-probability per predicted token, {len(tokens) - 1} for {len(tokens)} tokens, before "
            f"and after; got {before.shape} and {after.shape}."
        )
    return before, after, after - before


def _tint(delta: float, scale: float) -> str:
    """RdBu-like colour for a change of `delta` nats, full strength at `scale`."""
    strength = min(abs(delta) / scale, 1.0) if scale > 0 else 0.0
    r, g, b = plotly.colors.hex_to_rgb(MORE_LIKELY if delta > 0 else LESS_LIKELY)
    return f"rgba({r},{g},{b},{0.75 * strength:.3f})"


def delta_token_view_html(tokens: list[str], before: ArrayLike, after: ArrayLike) -> str:
    """The text with each token coloured by the change in its log-probability given the tokens
    before it: blue more likely after the intervention, red less; full colour at the largest
    change. Each `<span class="moeviz-token">` carries `data-delta` (nats) and a title with
    both log-probabilities; the first token, which nothing predicts, has no colour. Token text
    is made visible and escaped by `charts.token_label`."""
    before, after, delta = _deltas(tokens, before, after)
    scale = float(np.abs(delta).max()) if delta.size else 0.0
    spans = [(f'<span class="moeviz-token moeviz-first" title="first token: nothing predicts it" '
             f'style="padding:1px 1px;color:#777777">{token_label(tokens[0])}</span>')]
    for token, b, a, d in zip(tokens[1:], before, after, delta):
        title = f"log p {b:.3f} → {a:.3f} (Δ {d:+.3f})"
        spans.append(
            f'<span class="moeviz-token" data-delta="{d:.6f}" title="{html.escape(title, quote=True)}" '
            f'style="padding:1px 1px;border-radius:3px;background-color:{_tint(d, scale)}">'
            f'{token_label(token) + "<br>" * token.count(chr(10))}</span>'
        )
    legend = (
        f'<span style="background-color:{_tint(1, 1)};padding:0 4px;margin:0 4px">more likely</span>'
        f'<span style="background-color:{_tint(-1, 1)};padding:0 4px;margin:0 4px">less likely</span>'
        f"full colour at |Δ log p| = {scale:.3f} nats"
    )
    return (
        '<div class="moeviz-token-view" style="font-family:monospace;line-height:1.9;'
        f'white-space:pre-wrap;word-break:break-word">{"".join(spans)}</div>'
        f'<div class="moeviz-legend" style="font-size:0.8em;margin-top:0.5em">{legend}</div>'
    )


def logprob_delta_chart(tokens: list[str], before: ArrayLike, after: ArrayLike) -> go.Figure:
    """Bars of Δ log p of each predicted token (positions 1..T−1), hover with the token."""
    _, _, delta = _deltas(tokens, before, after)
    fig = go.Figure(go.Bar(
        x=np.arange(1, len(tokens)), y=delta, name="Δ log p",
        marker_color=[MORE_LIKELY if d > 0 else LESS_LIKELY for d in delta],
        customdata=[token_label(t) for t in tokens[1:]],
        hovertemplate="position %{x}: %{customdata}<br>Δ log p %{y:+.3f}<extra></extra>",
    ))
    fig.update_layout(title="Change in the log-probability of each actual token", xaxis_title="position",
                      yaxis_title="Δ log p (nats)", margin={"t": 50, "b": 40}, height=320)
    return fig


def experts_changed_chart(layer_labels: list[str], shares: ArrayLike, intervened: list[str]) -> go.Figure:
    """Per MoE layer, the share of tokens whose experts changed; intervened layers in orange."""
    shares = np.asarray(shares, dtype=np.float64)
    if shares.shape != (len(layer_labels),):
        raise ValueError(f"Expected one share per layer ({len(layer_labels)}); got shape {shares.shape}.")
    fig = go.Figure(go.Bar(
        x=layer_labels, y=shares, name="tokens whose experts changed",
        marker_color=[INTERVENED_COLOR if label in intervened else OTHER_COLOR for label in layer_labels],
        hovertemplate="%{x}: %{y:.1%} of tokens<extra></extra>",
    ))
    fig.update_layout(title="Tokens whose experts changed (orange: where the intervention acts)",
                      yaxis={"title": "share of tokens", "tickformat": ".0%", "range": [0, 1]},
                      xaxis={"type": "category"}, margin={"t": 50, "b": 40}, height=320)
    return fig


def shown_continuation(text: str) -> str:
    """A generated continuation as the page shows it (in a code block): every newline marked
    ↵, so that a text of newlines is not an empty box; no newline last, which a code block drops
    (it also drops a first one)."""
    return text.replace("\n", "↵\n").removesuffix("\n")


def top_predictions_table(before: tuple[list[str], ArrayLike], after: tuple[list[str], ArrayLike]) -> pd.DataFrame:
    """The likeliest next tokens at one position, before and after, with their probabilities;
    each side given as (token strings, log-probabilities), best first. Tokens are shown as
    Python literals, so that spaces and newlines are visible (a table is text, not HTML)."""
    rows = {}
    for side, (tokens, logprobs) in (("before", before), ("after", after)):
        rows[f"{side}: token"] = [repr(t) for t in tokens]
        rows[f"{side}: p"] = [f"{p:.3f}" for p in np.exp(np.asarray(logprobs, dtype=np.float64))]
    return pd.DataFrame(rows, index=pd.RangeIndex(1, len(before[0]) + 1, name="rank"))
