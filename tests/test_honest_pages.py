"""Pages say what they count (issue 13): special tokens left out unless the sidebar counts
them, one labelled load control, titles that name what is drawn, short and over-long texts
told apart from errors. Expected values come from `moeviz.analysis.metrics` on the trace the
app makes, never from numbers written down for one model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from test_app import (
    app_trace,
    counted_tokens,
    decode_plotly_array,
    limit,
    routing_payload,
    run_page,
    token_counts,
)

from moeviz.analysis import metrics
from moeviz.model.generation import STOP_REASONS, Sampling, trace_generation
from moeviz.model.loading import load_model
from moeviz.ui import default_model_source, presets

PAGES = ["app_pages/analyse.py", "app_pages/compare_layers.py", "app_pages/compare_prompts.py",
         "app_pages/domains.py", "app_pages/routing_lab.py"]


@pytest.fixture(scope="module")
def model():
    return load_model(default_model_source())


def figures(app: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in app.get("plotly_chart")]


def chart_values(app: AppTest, title_start: str) -> dict:
    """{series name: y values} of the figure whose title starts with `title_start`."""
    [fig] = [f for f in figures(app) if f["layout"]["title"]["text"].startswith(title_start)]
    return {series.get("name"): decode_plotly_array(series["y"]) for series in fig["data"]}


def token_limit(app: AppTest):
    [box] = [n for n in app.sidebar.number_input if n.label == "Token limit"]
    return box


# -- 4. special tokens ---------------------------------------------------------------------------


def test_one_character_text_counts_one_token_and_leaves_bos_out(model):
    app = run_page()
    app.text_area(key="analyse_text").set_value("a").run()
    trace = app_trace(model, "a")
    assert trace.special.tolist() == [True, False]  # <s>, "a"
    assert token_counts(app) == [1]
    assert any(c.value.startswith("1 token · 1 special token left out of the statistics") for c in app.caption)
    assert routing_payload(app)["left_out"] == [True, False]  # the routing view greys <s>
    assert any("at least two adjacent tokens" in i.value for i in app.info)  # no traceback, no statistics


def test_special_tokens_are_out_of_every_statistic_until_the_sidebar_counts_them(model):
    trace = app_trace(model, presets()["english"])
    index = trace.layer_index(trace.layer_ids[0])
    app = run_page()
    kept = metrics.counted(trace)
    loads = chart_values(app, "Share of tokens per expert")
    np.testing.assert_allclose(loads["load"], metrics.expert_load(kept, 1)[index])
    rates = chart_values(app, "Same expert")
    np.testing.assert_allclose(rates["same first choice"], metrics.repeat_rates(trace, include_special=False).same_first)
    balance = {m.label: m.value for m in app.metric}
    assert balance["Balance loss E·Σ f·P (balanced = k)"] == f"{metrics.balance_loss(kept)[index]:.3f}"
    assert balance["Mean router entropy (bits)"] == f"{metrics.router_entropy(kept)[index].mean():.3f}"

    app.sidebar.toggle(key="include_special").set_value(True).run()
    assert not app.exception and token_counts(app) == [trace.num_tokens]
    np.testing.assert_allclose(chart_values(app, "Share of tokens per expert")["load"], metrics.expert_load(trace, 1)[index])
    assert not any(routing_payload(app)["left_out"])
    assert {m.label: m.value for m in app.metric}["Balance loss E·Σ f·P (balanced = k)"] == \
        f"{metrics.balance_loss(trace)[index]:.3f}"


# -- 5. one meaning per word ------------------------------------------------------------------------


@pytest.mark.parametrize("page, key", [("app_pages/analyse.py", "load_choices"), ("app_pages/compare_layers.py", "layers_choices"),
                                       ("app_pages/compare_prompts.py", "prompts_choices"), ("app_pages/domains.py", "domains_choices")])
def test_load_is_counted_by_the_same_labelled_control_on_every_page(page, key):
    app = run_page(page)
    [control] = [r for r in app.radio if r.label == "Count load by"]
    assert control.options == ["first choice", "all top-2 picks"] and control.value == "first choice"
    titles = [f["layout"]["title"]["text"] for f in figures(app)]
    assert any(t.startswith("Share of tokens per expert, by first choice") for t in titles)
    control.set_value("all top-2 picks").run()
    assert not app.exception
    titles = [f["layout"]["title"]["text"] for f in figures(app)]
    assert any(t.startswith("Share of tokens per expert, counting all top-2 picks") for t in titles)


def test_compare_prompts_draws_one_chance_line_over_layer_names_and_loads_by_first_choice(model):
    app = run_page("app_pages/compare_prompts.py")
    traces = [app_trace(model, presets()[name]) for name in ("english", "python", "math")]
    layer = traces[0].layer_ids[0]
    loads = chart_values(app, "Share of tokens per expert")
    for name, trace in zip(("text 1", "text 2", "text 3"), traces):
        np.testing.assert_allclose(loads[name], metrics.expert_load(metrics.counted(trace), 1)[trace.layer_index(layer)])
    [repeats] = [f for f in figures(app) if f["layout"]["title"]["text"] == "Same expert for adjacent tokens"]
    assert [s["name"] for s in repeats["data"]] == ["text 1", "text 2", "text 3", "chance"]
    assert repeats["layout"]["xaxis"]["ticktext"] == [f"layer {n}" for n in traces[0].layer_ids]
    [js] = [f for f in figures(app) if f["data"][0]["type"] == "heatmap"]
    assert js["layout"]["title"]["text"] == "Jensen–Shannon divergence between expert loads (bits)"


def test_domains_js_heatmap_names_domains():
    app = run_page("app_pages/domains.py")
    [js] = [f for f in figures(app) if f["data"][0]["type"] == "heatmap"]
    assert js["layout"]["title"]["text"] == "Jensen–Shannon divergence between domains' expert loads (bits)"


def test_compare_layers_reports_transition_concentration_not_same_expert_ids(model):
    app = run_page("app_pages/compare_layers.py")
    trace = metrics.counted(app_trace(model, presets()["python"]))
    a, b = trace.layer_ids[0], trace.layer_ids[-1]
    share, floor = metrics.transition_concentration(
        metrics.layer_transitions(trace, trace.layer_index(a), trace.layer_index(b)))
    captions = [c.value for c in app.caption]
    assert not any("same first-choice expert" in c for c in captions)
    assert any(f"layer {a} → layer {b}: {share:.1%} (floor {floor:.1%})" in c for c in captions)


def test_routing_lab_says_why_capacity_leaves_the_balance_loss_unchanged():
    app = run_page("app_pages/routing_lab.py")
    app.slider(key="lab_alpha").set_value(0.5).run()
    assert not app.exception
    table = app.table[0].value
    assert "balance loss E·Σ f·P (f: choices, dropped ones too)" in table.index
    assert any("Capacity drops leave it unchanged" in c.value for c in app.caption)


# -- 6. short and long texts --------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_token_limit_one_gives_an_information_box_on_every_page(page):
    app = run_page(page)
    token_limit(app).set_value(1).run()
    assert not app.exception, [e.message for e in app.exception]
    assert not app.error
    assert any("at least two adjacent tokens" in i.value for i in app.info)


def test_default_token_limit_is_the_models_context_and_longer_texts_are_warned(model):
    context = model.model.config.max_position_embeddings
    app = run_page()
    assert token_limit(app).value == limit(model) == context  # the bundled model's trained positions
    assert not any("positions the model was trained on" in w.value for w in app.warning)
    over = context + 88
    token_limit(app).set_value(over).run()
    text = "\n\n".join(presets().values())  # all the samples together: longer than the context
    app.text_area(key="analyse_text").set_value(text).run()
    assert not app.exception
    trace = app_trace(model, text)
    assert trace.input_token_count > over  # the text is longer than the limit set
    assert token_counts(app) == [over - int(trace.special[:1].sum())]
    assert any(f"{over:,} tokens, more than the {context:,} positions the model was trained on" in w.value
               for w in app.warning)


# -- 7. generation --------------------------------------------------------------------------------------


def test_generation_says_why_it_stopped_and_leaves_its_special_tokens_out(model):
    app = run_page()
    app.radio(key="analyse_text_source").set_value("Generate from a prompt").run()
    app.number_input(key="analyse_text_new_tokens").set_value(3).run()
    assert not app.exception
    prompt = app.text_area(key="analyse_text_prompt").value
    expected = trace_generation(model.model, model.tokenizer, prompt, Sampling(max_new_tokens=3), max_tokens=limit(model))
    assert expected.stop_reason in ("eos", "max_new_tokens") and expected.special[0]  # BOS
    generated = expected.num_tokens - expected.generated_from
    assert f"it stopped because {STOP_REASONS[expected.stop_reason]}." in " ".join(c.value for c in app.caption)
    assert token_counts(app) == [counted_tokens(expected)]
    assert any(c.value.startswith(f"{generated} token") for c in app.caption)
