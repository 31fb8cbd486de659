"""Charts: pure functions from a `RoutingTrace` (or metric arrays) to a Plotly figure.

Nothing here loads a model. Every chart stays legible from 4 to 256 experts: experts sit on a
numeric axis with sparse ticks and hover text instead of one legend entry each, and an
expert has the same colour in every chart (`expert_colors`). Token text reaches Plotly only
through `token_label` and HTML only through `token_view_html`, both escaped, because Plotly
reads `<br>`, `<b>`, ... in labels and a prompt may contain `<script>`.

The token view follows Fig. 8 of the Mixtral paper (Jiang et al., 2024, arXiv:2401.04088);
`load_comparison_chart` follows its Fig. 7.
"""

from __future__ import annotations

import colorsys
import html
import math
import re

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go

from moeviz.trace import IDS_ONLY, IdsOnlyError, RoutingTrace

MAX_TOKEN_TICKS = 80  # beyond this many tokens, tick labels overlap: positions + hover instead
_TICK_CHARS = 12  # longer token labels are cut in ticks (hover keeps them whole)
_ALL_TICKS_UP_TO = 32  # label every expert (or layer) on an axis up to this many
_SERIES_COLORS = plotly.colors.qualitative.D3  # prompts, domains, layers: not experts
_UNIFORM_LINE = dict(color="#555555", dash="dash", width=1.5)
_MAX_SWATCHES = 16  # the token view's legend names at most this many experts, the most used
_LEFT_OUT_GREY = "#e8e8e8"  # special tokens the statistics leave out, in the token view
_GENERATED_STYLE = ";text-decoration:underline;text-decoration-thickness:2px;font-style:italic"


# -- colours and labels ------------------------------------------------------------------


def expert_colors(num_experts: int) -> list[str]:
    """One "#rrggbb" colour per expert, the same in every chart of a model.

    Up to 10 experts: Plotly's qualitative palette; up to 24: Dark24. Beyond that, evenly
    spaced hues visited with a stride near the golden ratio, so experts i and i+1 lie far
    apart on the colour wheel, and lightness cycles through three levels.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be at least 1, got {num_experts}")
    if num_experts <= 10:
        return [c.lower() for c in plotly.colors.qualitative.Plotly[:num_experts]]
    if num_experts <= 24:
        return [c.lower() for c in plotly.colors.qualitative.Dark24[:num_experts]]
    stride = _coprime_near(num_experts, round(num_experts * 0.381966))
    colors = []
    for expert in range(num_experts):
        hue = (expert * stride % num_experts) / num_experts
        lightness = (0.42, 0.58, 0.32)[expert % 3]
        r, g, b = colorsys.hls_to_rgb(hue, lightness, 0.75)
        colors.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return colors


def _coprime_near(n: int, guess: int) -> int:
    """The integer nearest `guess` that shares no factor with `n`: stepping by it visits
    every residue mod n exactly once, so every expert gets its own hue."""
    for offset in range(n):
        for candidate in (guess - offset, guess + offset):
            if 0 < candidate < n and math.gcd(candidate, n) == 1:
                return candidate
    return 1


def _visible_chars(token: str) -> list[str]:
    """Each character of `token` as something a person can see: newline ↵, tab →, spaces
    of a whitespace-only token ␣, other invisible characters as Python escapes (\\x00,
    \\r, \\u200b, lone surrogates from partial UTF-8 as \\udc80). One entry per character."""
    whitespace_only = token.isspace()
    out = []
    for ch in token:
        if ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("→")
        elif ch == " ":
            out.append("␣" if whitespace_only else " ")
        elif not ch.isprintable():
            out.append(repr(ch)[1:-1])
        else:
            out.append(ch)
    return out


_EMPTY_TOKEN = "∅"  # an empty token would be an invisible, unhoverable label
_BYTE_ESCAPE = re.compile(r"\\x([89a-f][0-9a-f])")  # a byte of partial UTF-8, as moeviz.model.tokens writes it
_MAX_PIECES = 8  # byte-level pieces that may form characters together (a UTF-8 character has at most 4 bytes)


def character_runs(trace: RoutingTrace) -> list[tuple[int, int, str | None]]:
    """The tokens grouped as people read the text: (first, end, characters) for each run of
    byte-level pieces that together form whole characters (Chinese, emoji split over tokens,
    each shown alone as `\\xNN` bytes), and (i, i + 1, None) for every other token.

    A run is kept only where its decoded characters are the text its tokens' offsets span, so
    a text that literally contains "\\xe4" is never mistaken for a byte.
    """
    runs, i = [], 0
    while i < trace.num_tokens:
        end, characters = _character_run(trace, i)
        runs.append((i, end, characters))
        i = end
    return runs


def _character_run(trace: RoutingTrace, first: int) -> tuple[int, str | None]:
    if not _BYTE_ESCAPE.search(trace.tokens[first]):
        return first + 1, None
    data = b""
    for end in range(first, min(first + _MAX_PIECES, trace.num_tokens)):
        data += _token_bytes(trace.tokens[end])
        try:
            characters = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        start, stop = trace.offsets[first][0], trace.offsets[end][1]
        return (end + 1, characters) if end > first and trace.text[start:stop] == characters else (first + 1, None)
    return first + 1, None


def _token_bytes(token: str) -> bytes:
    """The UTF-8 bytes a token stands for, its `\\xNN` escapes read back as bytes."""
    parts = _BYTE_ESCAPE.split(token)  # text, hex, text, hex, ..., text
    return b"".join(bytes([int(part, 16)]) if n % 2 else part.encode("utf-8") for n, part in enumerate(parts))




def _plotly_escape(text: str) -> str:
    """`<`, `>` and `&` as entities, which Plotly shows as the characters; `$` too, since
    Plotly typesets `$...$` as LaTeX wherever MathJax is loaded (e.g. in Jupyter)."""
    return html.escape(text, quote=False).replace("$", "&#36;")


def token_label(token: str) -> str:
    """`token` made visible and safe for any Plotly label or hover text."""
    return _plotly_escape("".join(_visible_chars(token)) or _EMPTY_TOKEN)


def _tick_label(token: str) -> str:
    visible = "".join(_visible_chars(token)) or _EMPTY_TOKEN
    if len(visible) > _TICK_CHARS:
        visible = visible[: _TICK_CHARS - 1] + "…"
    return _plotly_escape(visible)


def _text_color(background: str) -> str:
    """Black or white, whichever reads better on `background` (WCAG relative luminance)."""
    channels = [int(background[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return "#000000" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.179 else "#ffffff"


def _rgba(color: str, alpha: float) -> str:
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _series_color(index: int) -> str:
    return _SERIES_COLORS[index % len(_SERIES_COLORS)]


def expert_axis(num_experts: int) -> dict:
    """A numeric expert axis: every tick for few experts, Plotly's sparse ticks for many."""
    axis = dict(title=dict(text="expert"), zeroline=False)
    if num_experts <= _ALL_TICKS_UP_TO:
        axis.update(tickmode="linear", tick0=0, dtick=1)
    return axis


SCORE_NAMES = {"softmax": "router probability", "probabilities": "router probability",
               "sigmoid": "router score (sigmoid)", "sqrtsoftplus": "router score (sqrt softplus)",
               "unknown": "raw router logit (scoring unknown)"}


def _score_name(trace: RoutingTrace) -> str:
    return SCORE_NAMES[trace.scoring]


def shared_experts_note(shared_experts: int) -> str:
    """What to say about experts every token uses besides its routed top-k; "" for none."""
    if not shared_experts:
        return ""
    return f"+ {shared_experts} shared expert{'' if shared_experts == 1 else 's'}, always active (not routed)"


# -- one layer of one trace ----------------------------------------------------------------


def probability_heatmap(trace: RoutingTrace, layer_id: int) -> go.Figure:
    """Router scores of one layer: z float[experts, tokens], with every top-k pick marked;
    the raw logits, named so, when the trace's scoring is unknown.

    Trace 0 is the heatmap (y = expert, x = token position, customdata = token label);
    trace 1 marks each (token, expert) the model actually used, hover giving its weight.
    Raises IdsOnlyError for a trace of expert ids only (from a serving engine).
    """
    if not (trace.has_logits and trace.has_weights):
        raise IdsOnlyError(IDS_ONLY)
    layer = trace.layer_index(layer_id)
    num_experts, num_tokens, k = trace.num_experts, trace.num_tokens, trace.top_k
    positions = np.arange(num_tokens)
    labels = np.array([token_label(t) for t in trace.tokens], dtype=object)
    score = _score_name(trace)
    tick_labels = num_tokens <= MAX_TOKEN_TICKS
    # Under token tick labels Plotly's %{x} shows the cut tick text, so only name positions without.
    position = "" if tick_labels else "token %{x}: "

    heatmap = go.Heatmap(
        z=(trace.router_logits if trace.scoring == "unknown" else trace.router_probs)[layer].T,  # [experts, tokens]
        x=positions,
        y=np.arange(num_experts),
        customdata=np.tile(labels, (num_experts, 1)),
        colorscale="Blues",
        colorbar=dict(title=dict(text=score, side="right")),
        name=score,
        meta=dict(customdata=["token"], columns=dict(x="position", y="expert", z=_column_name(score))),
        hovertemplate=position + "%{customdata}<br>expert %{y}<br>" + score + " %{z:.3f}<extra></extra>",
    )

    ids = trace.topk_ids[layer].reshape(-1)  # token-major: token 0's k picks, then token 1's
    picks_data = np.empty((num_tokens * k, 3), dtype=object)
    picks_data[:, 0] = np.repeat(labels, k)
    picks_data[:, 1] = np.tile(np.arange(1, k + 1), num_tokens)
    picks_data[:, 2] = trace.topk_weights[layer].reshape(-1).astype(float)
    colors = expert_colors(num_experts)
    picks = go.Scatter(
        x=np.repeat(positions, k),
        y=ids,
        mode="markers",
        name="top-k picks",
        marker=dict(
            color=[colors[e] for e in ids],
            size=7 if num_experts <= 64 else 5,
            line=dict(color="white", width=1),
        ),
        customdata=picks_data,
        meta=dict(customdata=["token", "choice", "weight"], columns=dict(x="position", y="expert")),
        hovertemplate=position + "%{customdata[0]}<br>expert %{y} (choice %{customdata[1]})"
        "<br>weight %{customdata[2]:.3f}<extra></extra>",
    )

    xaxis = dict(title=dict(text="token"), zeroline=False, range=[-0.5, num_tokens - 0.5])
    if tick_labels:
        ticktext = [_tick_label(t) for t in trace.tokens]
        xaxis.update(tickmode="array", tickvals=positions, ticktext=ticktext, tickangle=-60)
    fig = go.Figure([heatmap, picks])
    fig.update_layout(
        title=dict(text=f"Router scores, {trace.layer_label(layer_id)}",
                   subtitle=dict(text=shared_experts_note(trace.shared_experts))),
        xaxis=xaxis,
        yaxis=dict(expert_axis(num_experts), range=[num_experts - 0.5, -0.5]),  # expert 0 on top
        height=min(900, 360 + 8 * num_experts),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
        meta=dict(layer=layer_id, layer_label=trace.layer_label(layer_id), tokens=list(trace.tokens)),  # for the CSV
    )
    if trace.generated:
        fig.add_vline(x=trace.generated_from - 0.5, line=dict(color="#d62728", dash="dot", width=2),
                      annotation_text="generated →", annotation_position="top right")
    return fig


def token_view_html(trace: RoutingTrace, layer_id: int, left_out=None) -> str:
    """The text coloured by each token's first-choice expert (Mixtral paper, Fig. 8).

    One `<span class="moeviz-token">` per token; its `title` lists the top-k experts with
    weights (ids alone for a trace without weights). Tokens that `left_out` bool[tokens]
    marks (special tokens the statistics leave out) are grey, class `moeviz-left-out`, and
    the legend counts the others only. All text is escaped, so the result is safe for `st.html`.
    """
    layer = trace.layer_index(layer_id)
    colors = expert_colors(trace.num_experts)
    ids = trace.topk_ids[layer]
    weights = trace.topk_weights[layer] if trace.has_weights else [None] * trace.num_tokens
    left_out = np.zeros(trace.num_tokens, dtype=bool) if left_out is None else np.asarray(left_out, dtype=bool)
    if left_out.shape != (trace.num_tokens,):
        raise ValueError(f"left_out has shape {left_out.shape}; expected one flag per token ({trace.num_tokens},)")

    def routing(position: int) -> str:
        if weights[position] is None:
            return " · ".join(f"expert {e}" for e in ids[position])
        return " · ".join(f"expert {e}: {w:.2f}" for e, w in zip(ids[position], weights[position]))

    def background(position: int) -> str:
        return _LEFT_OUT_GREY if left_out[position] else colors[ids[position][0]]

    spans = []
    for first, end, characters in character_runs(trace):
        positions = range(first, end)
        if characters is None:
            title = ("special token, left out of the statistics · " if left_out[first] else "") + routing(first)
            text = trace.tokens[first]
        else:  # byte-level pieces drawn as the characters they form; the tooltip lists each piece
            title = f"{''.join(_visible_chars(characters))} from {end - first} byte-level tokens:\n" + "\n".join(
                f"{trace.tokens[p]} → {routing(p)}" for p in positions)
            text = characters
        shown = "".join(
            html.escape(visible, quote=True) + ("<br>" if ch == "\n" else "")
            for ch, visible in zip(text, _visible_chars(text))
        ) or _EMPTY_TOKEN
        shown = shown.replace("$", "&#36;")  # st.markdown would typeset $...$ as LaTeX
        grey = any(left_out[p] for p in positions)
        generated = trace.generated and end > trace.generated_from
        classes = ("moeviz-token" + (" moeviz-pieces" if characters is not None else "")
                   + (" moeviz-generated" if generated else "") + (" moeviz-left-out" if grey else ""))
        spans.append(
            f'<span class="{classes}" data-positions="{first}-{end - 1}" '
            f'title="{html.escape(title, quote=True)}" '
            f'style="background-color:{background(first)};{_stripes([background(p) for p in positions])}'
            f'color:{"#666666" if grey else _text_color(background(first))};'
            f'padding:1px 1px;border-radius:3px{_GENERATED_STYLE if generated else ""}">{shown}</span>'
        )

    first, counts = np.unique(trace.first_choice[layer][~left_out], return_counts=True)
    shown = np.sort(np.argsort(-counts, kind="stable")[:_MAX_SWATCHES])  # the most used, in expert order
    swatch = "padding:0 4px;margin:0 4px 2px 0;border-radius:3px;display:inline-block"
    swatches = [
        f'<span class="moeviz-swatch" title="{count} token{"" if count == 1 else "s"}" '
        f'style="background-color:{colors[e]};color:{_text_color(colors[e])};{swatch}">expert {e}</span>'
        for e, count in zip(first[shown], counts[shown])
    ]
    if len(first) > len(shown):
        swatches.append(f"… {len(first) - len(shown)} more experts (hover over a token)")
    if trace.shared_experts:
        swatches.append(
            f'<span class="moeviz-shared" style="background-color:#dddddd;color:#000000;{swatch}">'
            f"shared ×{trace.shared_experts}, always active</span>"
        )
    notes = [" · <i>underlined: generated by the model</i>"] if trace.generated else []
    if left_out.any():
        notes.append(" · <i>grey: special tokens, left out of the statistics</i>")
    return (
        '<div class="moeviz-token-view" style="font-family:monospace;line-height:1.9;'
        f'white-space:pre-wrap;word-break:break-word">{"".join(spans)}</div>'
        '<div class="moeviz-legend" style="font-size:0.8em;margin-top:0.5em">'
        f'first choice, {trace.layer_label(layer_id)}: {"".join(swatches)}{"".join(notes)}</div>'
    )


def _stripes(backgrounds: list[str]) -> str:
    """One vertical stripe per token's colour where the tokens of one character disagree."""
    if len(set(backgrounds)) == 1:
        return ""
    width = 100 / len(backgrounds)
    stops = ",".join(f"{c} {i * width:.1f}% {(i + 1) * width:.1f}%" for i, c in enumerate(backgrounds))
    return f"background-image:linear-gradient(90deg,{stops});"


# -- expert load ---------------------------------------------------------------------------


def _uniform_line(uniform: float, num_experts: int) -> go.Scatter:
    """The load every expert would carry under perfect balance, across the whole bar axis."""
    return go.Scatter(
        x=[-0.5, num_experts - 0.5],
        y=[uniform, uniform],
        mode="lines",
        name=f"uniform ({uniform:.3g})",
        line=_UNIFORM_LINE,
        hovertemplate=f"uniform {uniform:.3f}<extra></extra>",
        meta=dict(helper=True),  # a reference line, not data: left out of the CSV
    )


def _as_load(load, name: str = "load") -> np.ndarray:
    load = np.asarray(load, dtype=float)
    if load.ndim != 1 or load.size == 0:
        raise ValueError(f"{name} must be float[experts] with at least one expert, got shape {load.shape}")
    return load


def _load_layout(fig: go.Figure, num_experts: int, title: str, shared_experts: int = 0) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, subtitle=dict(text=shared_experts_note(shared_experts))),
        xaxis=dict(expert_axis(num_experts), range=[-0.5, num_experts - 0.5]),
        yaxis=dict(title=dict(text="expert load"), rangemode="tozero"),
        bargap=0.15 if num_experts <= 64 else 0.05,
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
    )
    return fig


def expert_load_chart(load, uniform: float, title: str = "Expert load", shared_experts: int = 0) -> go.Figure:
    """One bar per expert (load: float[experts]) and a dashed line at the uniform load; a
    subtitle names the `shared_experts` that every token also uses."""
    load = _as_load(load)
    num_experts = load.size
    bars = go.Bar(
        x=np.arange(num_experts),
        y=load,
        name="load",
        marker=dict(color=expert_colors(num_experts)),
        showlegend=False,
        hovertemplate="expert %{x}<br>load %{y:.3f}<extra></extra>",
    )
    return _load_layout(go.Figure([bars, _uniform_line(uniform, num_experts)]), num_experts, title, shared_experts)


def load_comparison_chart(loads: dict[str, np.ndarray], uniform: float, title: str = "Expert load compared") -> go.Figure:
    """Grouped bars of expert load, one trace per label (prompt, domain or layer), as in
    the Mixtral paper's Fig. 7. loads: {label: float[experts]}; `title` says what was counted."""
    if not loads:
        raise ValueError("loads is empty: pass at least one {label: float[experts]} entry")
    arrays = {label: _as_load(load, f"load of {label!r}") for label, load in loads.items()}
    sizes = {label: a.size for label, a in arrays.items()}
    num_experts = next(iter(sizes.values()))
    if len(set(sizes.values())) > 1:
        raise ValueError(f"every load needs the same number of experts, got {sizes}")
    bars = [
        go.Bar(
            x=np.arange(num_experts),
            y=load,
            name=token_label(label),
            marker=dict(color=_series_color(i)),
            hovertemplate="%{fullData.name}<br>expert %{x}<br>load %{y:.3f}<extra></extra>",
        )
        for i, (label, load) in enumerate(arrays.items())
    ]
    fig = go.Figure([*bars, _uniform_line(uniform, num_experts)])
    fig.update_layout(barmode="group")
    return _load_layout(fig, num_experts, title)


def layer_load_heatmap(trace: RoutingTrace, load, uniform: float) -> go.Figure:
    """Expert load of every layer, load: float[moe layers, experts].

    Rows are all layers 0..num_layers-1 so layer numbers stay true; dense layers (no
    router) are empty rows labelled "layer N (dense)" ("enc N (dense)", "dec N" in an
    encoder-decoder model). The diverging scale runs from blue at 0 (an unused expert)
    through white at `uniform` to red at the highest load. A subtitle names shared experts.
    """
    if not uniform > 0:
        raise ValueError(f"uniform must be a positive load, got {uniform}")
    load = np.asarray(load, dtype=float)
    expected = (len(trace.layer_ids), trace.num_experts)
    if load.shape != expected:
        raise ValueError(
            f"load has shape {load.shape}, expected [moe layers, experts] = {expected} "
            f"for MoE layers {trace.layer_ids}"
        )
    outside = [n for n in trace.layer_ids if not 0 <= n < trace.num_layers]
    if outside:
        raise ValueError(f"layer ids {outside} lie outside the model's {trace.num_layers} layers")
    z = np.full((trace.num_layers, trace.num_experts), np.nan)
    z[trace.layer_ids] = load
    moe = set(trace.layer_ids)
    labels = [trace.layer_label(n) + ("" if n in moe else " (dense)") for n in range(trace.num_layers)]
    # Not `zmid`: that makes the scale symmetric around uniform and shows negative loads.
    top = max(float(np.nanmax(load)) if load.size else 0.0, 2 * uniform)
    mid = uniform / top
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=np.arange(trace.num_experts),
            y=labels,
            colorscale=[
                [0.0, "#2166ac"], [mid / 2, "#92c5de"], [mid, "#f7f7f7"],
                [(1 + mid) / 2, "#f4a582"], [1.0, "#b2182b"],
            ],
            zmin=0,
            zmax=top,
            hoverongaps=False,
            name="expert load",
            meta=dict(columns=dict(x="expert", y="layer_label", z="load")),
            colorbar=dict(title=dict(text=f"load (uniform {uniform:.3g})", side="right")),
            hovertemplate="%{y}<br>expert %{x}<br>load %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=dict(text="Expert load by layer", subtitle=dict(text=shared_experts_note(trace.shared_experts))),
        xaxis=expert_axis(trace.num_experts),
        yaxis=dict(title=dict(text="layer"), autorange="reversed", type="category"),
        height=min(1200, 260 + 20 * trace.num_layers),
    )
    return fig


# -- across layers ---------------------------------------------------------------------


def repeat_rate_chart(
    layer_ids: list[int], rates: dict[str, np.ndarray], chance: dict[str, np.ndarray],
    layer_labels: list[str] | None = None,
) -> go.Figure:
    """Share of adjacent tokens routed to the same expert, per layer (Mixtral paper,
    Table 5), each series with its chance level as a dashed line of the same colour; when
    every series has the same chance level (the same rate of several texts), one grey
    dashed "chance" line.

    rates, chance: {series name: float[layers]} with the same keys. layer_labels name the
    layers on the axis (`RoutingTrace.layer_label`: "enc 1", "dec 3"); default their ids.
    """
    if not rates:
        raise ValueError("rates is empty: pass at least one {name: float[layers]} series")
    if set(rates) != set(chance):
        raise ValueError(f"rates and chance need the same series, got {list(rates)} and {list(chance)}")
    x = list(layer_ids)
    if layer_labels is not None and len(layer_labels) != len(x):
        raise ValueError(f"{len(layer_labels)} layer labels for {len(x)} layers {x}")
    hover_layers = [_plotly_escape(label) for label in layer_labels] if layer_labels else [f"layer {n}" for n in x]

    def line(name, values, style, mode, meta=None):
        values = np.asarray(values, dtype=float)
        if values.shape != (len(x),):
            raise ValueError(f"{name} has {values.size} values for {len(x)} layers {x}")
        return go.Scatter(x=x, y=values, mode=mode, name=token_label(name), line=style, customdata=hover_layers,
                          hovertemplate="%{fullData.name}<br>%{customdata}: %{y:.1%}<extra></extra>", meta=meta)

    chances = [np.asarray(chance[name], dtype=float) for name in rates]
    one_chance = len(rates) > 1 and all(c.shape == chances[0].shape and np.array_equal(c, chances[0]) for c in chances)
    traces = []
    for i, name in enumerate(rates):
        color = _series_color(i)
        traces.append(line(name, rates[name], dict(color=color, width=2), "lines+markers"))
        if not one_chance:
            traces.append(line(name + " (chance)", chance[name], dict(color=color, width=1.5, dash="dash"), "lines",
                               meta=dict(reference="chance", of=token_label(name))))
    if one_chance:
        traces.append(line("chance", chances[0], _UNIFORM_LINE, "lines", meta=dict(reference="chance")))
    xaxis = dict(title=dict(text="layer"))
    if len(x) <= _ALL_TICKS_UP_TO:
        xaxis.update(tickmode="array", tickvals=x)  # true layer numbers, gaps where layers are dense
        if layer_labels is not None:
            xaxis.update(ticktext=[_plotly_escape(label) for label in layer_labels])
    fig = go.Figure(traces)
    fig.update_layout(
        title=dict(text="Same expert for adjacent tokens"),
        xaxis=xaxis,
        yaxis=dict(title=dict(text="repeat rate"), tickformat=".0%", rangemode="tozero"),
    )
    return fig


def coactivation_heatmap(matrix) -> go.Figure:
    """How often two experts are picked for the same token: matrix int[experts, experts]."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square [experts, experts], got shape {matrix.shape}")
    num_experts = matrix.shape[0]
    off_diagonal = matrix[~np.eye(num_experts, dtype=bool)]
    # The diagonal (an expert with itself) would otherwise set the scale and wash out every pair.
    top = off_diagonal.max() if off_diagonal.size and off_diagonal.max() > 0 else max(matrix.max(), 1)
    fig = go.Figure(
        go.Heatmap(
            z=matrix,
            x=np.arange(num_experts),
            y=np.arange(num_experts),
            colorscale="Blues",
            zmin=0,
            zmax=float(top),
            name="co-activation",
            meta=dict(columns=dict(x="expert", y="with_expert", z="tokens")),
            colorbar=dict(title=dict(text="tokens", side="right")),
            hovertemplate="expert %{y} with expert %{x}<br>%{z} tokens<extra></extra>",
        )
    )
    fig.update_layout(
        title=dict(text="Experts chosen together"),
        xaxis=expert_axis(num_experts),
        yaxis=dict(expert_axis(num_experts), autorange="reversed", scaleanchor="x"),
    )
    return fig


def _layer_tag(trace: RoutingTrace, layer_id: int) -> str:
    """A short layer name for dense labels: "L3", or "enc 1" / "dec 3"."""
    return trace.layer_label(layer_id) if trace.encoder_layers else f"L{layer_id}"


def transition_sankey(trace: RoutingTrace, layer_ids: list[int]) -> go.Figure:
    """Where tokens' first choices go from one layer to the next, as a Sankey diagram.

    Nodes "L{layer} e{expert}" ("enc 1 e{expert}", "dec 3 e{expert}" in an encoder-decoder
    model) exist only for experts used as first choice at that layer; a link from "L{a} e{i}"
    to "L{b} e{j}" counts tokens whose first choice is i at layer a and j at layer b, for
    consecutive entries a, b of `layer_ids`.
    """
    layer_ids = list(layer_ids)
    if len(layer_ids) < 2:
        raise ValueError(f"a transition needs at least two layers, got {layer_ids}")
    if len(set(layer_ids)) != len(layer_ids):
        raise ValueError(f"each layer may appear once, got {layer_ids}")
    num_experts = trace.num_experts
    first = trace.first_choice[[trace.layer_index(n) for n in layer_ids]].astype(np.int64)

    node_index: dict[tuple[int, int], int] = {}
    for column, layer_id in enumerate(layer_ids):
        for expert in np.unique(first[column]):
            node_index[(layer_id, int(expert))] = len(node_index)

    sources, targets, values = [], [], []
    for column in range(len(layer_ids) - 1):
        pairs = first[column] * num_experts + first[column + 1]
        codes, counts = np.unique(pairs, return_counts=True)
        for code, count in zip(codes, counts):
            a, b = divmod(int(code), num_experts)
            sources.append(node_index[(layer_ids[column], a)])
            targets.append(node_index[(layer_ids[column + 1], b)])
            values.append(int(count))

    colors = expert_colors(num_experts)
    nodes = list(node_index)
    node_experts = [expert for _, expert in nodes]
    fig = go.Figure(
        go.Sankey(
            node=dict(
                label=[f"{_layer_tag(trace, layer)} e{expert}" for layer, expert in nodes],
                color=[colors[e] for e in node_experts],
                pad=4 if num_experts > 32 else 10,
                hovertemplate="%{label}<br>%{value} tokens<extra></extra>",
            ),
            link=dict(
                source=sources,
                target=targets,
                value=values,
                color=[_rgba(colors[node_experts[s]], 0.35) for s in sources],
                hovertemplate="%{source.label} → %{target.label}<br>%{value} tokens<extra></extra>",
            ),
        )
    )
    fig.update_layout(title=dict(text="First-choice expert from layer to layer"))
    return fig


# -- across prompts ----------------------------------------------------------------------


def js_matrix_heatmap(labels: list[str], matrix,
                      title: str = "Jensen–Shannon divergence between expert loads (bits)") -> go.Figure:
    """Jensen-Shannon divergence between the expert-load distributions of texts or domains:
    matrix float[n, n], labels one per load; each cell shows its value."""
    matrix = np.asarray(matrix, dtype=float)
    n = len(labels)
    if matrix.shape != (n, n):
        raise ValueError(f"matrix has shape {matrix.shape} but there are {n} labels; expected ({n}, {n})")
    shown = [token_label(label) for label in labels]
    if len(set(shown)) != n:
        raise ValueError(f"labels must be distinct, got {list(labels)}")
    fig = go.Figure(
        go.Heatmap(
            z=matrix,
            x=shown,
            y=shown,
            colorscale="Purples",
            zmin=0,
            texttemplate="%{z:.3f}",
            name="JS divergence",
            meta=dict(columns=dict(x="label", y="other_label", z="js_divergence_bits")),
            colorbar=dict(title=dict(text="JS divergence (bits)", side="right")),
            hovertemplate="%{y}<br>%{x}<br>JS divergence %{z:.4f} bits<extra></extra>",
        )
    )
    fig.update_layout(
        title=dict(text=title),
        xaxis=dict(type="category"),
        yaxis=dict(type="category", autorange="reversed"),
    )
    return fig


# -- data behind a figure -------------------------------------------------------------------


ID_COLUMNS = ("position", "token_id", "expert", "with_expert", "layer", "choice", "rank")


def figure_table(fig: go.Figure) -> pd.DataFrame:
    """The data behind a figure, one row per plotted point, for a CSV download.

    Columns are named from the data: a trace's `meta["columns"]` ({"x": "position", ...}), else
    its axis (or colour bar) title, then any named customdata (token, choice, weight); ids are
    integers. Helper traces (`meta["helper"]`, e.g. the uniform-load line) are left out; a
    reference line (`meta["reference"]`, e.g. chance) is a column of its series' rows; and a
    "series" column names the traces when there are several. A figure whose `layout.meta` holds
    "layer"/"layer_label" gets those columns; one holding "tokens" (the trace's raw token texts)
    gets its token column in raw text, not display glyphs. A Sankey gives source, target, value.
    """
    shown = [trace for trace in fig.data if not _meta(trace).get("helper")]
    series = [trace for trace in shown if not _meta(trace).get("reference")]
    frames = [_trace_table(fig, trace) for trace in series]
    if not frames:
        return pd.DataFrame()
    for frame, trace in zip(frames, series):
        _join_references(fig, frame, trace, [t for t in shown if _meta(t).get("reference")])
    if len(frames) > 1 and "source" not in frames[0]:
        for frame, trace in zip(frames, series):
            frame.insert(0, "series", _plain_text(trace.name or trace.type))
    table = pd.concat(frames, ignore_index=True)
    figure = fig.layout.meta if isinstance(fig.layout.meta, dict) else {}
    if "tokens" in figure and "position" in table and "token" in table:
        raw = np.asarray(figure["tokens"], dtype=object)
        table["token"] = raw[table["position"].astype(int).to_numpy()]
    for name in ("layer_label", "layer"):
        if name in figure:
            table.insert(0, name, figure[name])
    # Nullable integers stay whole where other traces leave gaps (choice 1, not 1.0).
    return table.astype({c: "Int64" for c in table if c in ID_COLUMNS and _integral(table[c])})


def _join_references(fig: go.Figure, frame: pd.DataFrame, trace, references: list) -> None:
    """A reference line (`meta["reference"]`: its column name, e.g. "chance"; `meta["of"]`: the
    series it belongs to, else every series) becomes a column of its series' rows, matched by x,
    or one constant (`meta["value"]`) for a level drawn across the chart."""
    x = _column_names(fig, trace)["x"]
    for reference in references:
        meta = _meta(reference)
        if meta.get("of", trace.name) != trace.name:
            continue
        if "value" in meta:
            frame[meta["reference"]] = float(meta["value"])
            continue
        values = dict(zip(list(reference.x), (float(v) for v in reference.y)))
        frame[meta["reference"]] = frame[x].map(values)


def _meta(trace) -> dict:
    return trace.meta if isinstance(trace.meta, dict) else {}


def _trace_table(fig: go.Figure, trace) -> pd.DataFrame:
    if trace.type == "sankey":
        labels = list(trace.node.label)
        return pd.DataFrame({
            "source": [labels[s] for s in trace.link.source],
            "target": [labels[t] for t in trace.link.target],
            "value": list(trace.link.value),
        })
    names = _column_names(fig, trace)
    if trace.type == "heatmap":
        z = np.asarray(trace.z)
        z = z.astype(float) if z.dtype == object else z  # None marks a gap
        rows, cols = z.shape
        x = np.arange(cols) if trace.x is None else np.asarray(trace.x, dtype=object)
        y = np.arange(rows) if trace.y is None else np.asarray(trace.y, dtype=object)
        frame = pd.DataFrame({names["x"]: np.tile(x, rows), names["y"]: np.repeat(y, cols), names["z"]: z.reshape(-1)})
        point_shape = (rows * cols,)
    elif trace.type in ("scatter", "bar"):
        frame = pd.DataFrame({names["x"]: list(trace.x), names["y"]: list(trace.y)})
        point_shape = (len(frame),)
    else:
        raise ValueError(f"figure_table does not know {trace.type!r} traces")
    custom = _meta(trace).get("customdata", [])
    if custom:
        data = np.asarray(trace.customdata, dtype=object).reshape(point_shape + (len(custom),))
        for column, name in enumerate(custom):
            frame[name] = data[:, column]
    return frame.map(_plain_text)


def _column_names(fig: go.Figure, trace) -> dict[str, str]:
    """x, y, z named by the trace's meta, else by the axis and colour-bar titles; distinct."""
    declared = _meta(trace).get("columns", {})
    titles = {
        "x": fig.layout.xaxis.title.text,
        "y": fig.layout.yaxis.title.text,
        "z": trace.colorbar.title.text if trace.type == "heatmap" else None,
    }
    names = {}
    for axis in ("x", "y", "z"):
        name = declared.get(axis) or _column_name(titles[axis]) or axis
        names[axis] = name if name not in names.values() else f"{name}_{axis}"
    return names


def _column_name(title: str | None) -> str:
    """An axis title as a column name: "capacity factor α  (C = ...)" -> "capacity_factor_α"."""
    return html.unescape(title or "").split(" (")[0].strip().replace(" ", "_")


def _integral(column: pd.Series) -> bool:
    values = pd.to_numeric(column, errors="coerce")
    known = values.dropna()
    return column.notna().sum() == len(known) and bool(np.all(np.mod(known, 1) == 0))


def _plain_text(value):
    """A label as a person reads it (`&lt;s&gt;` -> `<s>`); other values unchanged."""
    return html.unescape(value) if isinstance(value, str) else value
