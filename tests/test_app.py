"""Every page runs headless under AppTest on the default model and shows real numbers."""

from __future__ import annotations

import base64
import gc
import json
import re
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from moeviz.analysis import metrics
from moeviz.model.capture import DEFAULT_MAX_TOKENS, trace_text
from moeviz.model.generation import STOP_REASONS, Sampling, trace_generation
from moeviz.model.loading import load_model
from moeviz.model.tokens import context_length
from moeviz.ui import default_model_source, presets
from moeviz.views.routing_view import read_typed_array

TIMEOUT = 300
APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture(scope="module")
def model():
    return load_model(default_model_source())


def run_page(page: str | None = None, **state) -> AppTest:
    """The app run headless, on `page` (default: the first), with session `state` set first."""
    app = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for key, value in state.items():
        app.session_state[key] = value
    app.run()
    if page:
        app.switch_page(page)
        app.run()
    assert not app.exception, [e.message for e in app.exception]
    return app


def run_behind_another_session(app: AppTest, queue, wait: float, finish: float) -> None:
    """Run `app` while another session holds `queue`'s turn on the model: the run must wait in
    the queue (within `wait` seconds) and, once the model is free, finish (within `finish`)."""
    import threading
    import time

    release, holding = threading.Event(), threading.Event()

    def other_session():
        with queue.turn():
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=other_session)
    holder.start()
    assert holding.wait(10)
    runner = threading.Thread(target=app.run)
    runner.start()
    deadline = time.monotonic() + wait
    while queue.waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert queue.waiting == 1 and runner.is_alive()  # the run waits in the queue
    release.set()
    runner.join(finish)
    holder.join(5)
    assert not runner.is_alive() and not app.exception and queue.waiting == 0


def token_counts(app: AppTest) -> list[int]:
    """The counted tokens each trace's summary line gives ("1 token · ...", "511 tokens · ...")."""
    captions = [c.value for c in app.caption]
    return [int(m.group(1).replace(",", "")) for c in captions if (m := re.match(r"([\d,]+) tokens? · ", c))]


def limit(model) -> int:
    """The app's default token limit: the model's trained context, at most 2,048."""
    return min(DEFAULT_MAX_TOKENS, context_length(model.model.config))


def app_trace(model, text: str):
    """The trace the app makes of `text` at its default token limit."""
    return trace_text(model.model, model.tokenizer, text, model_id=model.model_id, max_tokens=limit(model))


def counted_tokens(trace) -> int:
    return trace.num_tokens - int(trace.special.sum())


def test_analyse_page_shows_the_token_count_of_the_preset(model):
    app = run_page()
    expected = counted_tokens(app_trace(model, presets()["english"]))
    assert token_counts(app) == [expected]
    assert app.text_area(key="analyse_text").value == presets()["english"]


def test_analyse_page_follows_typed_text_and_layer_slider(model):
    app = run_page()
    text = "<script>alert(1)</script> hello world"
    app.text_area(key="analyse_text").set_value(text).run()
    assert not app.exception
    trace = app_trace(model, text)
    assert token_counts(app) == [counted_tokens(trace)]
    slider = app.select_slider[0]
    slider.set_value(trace.layer_ids[-1]).run()
    assert not app.exception
    assert any(f"layer {trace.layer_ids[-1]}" in h.value for h in app.subheader)


def routing_payload(app: AppTest) -> dict:
    """The data the Analyse page's routing view carries to the browser."""
    [view] = app.get("iframe")
    return json.loads(re.search(r'id="moeviz-routing-data">(.*?)</script>', view.proto.srcdoc, re.DOTALL)[1])


def test_analyse_page_ships_every_layer_to_the_routing_view(model):
    app = run_page()
    trace = app_trace(model, presets()["english"])
    data = routing_payload(app)
    assert data["tokens"] == trace.tokens and data["layer_ids"] == trace.layer_ids
    np.testing.assert_array_equal(read_typed_array(data["topk_ids"]), trace.topk_ids)
    np.testing.assert_allclose(read_typed_array(data["router_probs"]), trace.router_probs, atol=1e-5)
    assert data["left_out"] == trace.special.tolist()  # BOS grey: the statistics leave it out


def test_the_routing_view_is_not_kept_once_the_page_has_drawn_it():
    """Issue 18: `st.iframe` asks `urlparse` whether the view's HTML is a URL, and `urlsplit`
    caches the last 128 strings it split, with their parts: a server kept every routing view
    it drew. After the Analyse page ran, no split of its HTML is alive."""
    urlsplit.cache_clear()
    app = run_page()
    [view] = app.get("iframe")
    assert len(view.proto.srcdoc) > 10_000  # the whole view, with every layer's data
    gc.collect()
    kept = [split for split in gc.get_objects() if type(split) is SplitResult and max(map(len, split)) > 10_000]
    assert kept == []


def test_leaving_the_queue_stops_the_page_and_the_next_run_queues_again():
    """What the "Leave the queue" button does (its callback sets QUEUE_LEFT, then Streamlit
    reruns): the page stops before its forward pass and says why; the next run traces."""
    from moeviz.ui import QUEUE_LEFT

    app = AppTest.from_file(APP, default_timeout=300)
    app.run()
    app.text_area(key="analyse_text").input("a text no other test analyses: leave the queue, then come back")
    app.session_state[QUEUE_LEFT] = True
    app.run()
    assert not app.exception
    assert [i.value for i in app.info if i.value.startswith("You left the queue for the model")]
    assert not any(" tokens · " in c.value for c in app.caption)
    app.run()
    assert any(" tokens · " in c.value for c in app.caption)
    assert not any("You left the queue" in i.value for i in app.info)
    # A press that came too late (the text was already traced) means nothing for later runs.
    app.session_state[QUEUE_LEFT] = True
    app.run()
    app.text_area(key="analyse_text").input("another text no other test analyses: after a late press").run()
    assert any(" tokens · " in c.value for c in app.caption) and not app.exception


def test_empty_text_gives_a_hint_not_an_error():
    app = run_page()
    app.text_area(key="analyse_text").set_value("   \n ").run()
    assert not app.exception and not app.error
    assert any("Paste or type some text" in i.value for i in app.info)


def test_compare_layers_page(model):
    app = run_page("app_pages/compare_layers.py")
    expected = counted_tokens(app_trace(model, presets()["python"]))
    assert token_counts(app) == [expected]
    assert any("transitions" in h.value for h in app.subheader)


def test_compare_prompts_page(model):
    app = run_page("app_pages/compare_prompts.py")
    expected = [counted_tokens(app_trace(model, presets()[name])) for name in ("english", "python", "math")]
    assert token_counts(app) == expected
    assert any("Jensen" in h.value for h in app.subheader)


def test_missing_model_is_reported_and_the_app_keeps_running(tmp_path):
    app = run_page()
    app.sidebar.text_input(key="model_source").set_value(str(tmp_path / "no-model")).run()
    assert not app.exception
    assert any("No model directory" in e.value for e in app.error)


def plotly_specs(app: AppTest) -> list[str]:
    return [chart.proto.spec for chart in app.get("plotly_chart")]


def test_uploaded_trace_file_reproduces_the_same_charts(model):
    text_app = run_page()
    trace = app_trace(model, presets()["english"])

    file_app = run_page()
    file_app.radio(key="analyse_text_source").set_value("Trace file").run()
    file_app.get("file_uploader")[0].set_value(("english.safetensors", trace.to_bytes(), "application/octet-stream"))
    file_app.run()
    assert not file_app.exception
    assert token_counts(file_app) == [counted_tokens(trace)]
    specs = plotly_specs(file_app)
    assert len(specs) == 4 and specs == plotly_specs(text_app)


def test_malformed_trace_file_is_reported_and_the_app_keeps_running():
    app = run_page()
    app.radio(key="analyse_text_source").set_value("Trace file").run()
    app.get("file_uploader")[0].set_value(("broken.safetensors", b"\x10\x00\x00\x00garbage", "application/octet-stream"))
    app.run()
    assert not app.exception
    assert any("broken.safetensors" in e.value and "not a moeviz trace" in e.value for e in app.error)
    app.radio(key="analyse_text_source").set_value("Text").run()
    assert not app.exception and token_counts(app)


def test_generation_mode_marks_generated_tokens(model):
    app = run_page()
    app.radio(key="analyse_text_source").set_value("Generate from a prompt").run()
    app.number_input(key="analyse_text_new_tokens").set_value(5).run()
    assert not app.exception
    prompt = app.text_area(key="analyse_text_prompt").value
    expected = trace_generation(model.model, model.tokenizer, prompt, Sampling(max_new_tokens=5), max_tokens=limit(model))
    generated = expected.num_tokens - expected.generated_from  # fewer than 5 if it ends the text
    assert any(c.value == f"{generated} token{'' if generated == 1 else 's'} generated (marked in the charts); "
               f"it stopped because {STOP_REASONS[expected.stop_reason]}." for c in app.caption)
    # The routing view underlines the tokens from generated_from on.
    assert routing_payload(app)["generated_from"] == expected.generated_from


def test_domains_page_shows_fig7_loads_and_table5_rates(model):
    app = run_page("app_pages/domains.py")
    traces = {d: app_trace(model, text) for d, text in presets().items()}
    summary = next(c.value for c in app.caption if c.value.endswith("tokens") and "domains" in c.value)
    for domain, trace in traces.items():
        assert f"{domain}: {counted_tokens(trace):,} tokens" in summary

    [loads_spec] = [json.loads(c.proto.spec) for c in app.get("plotly_chart")][:1]
    first_layer = next(iter(traces.values())).layer_ids[0]
    bars = {bar["name"]: bar["y"] for bar in loads_spec["data"] if bar["type"] == "bar"}
    for domain, trace in traces.items():
        expected = metrics.expert_load(metrics.counted(trace), 1)[trace.layer_index(first_layer)]
        assert np.allclose(decode_plotly_array(bars[domain]), expected)

    table = app.dataframe[0].value
    english = traces["english"]
    rates = metrics.repeat_rates(english, include_special=False)
    row = table[(table.domain == "english") & (table.layer == english.layer_ids[-1])].iloc[0]
    assert row["same first choice"] == pytest.approx(rates.same_first[-1])
    assert row["any shared expert"] == pytest.approx(rates.any_shared[-1])


def decode_plotly_array(value):
    """Plotly serialises numpy arrays as {"dtype", "bdata"} (base64) in figure JSON."""
    if isinstance(value, dict):
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
    return np.asarray(value)


def test_layer_charts_name_their_layer_in_their_csv(model):
    """Expert load and co-activation are one layer's: their figures carry the layer, which
    `charts.figure_table` makes a column of their CSV and `figure_file_name` puts in its name
    (issue 14, item 5)."""
    import plotly.graph_objects as go

    from moeviz.ui import figure_file_name

    app = run_page()
    trace = app_trace(model, presets()["english"])
    layer = trace.layer_ids[-1]
    app.select_slider[0].set_value(layer).run()
    specs = {c.proto.id: json.loads(c.proto.spec) for c in app.get("plotly_chart")}
    for key in ("expert_load", "coactivation"):
        spec = next(s for i, s in specs.items() if key in i)
        assert spec["layout"]["meta"] == {"layer": layer, "layer_label": trace.layer_label(layer)}
        assert figure_file_name(go.Figure(layout=spec["layout"]), key) == f"{key}-layer-{layer}.csv"
