"""The contrast finder (SteerMoE's risk difference, arXiv:2509.09660), its charts and its page:
hand-worked counts, Newcombe's published intervals, the ranking order, and the page's one-click
ablation equal to `moeviz.intervene` with the same ablation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.io as pio
import pytest
from factories import make_trace
from test_app import limit, run_page
from test_routing_lab_page import values

import moeviz
from moeviz.analysis import contrast
from moeviz.model.capture import trace_text
from moeviz.model.interventions import Intervention
from moeviz.model.loading import load_model
from moeviz.ui import default_model_source, presets
from moeviz.views import charts, contrast_charts

PAGE = "app_pages/contrast.py"
BOS = [3, 2]  # the special token's experts: counted, they would change every rate


def layer_trace(layer_2: list[list[int]], layer_4: list[list[int]]):
    """A trace of BOS + one token per pair, MoE layers 2 and 4, 4 experts, top-2."""
    return make_trace([[BOS, *layer_2], [BOS, *layer_4]], num_experts=4, layer_ids=[2, 4], num_layers=5,
                      special_ids=[0])


# Layer 2: A selects expert 0 for 9 of its 10 tokens (5 of 6, then 4 of 4), B for 3 of 10.
A1 = layer_trace([[0, 1], [0, 2], [0, 3], [0, 1], [0, 2], [1, 2]], [[1, 3]] * 6)
A2 = layer_trace([[0, 3], [0, 3], [0, 1], [0, 2]], [[1, 3]] * 4)
B = layer_trace([[0, 1]] * 3 + [[1, 2]] * 2 + [[2, 3]] * 2 + [[1, 3], [2, 3], [1, 2]], [[1, 3]] * 7 + [[0, 2]] * 3)


def test_risk_difference_hand_worked():
    result = contrast.contrast([A1, A2], [B])
    assert (result.tokens_a, result.tokens_b) == (10, 10)  # the two BOS tokens are left out
    np.testing.assert_array_equal(result.selected_a, [[9, 4, 4, 3], [0, 10, 0, 10]])
    np.testing.assert_array_equal(result.selected_b, [[3, 7, 6, 4], [3, 7, 3, 7]])
    np.testing.assert_allclose(result.risk_difference, [[0.6, -0.3, -0.2, -0.1], [-0.3, 0.3, -0.3, 0.3]])
    # Expert 0 at layer 2 is Newcombe's example (b), 9/10 − 3/10: 95% interval 0.1705 to 0.8090.
    low, high = result.interval
    assert (round(low[0, 0], 4), round(high[0, 0], 4)) == (0.1705, 0.8090)
    with_special = contrast.contrast([A1, A2], [B], include_special=True)
    assert (with_special.tokens_a, with_special.selected_a[0, 3]) == (12, 5)


@pytest.mark.parametrize("counts, published", [
    # Newcombe (1998), Statistics in Medicine 17:873-890, Table II, method 10.
    ((56, 70, 48, 80), (0.0524, 0.3339)),
    ((9, 10, 3, 10), (0.1705, 0.8090)),
    ((6, 7, 2, 7), (0.0582, 0.8062)),
    ((5, 56, 0, 29), (-0.0381, 0.1926)),
    ((0, 10, 0, 20), (-0.1611, 0.2775)),
    ((0, 10, 0, 10), (-0.2775, 0.2775)),
    ((10, 10, 0, 20), (0.6791, 1.0000)),
    ((10, 10, 0, 10), (0.6075, 1.0000)),
])
def test_newcombe_interval_matches_the_published_examples(counts, published):
    low, high = contrast.newcombe_interval(*counts)
    assert (round(float(low), 4), round(float(high), 4)) == published


def test_ranking_is_by_size_then_layer_then_expert():
    ranking = contrast.contrast([A1, A2], [B]).ranking()
    # |Δ| 0.6, then five exact ties at 0.3 (ordered by layer, expert), then 0.2 and 0.1.
    assert list(zip(ranking["layer"], ranking["expert"])) == [(2, 0), (2, 1), (4, 0), (4, 1), (4, 2), (4, 3), (2, 2),
                                                              (2, 3)]
    assert ranking["rank"].tolist() == list(range(1, 9))
    assert ranking["layer_label"].tolist()[:2] == ["layer 2", "layer 2"]
    assert ranking.loc[0, ["rate_a", "rate_b"]].tolist() == [0.9, 0.3]


def test_top_experts_take_one_sign_and_respect_the_per_layer_limit():
    result = contrast.contrast([A1, A2], [B])
    assert contrast.top_experts(result, 2, "A") == {2: [0], 4: [1]}
    assert contrast.top_experts(result, 9, "A") == {2: [0], 4: [1, 3]}  # only three experts favour A
    assert contrast.top_experts(result, 3, "B", per_layer=1) == {2: [1], 4: [0]}
    with pytest.raises(ValueError, match="favoured must be 'A' or 'B'"):
        contrast.top_experts(result, 1, "C")


def test_mismatched_or_empty_sets_are_refused():
    with pytest.raises(ValueError, match="at least one text in set A and one in set B"):
        contrast.contrast([], [B])
    with pytest.raises(ValueError, match="models with other layers or experts"):
        contrast.contrast([A1], [make_trace([[[0, 1]]])])
    only_bos = make_trace([[BOS], [BOS]], num_experts=4, layer_ids=[2, 4], special_ids=[0])
    with pytest.raises(ValueError, match="Set B has no tokens to count"):
        contrast.contrast([A1], [only_bos])


def test_set_effect_pools_the_predicted_tokens():
    effect = contrast.set_effect([np.log([0.5, 0.25]), np.log([0.5])], [np.log([0.25, 0.5]), np.log([1.0])])
    assert effect.mean_delta_logprob == pytest.approx(np.log(2) / 3)
    assert effect.perplexity_before == pytest.approx(16 ** (1 / 3))
    assert effect.perplexity_after == pytest.approx(2.0)
    assert effect.predicted_tokens == 3
    with pytest.raises(ValueError, match="no predicted tokens"):
        contrast.set_effect([np.zeros(0)], [np.zeros(0)])


def test_charts_read_back_with_named_columns_and_integer_ids():
    result = contrast.contrast([A1, A2], [B])
    table = charts.figure_table(contrast_charts.risk_difference_heatmap(result))
    assert list(table.columns) == ["expert", "layer", "risk_difference", "rate_a", "rate_b", "ci_low", "ci_high"]
    assert str(table["layer"].dtype) == str(table["expert"].dtype) == "Int64"
    row = table[(table["layer"] == 2) & (table["expert"] == 0)].iloc[0]
    assert row["risk_difference"] == pytest.approx(0.6) and round(row["ci_low"], 4) == 0.1705

    ranking = result.ranking()
    table = charts.figure_table(contrast_charts.top_experts_chart(ranking.head(3), result.confidence))
    assert list(table.columns) == ["rank", "risk_difference", "layer", "expert", "rate_a", "rate_b", "ci_low", "ci_high"]
    assert table[["rank", "layer", "expert"]].astype(int).values.tolist() == [[1, 2, 0], [2, 2, 1], [3, 4, 0]]
    pd.testing.assert_series_equal(table["ci_high"], ranking.head(3)["ci_high"], check_names=False)

    effect = contrast.SetEffect(-0.5, 2.0, 3.0, 10)
    table = charts.figure_table(contrast_charts.set_effect_chart({"Set A": effect, "Set B": effect}, "ablate"))
    assert table.to_dict("list") == {"set": ["Set A", "Set B"], "mean_delta_logprob": [-0.5, -0.5],
                                     "perplexity_before": [2.0, 2.0], "perplexity_after": [3.0, 3.0],
                                     "predicted_tokens": [10, 10]}


# -- the page ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return load_model(default_model_source())


def page_traces(model, names, max_tokens=None):
    return [trace_text(model.model, model.tokenizer, presets()[n], model_id=model.model_id,
                       max_tokens=max_tokens or limit(model)) for n in names]


CUT_AT = 512  # a sidebar token limit below the longer presets, so that some texts are cut


def figures(app) -> dict:
    return {pio.from_json(e.proto.spec).layout.title.text: pio.from_json(e.proto.spec) for e in app.get("plotly_chart")}


def test_page_ranks_experts_and_one_click_ablation_equals_intervene(model):
    app = run_page(PAGE, **{f"max_tokens-{limit(model)}": CUT_AT})  # the sidebar's token limit
    names_a, names_b = ["python", "c"], ["english", "german"]
    traces = page_traces(model, names_a, CUT_AT), page_traces(model, names_b, CUT_AT)
    expected = contrast.contrast(*traces)
    cut = sum(trace.truncated for trace in [*traces[0], *traces[1]])
    assert cut and any(c.value.startswith(f"{cut} texts cut at the token limit ({CUT_AT} tokens") for c in app.caption)
    shown = figures(app)
    heatmap = next(f for title, f in shown.items() if title.startswith("How much more often set A"))
    np.testing.assert_allclose(values(heatmap.data[0].z).reshape(expected.risk_difference.shape), expected.risk_difference, atol=1e-12)
    top = next(f for title, f in shown.items() if title.startswith("Experts with the largest difference"))
    ranking = expected.ranking().head(12)
    np.testing.assert_allclose(values(top.data[0].y), ranking["risk_difference"])
    assert any("Choose the experts above" in i.value for i in app.info)

    app.number_input(key="contrast_count").set_value(2)
    app.button(key="contrast_ablate").click().run()
    assert not app.exception, [e.message for e in app.exception]
    ablate = contrast.top_experts(expected, 2, "A", per_layer=expected.num_experts - expected.top_k)
    assert sum(map(len, ablate.values())) == 2
    assert app.subheader[-1].value == Intervention(ablate=ablate).describe()
    metrics = {m.label: m.value for m in app.metric}
    for label, names in (("Set A", names_a), ("Set B", names_b)):
        results = [moeviz.intervene(model, presets()[n], ablate=ablate, max_tokens=CUT_AT) for n in names]
        effect = contrast.set_effect([r.baseline_logprobs for r in results], [r.changed_logprobs for r in results])
        assert metrics[f"{label}: mean Δ log p of the next token"] == f"{effect.mean_delta_logprob:+.4f}"
        assert metrics[f"{label}: perplexity"] == f"{effect.perplexity_after:.3f}"
    bars = next(f for title, f in figures(app).items() if title.startswith("Mean change in log p"))
    assert list(bars.data[0].x) == ["Set A", "Set B"]

    app.button(key="contrast_force").click().run()  # the same experts, boosted
    assert not app.exception
    force = contrast.top_experts(expected, 2, "A", per_layer=expected.top_k)
    assert app.subheader[-1].value == Intervention(force=force).describe()


def test_page_takes_pasted_texts_and_says_when_a_set_is_empty(model):
    app = run_page(PAGE)
    app.multiselect(key="contrast_b_presets").set_value([]).run()
    assert any("Give each set at least one text" in i.value for i in app.info)
    pasted = ["Zwei Bier, bitte.", "Wo ist der Bahnhof?"]
    app.text_area(key="contrast_b_own").set_value(f"{pasted[0]}\n---\n{pasted[1]}\n").run()
    assert not app.exception, [e.message for e in app.exception]
    b = [trace_text(model.model, model.tokenizer, text, model_id=model.model_id, max_tokens=limit(model))
         for text in (pasted[0], pasted[1] + "\n")]
    tokens_b = sum(t.num_tokens - int(t.special.sum()) for t in b)
    assert any(c.value.endswith(f"set B: 2 texts, {tokens_b} tokens counted") for c in app.caption)
