"""Traces of expert ids only, as serving engines (vLLM, SGLang) report them: no router logits,
no weights. What is counted from ids works; what needs scores says so."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from streamlit.testing.v1 import AppTest

from moeviz.analysis import metrics
from moeviz.model.capture import trace_text
from moeviz.trace import IDS_ONLY, IdsOnlyError, RoutingTrace
from moeviz.views import charts
from tests.factories import make_trace

APP = str(Path(__file__).resolve().parent.parent / "app.py")
IDS = [[[0, 1], [1, 2], [1, 0], [3, 2]], [[2, 3], [2, 3], [0, 3], [0, 1]]]  # [layers 2, tokens 4, k 2]


def ids_only(trace: RoutingTrace, engine: str = "vllm") -> RoutingTrace:
    return dataclasses.replace(trace, router_logits=None, topk_weights=None, engine=engine)


@pytest.fixture
def hand_built():
    return ids_only(make_trace(IDS, num_experts=4))


def test_ids_only_trace_says_what_it_has(hand_built):
    assert not hand_built.has_logits and not hand_built.has_weights and hand_built.engine == "vllm"
    with pytest.raises(IdsOnlyError, match="expert ids only .* router probabilities need router logits"):
        hand_built.router_probs
    assert make_trace(IDS).has_logits and make_trace(IDS).has_weights


def test_ids_only_trace_still_checks_ids_shape():
    with pytest.raises(ValueError, match=r"topk_ids has shape"):
        dataclasses.replace(make_trace(IDS, num_experts=4), router_logits=None, topk_weights=None,
                            tokens=["a", "b", "c"], token_ids=[0, 1, 2], offsets=[(0, 1)] * 3)


def test_ids_only_trace_round_trips_none_exactly(hand_built, tmp_path):
    path = hand_built.save(tmp_path / "ids.safetensors")
    assert set(safetensors.numpy.load_file(path)) == {"topk_ids"}
    loaded = RoutingTrace.load(path)
    assert loaded.router_logits is None and loaded.topk_weights is None and loaded.engine == "vllm"
    np.testing.assert_array_equal(loaded.topk_ids, hand_built.topk_ids)
    assert loaded.tokens == hand_built.tokens and loaded.layer_ids == hand_built.layer_ids


def test_id_metrics_work_and_score_metrics_raise_the_clear_error(hand_built):
    full = make_trace(IDS, num_experts=4)
    np.testing.assert_allclose(metrics.expert_load(hand_built), metrics.expert_load(full))
    np.testing.assert_allclose(metrics.expert_load(hand_built, 1)[0], [0.25, 0.5, 0, 0.25])
    np.testing.assert_allclose(metrics.repeat_rates(hand_built).same_first, [1 / 3, 2 / 3])
    np.testing.assert_array_equal(metrics.coactivation(hand_built, 0), metrics.coactivation(full, 0))
    np.testing.assert_array_equal(metrics.layer_transitions(hand_built, 0, 1),
                                  [[0, 0, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_allclose(metrics.dropped_token_share(hand_built, 1.0), metrics.dropped_token_share(full, 1.0))
    for needs_scores in (metrics.router_entropy, metrics.balance_loss):
        with pytest.raises(IdsOnlyError, match=re.escape(IDS_ONLY)):
            needs_scores(hand_built)


def test_probability_heatmap_refuses_and_token_view_shows_ids_without_weights(hand_built):
    with pytest.raises(IdsOnlyError, match="router probabilities need router logits"):
        charts.probability_heatmap(hand_built, 0)
    view = charts.token_view_html(hand_built, 1)
    assert 'title="expert 2 · expert 3"' in view and ": 0." not in view
    assert 'title="expert 2: 0.50 · expert 3: 0.50"' in charts.token_view_html(make_trace(IDS, num_experts=4), 1)
    assert charts.transition_sankey(hand_built, [0, 1]).data[0].link.value == (1, 1, 1, 1)


# -- the Analyse page under AppTest ------------------------------------------------------------


def decode(value):
    """Plotly serialises numpy arrays as {"dtype", "bdata"} (base64) in figure JSON."""
    if isinstance(value, dict):
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        return array.reshape([int(n) for n in value["shape"].split(",")]) if "shape" in value else array
    return np.asarray(value)


def figures(app: AppTest) -> dict[str, dict]:
    specs = [json.loads(chart.proto.spec) for chart in app.get("plotly_chart")]
    return {spec["layout"]["title"]["text"]: spec for spec in specs}


@pytest.fixture(scope="module")
def engine_trace(tiny_mixtral, tokenizer):
    text = "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b"
    return ids_only(trace_text(tiny_mixtral, tokenizer, text, model_id="tiny-mixtral"), engine="sglang")


def test_analyse_page_shows_id_charts_and_a_notice_for_an_ids_only_trace(engine_trace):
    app = AppTest.from_file(APP, default_timeout=300)
    app.run()
    app.radio(key="analyse_text_source").set_value("Trace file").run()
    app.get("file_uploader")[0].set_value(("engine.safetensors", engine_trace.to_bytes(), "application/octet-stream"))
    app.run()
    assert not app.exception, [e.message for e in app.exception]
    assert not app.error

    notices = [info.value for info in app.info]
    assert any("router probability heatmap needs router logits" in n and "SGLang" in n for n in notices)
    assert any("balance loss and router entropy" in n for n in notices)
    assert any("Expert ids recorded by SGLang" in c.value for c in app.caption)

    shown = figures(app)
    layer = engine_trace.layer_ids[0]
    assert not any(title.startswith("Router scores") for title in shown)
    load = shown[f"Share of tokens per expert, by first choice · layer {layer}"]["data"][0]
    np.testing.assert_allclose(decode(load["y"]), metrics.expert_load(engine_trace, 1)[0])
    coactivation = shown["Experts chosen together"]["data"][0]
    np.testing.assert_array_equal(decode(coactivation["z"]), metrics.coactivation(engine_trace, 0))
    repeats = shown["Same expert for adjacent tokens"]["data"][0]
    np.testing.assert_allclose(decode(repeats["y"]), metrics.repeat_rates(engine_trace).same_first)
    capacity = metrics.trace_capacity(engine_trace, 1.25)  # the C beside the drop figure
    drops = {m.label: m.value for m in app.metric}[f"Tokens dropped at capacity factor 1.25 (C = {capacity} per expert)"]
    assert drops == f"{metrics.dropped_token_share(engine_trace, 1.25)[0]:.1%}"


def test_compare_layers_page_shows_transitions_from_an_ids_only_trace(engine_trace):
    app = AppTest.from_file(APP, default_timeout=300)
    app.run()
    app.switch_page("app_pages/compare_layers.py").run()
    app.radio(key="layers_text_source").set_value("Trace file").run()
    app.get("file_uploader")[0].set_value(("engine.safetensors", engine_trace.to_bytes(), "application/octet-stream"))
    app.run()
    assert not app.exception, [e.message for e in app.exception]
    sankey = figures(app)["First-choice expert from layer to layer"]["data"][0]
    first, last = engine_trace.layer_ids[0], engine_trace.layer_ids[-1]
    expected = metrics.layer_transitions(engine_trace, 0, len(engine_trace.layer_ids) - 1)
    assert sum(sankey["link"]["value"]) == engine_trace.num_tokens == expected.sum()
    assert any(f"layer {first} → layer {last}" in c.value for c in app.caption)


def test_routing_lab_gives_a_notice_for_an_ids_only_trace(engine_trace):
    app = AppTest.from_file(APP, default_timeout=300)
    app.run()
    app.switch_page("app_pages/routing_lab.py").run()
    app.radio(key="lab_text_source").set_value("Trace file").run()
    app.get("file_uploader")[0].set_value(("engine.safetensors", engine_trace.to_bytes(), "application/octet-stream"))
    app.run()
    assert not app.exception, [e.message for e in app.exception]
    assert any("routing lab" in i.value and "needs router logits" in i.value for i in app.info)
