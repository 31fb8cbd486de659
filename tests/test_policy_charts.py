"""Routing-lab charts: each test checks the data a figure or token view carries."""

from html.parser import HTMLParser

import numpy as np
import pytest

from moeviz.analysis import policies
from moeviz.views.charts import expert_colors, figure_table
from moeviz.views.policy_charts import (
    assignment_view_html,
    bias_chart,
    capacity_sweep_chart,
    experts_per_token_chart,
    policy_load_chart,
)

# Four tokens, three experts. Top-1 picks e0 e0 e0 e2; at α = 0.5 without a minimum,
# C = ⌈0.5 · 4 / 3⌉ = 1, so e0 keeps t0 and drops t1 and t2.
SCORES = [
    [0.6, 0.3, 0.1],
    [0.5, 0.4, 0.1],
    [0.7, 0.1, 0.2],
    [0.2, 0.3, 0.5],
]
TOKENS = ["<s>", "<script>alert(1)</script>", "\n", " cat"]


@pytest.fixture
def model():
    return policies.top_k(SCORES, 2)  # e0 e1 | e0 e1 | e0 e2 | e2 e1


@pytest.fixture
def capped():
    return policies.top_k_capacity(SCORES, 1, 0.5, min_capacity=1)


# -- load ------------------------------------------------------------------------------------


def test_policy_load_chart_stacks_dropped_share_on_the_policy_bars(model, capped):
    fig = policy_load_chart(model, capped)
    names = [t.name for t in fig.data]
    assert names == ["top-2", "top-1 with capacity (α = 0.5, order = token)", "dropped (over capacity)",
                     "uniform, model (0.667)", "capacity C = 1 tokens"]
    # model: e0 3 of 4 tokens, e1 3, e2 2; policy keeps e0 t0 and e2 t3, drops e0 t1 t2
    np.testing.assert_allclose(fig.data[0].y, [3 / 4, 3 / 4, 2 / 4])
    np.testing.assert_allclose(fig.data[1].y, [1 / 4, 0, 1 / 4])
    np.testing.assert_allclose(fig.data[2].y, [2 / 4, 0, 0])
    np.testing.assert_allclose(np.asarray(fig.data[2].base, dtype=float), fig.data[1].y)
    assert fig.data[1].offsetgroup == fig.data[2].offsetgroup != fig.data[0].offsetgroup
    assert list(fig.data[3].y) == [2 / 3, 2 / 3]  # k / E = 2 / 3
    assert list(fig.data[4].y) == [1 / 4, 1 / 4]  # C / T


def test_policy_load_chart_without_drops_has_no_dropped_bars(model):
    fig = policy_load_chart(model, policies.expert_choice(SCORES, 2))
    assert [t.name for t in fig.data] == ["top-2", "expert choice (C = 2)", "uniform, model (0.667)",
                                          "capacity C = 2 tokens"]
    np.testing.assert_allclose(fig.data[1].y, [2 / 4] * 3)


def test_charts_refuse_assignments_of_different_texts(model):
    other = policies.top_k(SCORES[:2], 1)
    for chart in (policy_load_chart, experts_per_token_chart):
        with pytest.raises(ValueError, match="must route the same tokens"):
            chart(model, other)


def test_experts_per_token_pads_both_series(model):
    # Expert choice C = 1: e0 t2 (.7), e1 t1 (.4), e2 t3 (.5); t0 gets none.
    fig = experts_per_token_chart(model, policies.expert_choice(SCORES, 1))
    assert list(fig.data[0].x) == [0, 1, 2]
    np.testing.assert_allclose(fig.data[0].y, [0, 0, 1])  # every token has its two experts
    np.testing.assert_allclose(fig.data[1].y, [1 / 4, 3 / 4, 0])


# -- capacity sweep --------------------------------------------------------------------------


def test_capacity_sweep_marks_the_reference_factors():
    factors = [0.5, 1.0, 1.25, 1.5, 2.0]
    shares = {"token order": [0.5, 0.3, 0.2, 0.1, 0.0], "score order": [0.6, 0.35, 0.25, 0.1, 0.05]}
    fig = capacity_sweep_chart(factors, shares, (1.25, 2.0))
    assert [t.name for t in fig.data] == ["token order", "score order", "reference α"]
    assert list(fig.data[0].x) == factors and list(fig.data[1].y) == shares["score order"]
    assert list(fig.data[2].x) == [1.25, 2.0, 1.25, 2.0]
    assert list(fig.data[2].y) == [0.2, 0.0, 0.25, 0.05]
    assert [shape.x0 for shape in fig.layout.shapes] == [1.25, 2.0]


def test_capacity_sweep_needs_the_reference_factors_in_the_grid():
    with pytest.raises(ValueError, match="reference capacity factor 1.25 is not among"):
        capacity_sweep_chart([1.0, 2.0], {"a": [0.1, 0.0]}, (1.25,))
    with pytest.raises(ValueError, match="'a' has 1 values for 2 capacity factors"):
        capacity_sweep_chart([1.0, 2.0], {"a": [0.1]}, (2.0,))
    with pytest.raises(ValueError, match="shares is empty"):
        capacity_sweep_chart([1.0, 2.0], {}, (2.0,))


# -- bias --------------------------------------------------------------------------------------


def test_bias_chart_shows_each_expert_bias_in_its_colour():
    fig = bias_chart([-0.25, 0.0, 0.25])
    np.testing.assert_allclose(fig.data[0].y, [-0.25, 0.0, 0.25])
    assert list(fig.data[0].x) == [0, 1, 2]
    assert list(fig.data[0].marker.color) == expert_colors(3)
    with pytest.raises(ValueError, match=r"bias must be float\[experts\]"):
        bias_chart([])


def test_figure_tables_carry_the_plotted_numbers(model, capped):
    table = figure_table(policy_load_chart(model, capped))
    dropped = table[table.series == "dropped (over capacity)"]
    assert dropped.expert.tolist() == [0, 1, 2]
    np.testing.assert_allclose(dropped.share_of_tokens, [0.5, 0, 0])


# -- token view ----------------------------------------------------------------------------------


class _Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.tokens, self.swatches, self.marks = set(), [], [], []
        self._current = None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        classes = attrs.get("class", "").split()
        style = dict(part.split(":", 1) for part in attrs.get("style", "").split(";") if part)
        if "moeviz-token" in classes or "moeviz-swatch" in classes or "moeviz-mark" in classes:
            self._current = {"classes": classes, "title": attrs.get("title"), "style": style, "text": ""}
            bucket = self.tokens if "moeviz-token" in classes else self.swatches if "moeviz-swatch" in classes else self.marks
            bucket.append(self._current)
        elif tag == "br" and self._current is not None:
            self._current["text"] += "<BR>"

    def handle_endtag(self, tag):
        if tag == "span":
            self._current = None

    def handle_data(self, data):
        if self._current is not None:
            self._current["text"] += data


def _parse(page):
    parser = _Spans()
    parser.feed(page)
    parser.close()
    return parser


def _tint(expert, num_experts=3):
    color = expert_colors(num_experts)[expert]
    return f"rgba({int(color[1:3], 16)},{int(color[3:5], 16)},{int(color[5:7], 16)},0.45)"


def test_token_view_marks_dropped_tokens(capped):
    parsed = _parse(assignment_view_html(TOKENS, capped))
    assert [t["classes"] for t in parsed.tokens] == [
        ["moeviz-token"],
        ["moeviz-token", "moeviz-unrouted"],
        ["moeviz-token", "moeviz-unrouted"],
        ["moeviz-token"],
    ]
    assert [t["title"] for t in parsed.tokens] == ["expert 0: 0.60", "expert 0: dropped", "expert 0: dropped",
                                                   "expert 2: 0.50"]
    assert [t["style"].get("background-color") for t in parsed.tokens] == [_tint(0), None, None, _tint(2)]
    assert ["outline" in t["style"] for t in parsed.tokens] == [False, True, True, False]
    assert [s["text"] for s in parsed.swatches] == ["expert 0", "expert 2"]
    assert [m["text"] for m in parsed.marks] == ["dashed: an assignment dropped (2)", "struck through: no expert (2)"]


def test_token_view_partly_dropped_token_keeps_its_other_expert():
    # Top-2 at α = 0.25 without a minimum: C = ⌈0.25 · 2 · 4 / 3⌉ = 1. First choices e0 t0 (kept),
    # t1 t2 (dropped), e2 t3; then second choices e1 t0 (kept), e1 t1, e2 t2 (dropped), e1 t3 (dropped).
    capped = policies.top_k_capacity(SCORES, 2, 0.25, min_capacity=1)
    parsed = _parse(assignment_view_html(TOKENS, capped))
    assert [t["classes"][1:] for t in parsed.tokens] == [[], ["moeviz-unrouted"], ["moeviz-unrouted"], ["moeviz-dropped"]]
    assert parsed.tokens[3]["title"] == "expert 2: 0.62 · expert 1: dropped"
    assert parsed.tokens[3]["style"]["background-color"] == _tint(2)


def test_token_view_for_expert_choice_says_no_expert_chose_a_token():
    parsed = _parse(assignment_view_html(TOKENS, policies.expert_choice(SCORES, 1)))
    assert parsed.tokens[0]["title"] == "no expert chose this token"
    assert "outline" not in parsed.tokens[0]["style"]
    assert parsed.tokens[2]["title"] == "expert 0: 0.70"


def test_token_view_shows_markup_tokens_as_text(model):
    page = assignment_view_html(TOKENS, model)
    assert "<script" not in page and "<s>" not in page
    parsed = _parse(page)
    assert parsed.tags == {"div", "span", "br"}
    assert [t["text"] for t in parsed.tokens] == ["<s>", "<script>alert(1)</script>", "↵<BR>", " cat"]


def test_token_view_needs_one_token_per_row(model):
    with pytest.raises(ValueError, match="3 tokens but the assignment routes 4"):
        assignment_view_html(TOKENS[:3], model)
