"""The Intervene page under AppTest, and its views: the numbers it shows equal
`run_intervention` and `moeviz.analysis.effects` on the same text and model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import plotly.io as pio
import pytest
from streamlit.testing.v1 import AppTest
from test_routing_lab_page import values

from moeviz.analysis import effects
from moeviz.model.capture import DEFAULT_MAX_TOKENS
from moeviz.model.interventions import Intervention, RoutingPolicy, run_intervention
from moeviz.model.loading import load_model
from moeviz.model.tokens import context_length
from moeviz.ui import default_model_source, presets
from moeviz.views import intervention_charts

APP = str(Path(__file__).resolve().parent.parent / "app.py")
PAGE = "app_pages/intervene.py"


@pytest.fixture(scope="module")
def expected():
    loaded = load_model(default_model_source())
    text = presets()["english"]
    limit = min(DEFAULT_MAX_TOKENS, context_length(loaded.model.config))  # the sidebar's default token limit
    return run_intervention(loaded.model, loaded.tokenizer, text, Intervention(ablate={0: [1]}, bias={0: {3: 2.5}}),
                            model_id=loaded.model_id, max_tokens=limit, continuation_tokens=12)


def test_page_shows_the_intervention_result(expected):
    app = AppTest.from_file(APP, default_timeout=300)
    app.switch_page(PAGE)
    app.run()
    assert not app.exception and any("Pick an intervention" in i.value for i in app.info)
    app.multiselect(key="intervene_ablate").set_value([1])
    app.selectbox(key="intervene_bias_expert").set_value(3)
    app.slider(key="intervene_bias").set_value(2.5).run()
    assert not app.exception, [e.message for e in app.exception]

    assert app.subheader[0].value == "ablate layer 0: 1 · bias layer 0: 3 +2.5"
    shown = {m.label: m.value for m in app.metric}
    assert shown["Perplexity before"] == f"{effects.perplexity(expected.baseline_logprobs):.3f}"
    assert shown["Perplexity after"] == f"{effects.perplexity(expected.changed_logprobs):.3f}"
    delta = expected.changed_logprobs - expected.baseline_logprobs
    assert shown["Mean Δ log p of the next token"] == f"{delta.mean():+.4f}"

    # The top-5 table opens at the position of the largest change.
    position = int(np.argmax(np.abs(delta)))
    table = app.table[0].value
    assert table["before: token"].tolist() == [repr(t) for t in expected.baseline_predictions.top_tokens[position]]
    assert table["after: p"].tolist() == [f"{p:.3f}" for p in np.exp(expected.changed_predictions.top_logprobs[position])]
    assert [c.value for c in app.code] == [intervention_charts.shown_continuation(c) for c in (
        expected.baseline_continuation, expected.changed_continuation)]

    html = next(e.proto.body for e in app.get("html") if "data-delta" in e.proto.body)
    np.testing.assert_allclose([float(d) for d in re.findall(r'data-delta="([-\d.]+)"', html)], delta, atol=1e-6)
    figures = {pio.from_json(e.proto.spec).layout.title.text: pio.from_json(e.proto.spec) for e in app.get("plotly_chart")}
    routing = figures["Tokens whose experts changed (orange: where the intervention acts)"].data[0]
    np.testing.assert_allclose(values(routing.y), effects.experts_changed(expected.baseline, expected.changed))
    assert values(routing.y)[0] > 0

    app.select_slider(key=f"intervene_position-{expected.baseline.num_tokens}").set_value(0).run()
    assert app.table[0].value["after: token"].tolist() == [repr(t) for t in expected.changed_predictions.top_tokens[0]]


def test_a_refused_intervention_is_an_error_and_the_page_stays_usable():
    app = AppTest.from_file(APP, default_timeout=300)
    app.switch_page(PAGE)
    app.run()
    app.multiselect(key="intervene_ablate").set_value([1, 2])
    app.multiselect(key="intervene_force").set_value([2]).run()
    assert not app.exception
    assert [e.value for e in app.error] == [
        "At layer 0 of mixtral (MixtralTopKRouter), expert 2 is both forced and ablated."]
    app.multiselect(key="intervene_force").set_value([3]).run()
    assert not app.error and app.subheader[0].value == "ablate layer 0: 1, 2 · force layer 0: 3"


def test_a_routing_policy_runs_in_the_forward_pass():
    """Hash routing at every MoE layer, chosen on the page: the numbers equal the library's."""
    loaded = load_model(default_model_source())
    text = presets()["english"]
    limit = min(DEFAULT_MAX_TOKENS, context_length(loaded.model.config))
    policy = RoutingPolicy("hash", hash_method="random")
    expected = run_intervention(loaded.model, loaded.tokenizer, text, Intervention(policy=policy),
                                model_id=loaded.model_id, max_tokens=limit, continuation_tokens=12)
    app = AppTest.from_file(APP, default_timeout=300)
    app.switch_page(PAGE)
    app.run()
    app.selectbox(key="intervene_policy").set_value("Hash").run()
    app.checkbox(key="intervene_policy_everywhere").check()
    app.radio(key="intervene_hash").set_value("fixed random hash").run()
    assert not app.exception, [e.message for e in app.exception]
    assert app.subheader[0].value == "hash (random) at every MoE layer"
    shown = {m.label: m.value for m in app.metric}
    assert shown["Perplexity after"] == f"{effects.perplexity(expected.changed_logprobs):.3f}"
    assert [c.value for c in app.code] == [intervention_charts.shown_continuation(c) for c in (
        expected.baseline_continuation, expected.changed_continuation)]
    figures = {pio.from_json(e.proto.spec).layout.title.text: pio.from_json(e.proto.spec) for e in app.get("plotly_chart")}
    routing = figures["Tokens whose experts changed (orange: where the intervention acts)"].data[0]
    np.testing.assert_allclose(values(routing.y), effects.experts_changed(expected.baseline, expected.changed))
    assert min(values(routing.y)) > 0.5  # a hash ignores the router almost everywhere
    assert set(routing.marker.color) == {intervention_charts.INTERVENED_COLOR}  # it acts at every layer


# -- the views ---------------------------------------------------------------------------------


def test_delta_token_view_escapes_and_colours_by_sign():
    tokens = ["<s>", " a", "</s>", "\n"]
    html = intervention_charts.delta_token_view_html(tokens, [-1.0, -2.0, -3.0], [-0.5, -2.0, -4.0])
    assert "<s>" not in html.replace("<span", "").replace("</span>", "") and "&lt;/s&gt;" in html
    assert re.findall(r'data-delta="([-\d.]+)"', html) == ["0.500000", "0.000000", "-1.000000"]
    assert "rgba(33,102,172,0.375)" in html and "rgba(178,24,43,0.750)" in html  # half and full strength
    with pytest.raises(ValueError, match="one log-probability per predicted token, 3 for 4 tokens"):
        intervention_charts.delta_token_view_html(tokens, [0.0], [0.0])


def test_continuations_show_their_newlines():
    assert intervention_charts.shown_continuation("\n\nab\n") == "↵\n↵\nab↵"
    assert intervention_charts.shown_continuation("no newline") == "no newline"


def test_charts_and_table_values():
    fig = intervention_charts.logprob_delta_chart(["a", "b", "c"], [-1.0, -2.0], [-1.5, -1.0])
    np.testing.assert_allclose(fig.data[0].y, [-0.5, 1.0])
    np.testing.assert_array_equal(fig.data[0].x, [1, 2])
    fig = intervention_charts.experts_changed_chart(["layer 0", "layer 1"], [0.0, 0.25], ["layer 1"])
    assert list(fig.data[0].marker.color) == [intervention_charts.OTHER_COLOR, intervention_charts.INTERVENED_COLOR]
    table = intervention_charts.top_predictions_table((["x", " y"], np.log([0.5, 0.25])), (["\n", "z"], np.log([0.9, 0.1])))
    assert table.to_dict("list") == {"before: token": ["'x'", "' y'"], "before: p": ["0.500", "0.250"],
                                     "after: token": ["'\\n'", "'z'"], "after: p": ["0.900", "0.100"]}


def test_the_intervention_waits_for_its_turn_on_the_model():
    """The intervention's forward passes go through the model's queue (issue 18): while another
    session holds the model, the run does not finish; once it is free, the result shows."""
    from test_app import run_behind_another_session

    from moeviz.ui import cached_queue

    app = AppTest.from_file(APP, default_timeout=300)
    app.switch_page(PAGE)
    app.run()  # the baseline trace is cached: the next run's only forward passes are the intervention's
    queue = cached_queue(default_model_source(), "auto", "auto", "auto")
    app.multiselect(key="intervene_ablate").set_value([2, 5])
    run_behind_another_session(app, queue, wait=20, finish=120)
    assert app.subheader[0].value == "ablate layer 0: 2, 5"
