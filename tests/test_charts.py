"""Chart tests: each checks the data a figure carries, on small hand-built traces."""

import dataclasses
from html.parser import HTMLParser

import numpy as np
import pytest
from factories import make_trace

from moeviz.views.charts import (
    coactivation_heatmap,
    expert_colors,
    expert_load_chart,
    figure_table,
    js_matrix_heatmap,
    layer_load_heatmap,
    load_comparison_chart,
    probability_heatmap,
    repeat_rate_chart,
    token_label,
    token_view_html,
    transition_sankey,
)

SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"
TOKENS = ["<s>", SCRIPT, "\n", " cat", IMG]
# Two MoE layers (decoder layers 1 and 3 of 4; 0 and 2 are dense), 5 tokens, 4 experts, top-2.
TOPK_IDS = [
    [[0, 2], [3, 1], [1, 0], [2, 3], [0, 1]],
    [[1, 0], [1, 2], [0, 3], [3, 2], [2, 0]],
]
TOPK_WEIGHTS = [
    [[0.62, 0.38], [0.7, 0.3], [0.55, 0.45], [0.9, 0.1], [0.5, 0.5]],
    [[0.8, 0.2], [0.6, 0.4], [0.51, 0.49], [0.75, 0.25], [0.66, 0.34]],
]


@pytest.fixture
def trace():
    logits = np.random.default_rng(0).normal(size=(2, 5, 4)).astype(np.float32)
    return make_trace(
        TOPK_IDS, logits, TOPK_WEIGHTS, tokens=TOKENS, layer_ids=[1, 3], num_layers=4
    )


def _strings(value):
    """Every string inside a (nested) figure property."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple, np.ndarray)):
        for item in value:
            yield from _strings(item)


# -- colours and labels ------------------------------------------------------------------


@pytest.mark.parametrize("num_experts", [4, 8, 10, 16, 24, 32, 60, 64, 128, 160, 256])
def test_expert_colors_are_distinct_hex_and_stable(num_experts):
    colors = expert_colors(num_experts)
    assert len(colors) == num_experts
    assert len(set(colors)) == num_experts
    assert all(len(c) == 7 and c[0] == "#" and int(c[1:], 16) >= 0 for c in colors)
    assert expert_colors(num_experts) == colors


def test_neighbouring_experts_get_clearly_different_colors_at_256():
    rgb = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in expert_colors(256)])
    assert np.linalg.norm(np.diff(rgb, axis=0), axis=1).min() > 60


def test_expert_colors_rejects_zero():
    with pytest.raises(ValueError, match="at least 1"):
        expert_colors(0)


@pytest.mark.parametrize(
    "token, label",
    [
        ("<s>", "&lt;s&gt;"),
        ("</s>", "&lt;/s&gt;"),
        ("<|endoftext|>", "&lt;|endoftext|&gt;"),
        (SCRIPT, "&lt;script&gt;alert(1)&lt;/script&gt;"),
        ("<br>", "&lt;br&gt;"),
        ("a&b", "a&amp;b"),
        ("&lt;", "&amp;lt;"),
        ("\n", "↵"),
        ("\n\n", "↵↵"),
        (" ", "␣"),
        ("    ", "␣␣␣␣"),
        (" \n", "␣↵"),
        ("\t", "→"),
        ("\x00", "\\x00"),
        ("\x1b", "\\x1b"),
        ("\r\n", "\\r↵"),
        ("\u200b", "\\u200b"),
        ("\udc80", "\\udc80"),
        (" cat", " cat"),
        ("x y", "x y"),
        ("$x$", "&#36;x&#36;"),
        ("", "∅"),
        ("é", "é"),
    ],
)
def test_token_label_is_visible_and_escaped(token, label):
    assert token_label(token) == label


# -- probability heatmap -----------------------------------------------------------------------


def test_probability_heatmap_z_is_router_probs_transposed(trace):
    for layer_id, index in ((1, 0), (3, 1)):
        heat = probability_heatmap(trace, layer_id).data[0]
        np.testing.assert_array_equal(heat.z, trace.router_probs[index].T)
        np.testing.assert_array_equal(heat.x, np.arange(5))
        np.testing.assert_array_equal(heat.y, np.arange(4))
        assert np.asarray(heat.customdata).shape == (4, 5)
        assert list(heat.customdata[2]) == [token_label(t) for t in TOKENS]


def test_probability_heatmap_marks_every_topk_pick_with_its_weight(trace):
    picks = probability_heatmap(trace, 3).data[1]
    pairs = list(zip(picks.x.tolist(), picks.y.tolist()))
    assert pairs == [(0, 1), (0, 0), (1, 1), (1, 2), (2, 0), (2, 3), (3, 3), (3, 2), (4, 2), (4, 0)]
    customdata = np.asarray(picks.customdata, dtype=object)
    assert customdata[:, 0].tolist() == [token_label(t) for t in TOKENS for _ in range(2)]
    assert customdata[:, 1].tolist() == [1, 2] * 5
    np.testing.assert_allclose(customdata[:, 2].astype(float), np.ravel(TOPK_WEIGHTS[1]), rtol=1e-6)
    assert list(picks.marker.color) == [expert_colors(4)[e] for _, e in pairs]


def test_probability_heatmap_escapes_tick_and_hover_text(trace):
    fig = probability_heatmap(trace, 1)
    ticktext = list(fig.layout.xaxis.ticktext)
    # Ticks cut long tokens at 12 visible characters; hover text keeps them whole.
    assert ticktext == ["&lt;s&gt;", "&lt;script&gt;ale…", "↵", " cat", "&lt;img src=x …"]
    assert fig.data[0].customdata[0][1] == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert list(fig.layout.xaxis.tickvals) == [0, 1, 2, 3, 4]
    texts = [*ticktext, *_strings(fig.data[0].customdata), *_strings(fig.data[1].customdata)]
    assert not any("<" in t or ">" in t for t in texts)
    assert all("%{x}" not in t.hovertemplate for t in fig.data)  # %{x} would be the cut tick


def test_probability_heatmap_sparse_ticks_for_long_text_and_many_experts():
    rng = np.random.default_rng(1)
    topk = np.stack([rng.choice(256, size=8, replace=False) for _ in range(100)])[None]
    fig = probability_heatmap(make_trace(topk, num_experts=256), 0)
    assert fig.layout.xaxis.ticktext is None and fig.layout.xaxis.tickmode is None
    assert fig.layout.yaxis.dtick is None
    assert [t.name for t in fig.data if t.type == "scatter"] == ["top-k picks"]
    assert len(fig.data[1].x) == 800
    assert all(t.hovertemplate.startswith("token %{x}: ") for t in fig.data)


def test_unknown_layer_names_the_moe_layers(trace):
    for chart in (probability_heatmap, token_view_html):
        with pytest.raises(ValueError, match=r"layer 2 .*MoE layers are \[1, 3\]"):
            chart(trace, 2)


# -- token view -------------------------------------------------------------------------------


class _TokenViewParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.tokens, self.swatches = set(), [], []
        self._current = None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        style = dict(part.split(":", 1) for part in attrs.get("style", "").split(";") if part)
        kind = (attrs.get("class") or "").split(" ")[0]  # "moeviz-token moeviz-left-out" is a token
        if kind in ("moeviz-token", "moeviz-swatch"):
            self._current = {"title": attrs["title"], "background": style["background-color"], "text": ""}
            (self.tokens if kind == "moeviz-token" else self.swatches).append(self._current)
        elif tag == "br" and self._current is not None:
            self._current["text"] += "<BR>"

    def handle_endtag(self, tag):
        if tag == "span":
            self._current = None

    def handle_data(self, data):
        if self._current is not None:
            self._current["text"] += data


def _parse(page):
    parser = _TokenViewParser()
    parser.feed(page)
    parser.close()
    return parser


def test_token_view_colours_each_token_by_its_first_choice(trace):
    parsed = _parse(token_view_html(trace, 1))
    colors = expert_colors(4)
    assert [t["background"] for t in parsed.tokens] == [colors[e] for e in trace.first_choice[0]]
    assert [t["title"] for t in parsed.tokens] == [
        "expert 0: 0.62 · expert 2: 0.38",
        "expert 3: 0.70 · expert 1: 0.30",
        "expert 1: 0.55 · expert 0: 0.45",
        "expert 2: 0.90 · expert 3: 0.10",
        "expert 0: 0.50 · expert 1: 0.50",
    ]
    assert [s["text"] for s in parsed.swatches] == ["expert 0", "expert 1", "expert 2", "expert 3"]
    assert [s["background"] for s in parsed.swatches] == colors
    assert [s["title"] for s in parsed.swatches] == ["2 tokens", "1 token", "1 token", "1 token"]


def test_token_view_shows_markup_tokens_as_text(trace):
    page = token_view_html(trace, 3)
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    parsed = _parse(page)
    assert parsed.tags == {"div", "span", "br"}
    assert [t["text"] for t in parsed.tokens] == ["<s>", SCRIPT, "↵<BR>", " cat", IMG]


def test_token_view_makes_whitespace_and_control_tokens_visible():
    tokens = ["a", " ", "\t", "\x00", "\n\n", "", 'say "hi"']
    page = token_view_html(make_trace(np.zeros((1, len(tokens), 1)), tokens=tokens, num_experts=2), 0)
    assert [t["text"] for t in _parse(page).tokens] == ["a", "␣", "→", "\\x00", "↵<BR>↵<BR>", "∅", 'say "hi"']
    assert "say &quot;hi&quot;" in page


# -- expert load ------------------------------------------------------------------------------


def test_expert_load_chart_bars_and_uniform_line():
    load = np.array([0.4, 0.1, 0.3, 0.2])
    fig = expert_load_chart(load, 0.25, title="Layer 3")
    bars, line = fig.data
    np.testing.assert_array_equal(bars.y, load)
    np.testing.assert_array_equal(bars.x, np.arange(4))
    assert list(bars.marker.color) == expert_colors(4)
    assert list(line.y) == [0.25, 0.25] and line.line.dash == "dash"
    assert list(line.x) == [-0.5, 3.5]
    assert fig.layout.title.text == "Layer 3"


def test_expert_load_chart_256_experts_has_no_legend_per_expert():
    fig = expert_load_chart(np.full(256, 1 / 256), 1 / 256)
    assert sum(t.showlegend is not False for t in fig.data) == 1
    assert fig.layout.xaxis.dtick is None
    assert len(set(fig.data[0].marker.color)) == 256


def test_expert_load_chart_rejects_non_vector():
    with pytest.raises(ValueError, match=r"float\[experts\].*\(2, 2\)"):
        expert_load_chart(np.ones((2, 2)), 0.5)


def test_load_comparison_chart_one_trace_per_label():
    loads = {"arxiv": [0.5, 0.2, 0.2, 0.1], "github": [0.1, 0.1, 0.3, 0.5], "<b>bold</b>": [0.25] * 4}
    fig = load_comparison_chart(loads, 0.25)
    *bars, line = fig.data
    assert [b.name for b in bars] == ["arxiv", "github", "&lt;b&gt;bold&lt;/b&gt;"]
    for bar, load in zip(bars, loads.values()):
        np.testing.assert_array_equal(bar.y, load)
        np.testing.assert_array_equal(bar.x, np.arange(4))
    assert fig.layout.barmode == "group"
    assert list(line.y) == [0.25, 0.25]


def test_load_comparison_chart_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match=r"'a': 4, 'b': 3"):
        load_comparison_chart({"a": [0.25] * 4, "b": [1 / 3] * 3}, 0.25)
    with pytest.raises(ValueError, match="empty"):
        load_comparison_chart({}, 0.25)


def test_layer_load_heatmap_keeps_dense_layers_as_empty_rows(trace):
    load = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]])
    heat = layer_load_heatmap(trace, load, 0.25).data[0]
    z = np.asarray(heat.z, dtype=float)
    assert z.shape == (4, 4)
    assert np.isnan(z[0]).all() and np.isnan(z[2]).all()
    np.testing.assert_array_equal(z[[1, 3]], load)
    assert list(heat.y) == ["layer 0 (dense)", "layer 1", "layer 2 (dense)", "layer 3"]
    np.testing.assert_array_equal(heat.x, np.arange(4))
    # Diverging scale: blue at 0, white exactly at the uniform load, red at the top.
    assert (heat.zmin, heat.zmax) == (0, 0.7)
    stops = {position: color for position, color in heat.colorscale}
    assert stops[0.25 / 0.7] == "#f7f7f7"
    assert (stops[0.0], stops[1.0]) == ("#2166ac", "#b2182b")


def test_layer_load_heatmap_keeps_uniform_below_the_middle_for_flat_loads(trace):
    heat = layer_load_heatmap(trace, np.full((2, 4), 0.25), 0.25).data[0]
    assert heat.zmax == 0.5
    assert dict(heat.colorscale)[0.5] == "#f7f7f7"


def test_layer_load_heatmap_rejects_wrong_shape(trace):
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(2, 4\)"):
        layer_load_heatmap(trace, np.ones((4, 4)), 0.25)
    with pytest.raises(ValueError, match="positive"):
        layer_load_heatmap(trace, np.ones((2, 4)), 0)


# -- across layers ---------------------------------------------------------------------------


def test_repeat_rate_chart_lines_with_dashed_chance_of_same_colour():
    layer_ids = [1, 3, 5]
    rates = {"first choice": [0.3, 0.5, 0.4], "first or second": [0.6, 0.7, 0.65]}
    chance = {"first choice": [0.125] * 3, "first or second": [0.46] * 3}
    fig = repeat_rate_chart(layer_ids, rates, chance)
    assert [t.name for t in fig.data] == [
        "first choice", "first choice (chance)", "first or second", "first or second (chance)"
    ]
    for rate, base, name in zip(fig.data[::2], fig.data[1::2], rates):
        assert list(rate.x) == layer_ids and list(base.x) == layer_ids
        np.testing.assert_array_equal(rate.y, rates[name])
        np.testing.assert_array_equal(base.y, chance[name])
        assert base.line.dash == "dash" and rate.line.dash is None
        assert base.line.color == rate.line.color
    assert fig.data[0].line.color != fig.data[2].line.color


def test_repeat_rate_chart_rejects_bad_series():
    with pytest.raises(ValueError, match="2 values for 3 layers"):
        repeat_rate_chart([0, 1, 2], {"a": [0.1, 0.2]}, {"a": [0.1, 0.1]})
    with pytest.raises(ValueError, match="same series"):
        repeat_rate_chart([0], {"a": [0.1]}, {"b": [0.1]})


def test_coactivation_heatmap_shows_the_matrix():
    matrix = np.array([[5, 2, 0], [2, 4, 1], [0, 1, 3]])
    heat = coactivation_heatmap(matrix).data[0]
    np.testing.assert_array_equal(heat.z, matrix)
    np.testing.assert_array_equal(heat.x, np.arange(3))
    np.testing.assert_array_equal(heat.y, np.arange(3))
    assert (heat.zmin, heat.zmax) == (0, 2)  # the diagonal must not wash out the pairs
    with pytest.raises(ValueError, match=r"square.*\(2, 3\)"):
        coactivation_heatmap(np.ones((2, 3)))


@pytest.fixture
def walk():
    # First choices, by hand:  layer 0: 0 0 1 2   layer 1: 1 1 1 0   layer 2: 3 1 1 0
    return make_trace(
        [[[0, 3], [0, 1], [1, 2], [2, 0]], [[1, 0], [1, 2], [1, 3], [0, 1]], [[3, 2], [1, 0], [1, 0], [0, 2]]],
        num_experts=4,
    )


def _links(fig):
    sankey = fig.data[0]
    labels = list(sankey.node.label)
    return {(labels[s], labels[t]): v for s, t, v in zip(sankey.link.source, sankey.link.target, sankey.link.value)}


def test_transition_sankey_counts_first_choice_transitions(walk):
    fig = transition_sankey(walk, [0, 1, 2])
    sankey = fig.data[0]
    assert list(sankey.node.label) == ["L0 e0", "L0 e1", "L0 e2", "L1 e0", "L1 e1", "L2 e0", "L2 e1", "L2 e3"]
    colors = expert_colors(4)
    assert list(sankey.node.color) == [colors[e] for e in (0, 1, 2, 0, 1, 0, 1, 3)]
    assert _links(fig) == {
        ("L0 e0", "L1 e1"): 2, ("L0 e1", "L1 e1"): 1, ("L0 e2", "L1 e0"): 1,
        ("L1 e0", "L2 e0"): 1, ("L1 e1", "L2 e1"): 2, ("L1 e1", "L2 e3"): 1,
    }


def test_transition_sankey_follows_the_given_layer_order(walk):
    assert _links(transition_sankey(walk, [2, 0])) == {
        ("L2 e3", "L0 e0"): 1, ("L2 e1", "L0 e0"): 1, ("L2 e1", "L0 e1"): 1, ("L2 e0", "L0 e2"): 1,
    }


def test_transition_sankey_rejects_bad_layers(walk):
    with pytest.raises(ValueError, match="at least two layers"):
        transition_sankey(walk, [1])
    with pytest.raises(ValueError, match="once"):
        transition_sankey(walk, [1, 1])
    with pytest.raises(ValueError, match=r"MoE layers are \[0, 1, 2\]"):
        transition_sankey(walk, [0, 7])


# -- across prompts ---------------------------------------------------------------------------


def test_js_matrix_heatmap_annotated_with_escaped_labels():
    matrix = np.array([[0.0, 0.12], [0.12, 0.0]])
    heat = js_matrix_heatmap(["code", "<s> poem"], matrix).data[0]
    np.testing.assert_array_equal(heat.z, matrix)
    assert list(heat.x) == list(heat.y) == ["code", "&lt;s&gt; poem"]
    assert heat.texttemplate == "%{z:.3f}"
    with pytest.raises(ValueError, match=r"\(2, 2\).*3 labels"):
        js_matrix_heatmap(["a", "b", "c"], matrix)
    with pytest.raises(ValueError, match="distinct"):
        js_matrix_heatmap(["a", "a"], matrix)


# -- figure_table ----------------------------------------------------------------------------


def test_figure_table_of_probability_heatmap(trace):
    """Named columns, integer ids, the layer, and tokens in their raw text (issue 14, item 5)."""
    fig = probability_heatmap(trace, 1)
    table = figure_table(fig)
    assert table.columns.tolist() == ["layer", "layer_label", "series", "position", "expert", "router_probability",
                                      "token", "choice", "weight"]
    assert set(table.layer) == {1} and set(table.layer_label) == {"layer 1"}
    heat = table[table.series == "router probability"]
    assert len(heat) == 4 * 5
    assert heat.position.tolist() == list(range(5)) * 4
    assert heat.expert.tolist() == [e for e in range(4) for _ in range(5)]
    np.testing.assert_allclose(heat.router_probability, trace.router_probs[0].T.reshape(-1))
    assert heat.token.tolist() == trace.tokens * 4  # raw text: "\n", not the glyph ↵
    assert "↵" not in heat.token.tolist() and "\n" in heat.token.tolist()

    picks = table[table.series == "top-k picks"]
    assert list(zip(picks.position, picks.expert)) == list(zip(fig.data[1].x.tolist(), fig.data[1].y.tolist()))
    assert picks.choice.tolist() == [1, 2] * 5
    np.testing.assert_allclose(picks.weight.astype(float), np.ravel(TOPK_WEIGHTS[0]), rtol=1e-6)
    assert picks.router_probability.isna().all()
    assert table.expert.dtype == "Int64" and table.position.dtype == "Int64" and table.choice.dtype == "Int64"
    assert "\n1,layer 1,top-k picks,0,0,,<s>,1,0.6" in table.to_csv(index=False)


def test_figure_table_of_load_and_layer_charts(trace):
    """No uniform-line points, integer expert ids (not 0.0) (issue 14, item 5)."""
    table = figure_table(expert_load_chart([0.4, 0.1, 0.3, 0.2], 0.25))
    assert table.columns.tolist() == ["expert", "expert_load"]
    assert table.values.tolist() == [[0, 0.4], [1, 0.1], [2, 0.3], [3, 0.2]]
    assert table.to_csv(index=False) == "expert,expert_load\n0,0.4\n1,0.1\n2,0.3\n3,0.2\n"
    load = np.arange(8.0).reshape(2, 4)
    table = figure_table(layer_load_heatmap(trace, load, 0.25))
    assert table.columns.tolist() == ["expert", "layer_label", "load"]
    assert len(table) == 16
    assert table[table.layer_label == "layer 3"].load.tolist() == [4.0, 5.0, 6.0, 7.0]
    assert table[table.layer_label == "layer 2 (dense)"].load.isna().all()


def test_figure_table_joins_chance_lines_as_columns_not_rows():
    """A reference line is a column of its series' rows (issue 14, item 5): per series when each
    has its own chance, shared when one grey line serves all."""
    own = repeat_rate_chart([1, 2], {"first choice": [0.3, 0.2], "first or second": [0.6, 0.5]},
                            {"first choice": [0.125, 0.125], "first or second": [0.46, 0.44]})
    table = figure_table(own)
    assert table.columns.tolist() == ["series", "layer", "repeat_rate", "chance"]
    assert table.values.tolist() == [["first choice", 1, 0.3, 0.125], ["first choice", 2, 0.2, 0.125],
                                     ["first or second", 1, 0.6, 0.46], ["first or second", 2, 0.5, 0.44]]
    shared = repeat_rate_chart([1, 2], {"text 1": [0.3, 0.2], "text 2": [0.1, 0.4]},
                               {"text 1": [0.25, 0.25], "text 2": [0.25, 0.25]})
    table = figure_table(shared)
    assert set(table.series) == {"text 1", "text 2"} and (table.chance == 0.25).all()


def test_figure_table_of_coactivation_and_load_comparison():
    table = figure_table(coactivation_heatmap(np.array([[3, 1], [1, 2]])))
    assert table.columns.tolist() == ["expert", "with_expert", "tokens"]
    assert table.values.tolist() == [[0, 0, 3], [1, 0, 1], [0, 1, 1], [1, 1, 2]]
    table = figure_table(load_comparison_chart({"a": [0.5, 0.5], "b": [1.0, 0.0]}, 0.5))
    assert table.columns.tolist() == ["series", "expert", "expert_load"]
    assert table.values.tolist() == [["a", 0, 0.5], ["a", 1, 0.5], ["b", 0, 1.0], ["b", 1, 0.0]]


def test_figure_table_of_sankey_and_js_matrix(walk):
    table = figure_table(transition_sankey(walk, [0, 1]))
    assert table.columns.tolist() == ["source", "target", "value"]
    assert {(s, t): v for s, t, v in table.values} == {
        ("L0 e0", "L1 e1"): 2, ("L0 e1", "L1 e1"): 1, ("L0 e2", "L1 e0"): 1
    }
    table = figure_table(js_matrix_heatmap(["a", "<s>"], [[0.0, 0.3], [0.3, 0.0]]))
    assert table[["label", "other_label", "js_divergence_bits"]].values.tolist() == [
        ["a", "a", 0.0], ["<s>", "a", 0.3], ["a", "<s>", 0.3], ["<s>", "<s>", 0.0]
    ]


# -- many experts, shared experts, encoder-decoder layers ---------------------------------------


@pytest.fixture
def deepseek_like():
    """256 routed experts, top-8, 1 shared expert, 40 tokens, MoE layers 3 and 4 of 5."""
    rng = np.random.default_rng(2)
    topk = np.stack([[rng.choice(256, size=8, replace=False) for _ in range(40)] for _ in range(2)])
    logits = rng.normal(size=(2, 40, 256))
    trace = make_trace(topk, logits, np.sort(rng.random((2, 40, 8)))[..., ::-1], scoring="sigmoid",
                       layer_ids=[3, 4], num_layers=5)
    return dataclasses.replace(trace, shared_experts=1)


def test_charts_stay_legible_with_256_experts_top_8(deepseek_like):
    trace = deepseek_like
    heat = probability_heatmap(trace, 3)
    assert heat.layout.yaxis.dtick is None and heat.layout.yaxis.tickmode is None  # Plotly's sparse ticks
    assert [t.name for t in heat.data] == ["router score (sigmoid)", "top-k picks"]  # no legend per expert
    assert len(heat.data[1].x) == 40 * 8 and heat.data[1].marker.size == 5
    load = expert_load_chart(np.full(256, 8 / 256), 8 / 256, shared_experts=1)
    assert sum(t.showlegend is not False for t in load.data) == 1 and load.layout.xaxis.dtick is None
    layers = layer_load_heatmap(trace, np.full((2, 256), 8 / 256), 8 / 256)
    assert layers.layout.xaxis.dtick is None and np.asarray(layers.data[0].z).shape == (5, 256)
    assert list(layers.data[0].y) == ["layer 0 (dense)", "layer 1 (dense)", "layer 2 (dense)", "layer 3", "layer 4"]
    assert coactivation_heatmap(np.eye(256, dtype=int)).layout.xaxis.dtick is None
    # The token view's legend names the 16 most used experts, not up to 40 swatches.
    parsed = _parse(token_view_html(trace, 4))
    first = trace.first_choice[1]
    assert len(parsed.swatches) == 16 and len(np.unique(first)) > 16
    counts = np.bincount(first, minlength=256)
    named = [int(s["text"].split()[1]) for s in parsed.swatches]
    assert named == sorted(named) and min(counts[named]) >= max(np.delete(counts, named))
    assert f"… {len(np.unique(first)) - 16} more experts" in token_view_html(trace, 4)


def test_shared_experts_are_shown_as_always_active(deepseek_like):
    note = "+ 1 shared expert, always active (not routed)"
    assert probability_heatmap(deepseek_like, 3).layout.title.subtitle.text == note
    assert layer_load_heatmap(deepseek_like, np.ones((2, 256)), 0.5).layout.title.subtitle.text == note
    assert expert_load_chart([0.5, 0.5], 0.5, shared_experts=4).layout.title.subtitle.text == (
        "+ 4 shared experts, always active (not routed)")
    page = token_view_html(deepseek_like, 3)
    assert '<span class="moeviz-shared"' in page and "shared ×1, always active</span>" in page
    plain = dataclasses.replace(deepseek_like, shared_experts=0)
    assert not probability_heatmap(plain, 3).layout.title.subtitle.text
    assert "moeviz-shared" not in token_view_html(plain, 3)
    assert not expert_load_chart([0.5, 0.5], 0.5).layout.title.subtitle.text


@pytest.fixture
def switch_like():
    """An encoder-decoder trace: 4 encoder and 4 decoder layers, blocks 1 and 3 of each MoE."""
    trace = make_trace(np.array(TOPK_IDS)[[0, 1, 0, 1]][..., :1], layer_ids=[1, 3, 5, 7], num_layers=8, num_experts=4)
    return dataclasses.replace(trace, encoder_layers=4)


def test_encoder_decoder_layers_are_labelled_with_their_stack(switch_like):
    trace = switch_like
    assert trace.layer_stacks == ["encoder", "encoder", "decoder", "decoder"]
    heat = layer_load_heatmap(trace, np.full((4, 4), 0.25), 0.25).data[0]
    assert list(heat.y) == ["enc 0 (dense)", "enc 1", "enc 2 (dense)", "enc 3",
                            "dec 0 (dense)", "dec 1", "dec 2 (dense)", "dec 3"]
    assert probability_heatmap(trace, 5).layout.title.text == "Router scores, dec 1"
    assert "first choice, enc 3:" in token_view_html(trace, 3)
    assert list(transition_sankey(trace, [3, 5]).data[0].node.label)[0].startswith("enc 3 e")
    rates = repeat_rate_chart(trace.layer_ids, {"a": [0.1] * 4}, {"a": [0.2] * 4},
                              layer_labels=[trace.layer_label(n) for n in trace.layer_ids])
    assert list(rates.layout.xaxis.tickvals) == [1, 3, 5, 7]
    assert list(rates.layout.xaxis.ticktext) == ["enc 1", "enc 3", "dec 1", "dec 3"]
    with pytest.raises(ValueError, match="3 layer labels for 4 layers"):
        repeat_rate_chart(trace.layer_ids, {"a": [0.1] * 4}, {"a": [0.2] * 4}, layer_labels=["a", "b", "c"])


def test_token_view_greys_left_out_special_tokens_and_counts_the_rest(trace):
    left_out = np.array([True, False, False, False, False])  # "<s>"
    page = token_view_html(trace, 1, left_out=left_out)
    parsed = _parse(page)
    colors = expert_colors(4)
    assert [t["background"] for t in parsed.tokens] == ["#e8e8e8"] + [colors[e] for e in trace.first_choice[0][1:]]
    assert parsed.tokens[0]["title"].startswith("special token, left out of the statistics")
    # First choices of the four counted tokens: 3, 1, 2, 0: one each (expert 0 had 2 with <s>).
    assert [s["title"] for s in parsed.swatches] == ["1 token"] * 4
    assert page.count("moeviz-left-out") == 1 and "grey: special tokens" in page
    with pytest.raises(ValueError, match="one flag per token"):
        token_view_html(trace, 1, left_out=[True])


def test_repeat_rate_chart_draws_one_chance_line_for_texts_sharing_it():
    """Compare prompts: every text has the chance 1/E: one grey line, not one per text."""
    rates = {"text 1": [0.3, 0.5], "text 2": [0.2, 0.4], "text 3": [0.1, 0.2]}
    fig = repeat_rate_chart([1, 3], rates, {name: [0.125, 0.125] for name in rates},
                            layer_labels=["layer 1", "layer 3"])
    assert [t.name for t in fig.data] == ["text 1", "text 2", "text 3", "chance"]
    np.testing.assert_array_equal(fig.data[-1].y, [0.125, 0.125])
    assert list(fig.layout.xaxis.ticktext) == ["layer 1", "layer 3"] and list(fig.layout.xaxis.tickvals) == [1, 3]


def test_comparison_titles_say_what_they_show():
    js = js_matrix_heatmap(["english", "python"], [[0.0, 0.2], [0.2, 0.0]])
    assert js.layout.title.text == "Jensen–Shannon divergence between expert loads (bits)"
    assert js_matrix_heatmap(["a", "b"], np.zeros((2, 2)), title="t").layout.title.text == "t"
    loads = load_comparison_chart({"a": [0.5, 0.5]}, 0.5, title="Share of tokens per expert, first choice")
    assert loads.layout.title.text == "Share of tokens per expert, first choice"


# -- text as people read it (issue 14, item 3) ----------------------------------------------------


def test_byte_level_pieces_of_chinese_and_emoji_are_drawn_as_their_characters(tiny_mixtral, tokenizer):
    """The byte-level BPE fixture splits 今, 天 and 😀 into UTF-8 bytes, each token alone
    `\\xNN`; the token view draws the characters, one span per run, the pieces in the tooltip."""
    from moeviz.model.capture import trace_text
    from moeviz.views.charts import character_runs

    trace = trace_text(tiny_mixtral, tokenizer, "今天 ok 😀!", model_id="tiny")
    assert trace.tokens == ["\\xe4", "\\xbb", "\\x8a", "\\xe5", "\\xa4", "\\xa9", " ", "o", "k", " ",
                            "\\xf0", "\\x9f", "\\x98", "\\x80", "!"]
    assert character_runs(trace) == [(0, 3, "今"), (3, 6, "天"), (6, 7, None), (7, 8, None), (8, 9, None),
                                     (9, 10, None), (10, 14, "😀"), (14, 15, None)]
    layer = trace.layer_ids[0]
    parsed = _parse(token_view_html(trace, layer))
    assert [t["text"] for t in parsed.tokens] == ["今", "天", "␣", "o", "k", "␣", "😀", "!"]
    first = trace.topk_ids[0]
    weights = trace.topk_weights[0]
    assert parsed.tokens[0]["title"] == "今 from 3 byte-level tokens:\n" + "\n".join(
        f"{trace.tokens[p]} → " + " · ".join(f"expert {e}: {w:.2f}" for e, w in zip(first[p], weights[p]))
        for p in range(3))
    assert parsed.tokens[0]["background"] == expert_colors(trace.num_experts)[first[0][0]]
    page = token_view_html(trace, layer)
    assert 'class="moeviz-token moeviz-pieces" data-positions="10-13"' in page
    assert 'data-positions="14-14"' in page


def test_bytes_stay_raw_where_no_character_forms(tiny_mixtral, tokenizer):
    from moeviz.model.capture import trace_text
    from moeviz.views.charts import character_runs

    # A text that literally holds the escape is not a byte; a lone lead byte forms nothing.
    literal = trace_text(tiny_mixtral, tokenizer, "a \\xe4\\xbb\\x8a b", model_id="tiny")
    assert all(characters is None for _, _, characters in character_runs(literal))
    cut = make_trace(np.zeros((1, 2, 1)), tokens=["\\xe4\\xbb", "x"], num_experts=2)
    assert character_runs(cut) == [(0, 1, None), (1, 2, None)]
    assert [t["text"] for t in _parse(token_view_html(cut, 0)).tokens] == ["\\xe4\\xbb", "x"]
