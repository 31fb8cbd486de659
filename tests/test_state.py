"""State that is never lost (issue 14, item 4): own text against presets, the source and an
uploaded trace across pages, and the view in the URL. Real app under AppTest."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from moeviz.model.capture import trace_text
from moeviz.model.loading import load_model
from moeviz.ui import OWN_TEXT, default_model_source, presets

APP = str(Path(__file__).resolve().parent.parent / "app.py")
OWN = "My own words about experts."


def run_app(**query) -> AppTest:
    app = AppTest.from_file(APP, default_timeout=300)
    app.query_params.update(query)
    app.run()
    assert not app.exception, [e.message for e in app.exception]
    return app


def test_editing_the_text_switches_the_preset_and_the_own_text_comes_back():
    app = run_app()
    assert app.selectbox(key="analyse_text_preset").value == "english"
    app.text_area(key="analyse_text").set_value(OWN).run()
    assert app.selectbox(key="analyse_text_preset").value == OWN_TEXT
    assert app.text_area(key="analyse_text").value == OWN
    assert "preset" not in app.query_params

    app.selectbox(key="analyse_text_preset").set_value("python").run()
    assert app.text_area(key="analyse_text").value == presets()["python"]
    assert app.query_params["preset"] == "python"
    app.selectbox(key="analyse_text_preset").set_value(OWN_TEXT).run()
    assert app.text_area(key="analyse_text").value == OWN  # not overwritten by the preset
    assert not app.exception


def test_text_and_source_survive_a_visit_to_another_page():
    app = run_app()
    app.text_area(key="analyse_text").set_value(OWN).run()
    app.switch_page("app_pages/compare_layers.py").run()
    app.switch_page("app_pages/analyse.py").run()
    assert app.text_area(key="analyse_text").value == OWN
    assert app.selectbox(key="analyse_text_preset").value == OWN_TEXT


@pytest.fixture(scope="module")
def trace_bytes():
    model = load_model(default_model_source())
    return trace_text(model.model, model.tokenizer, "Hello experts, hello routers.", model_id=model.model_id).to_bytes()


def test_uploaded_trace_survives_a_visit_to_another_page(trace_bytes):
    app = run_app()
    app.radio(key="analyse_text_source").set_value("Trace file").run()
    app.get("file_uploader")[0].set_value(("mine.safetensors", trace_bytes, "application/octet-stream"))
    app.run()
    assert any("opened from mine.safetensors" in c.value for c in app.caption)
    app.switch_page("app_pages/compare_layers.py").run()
    app.switch_page("app_pages/analyse.py").run()
    assert not app.exception
    assert app.radio(key="analyse_text_source").value == "Trace file"
    captions = [c.value for c in app.caption]
    assert any("Still open: mine.safetensors" in c for c in captions)
    assert any("opened from mine.safetensors" in c for c in captions)
    assert len(app.get("plotly_chart")) == 4


def test_a_link_reopens_the_preset_and_layer():
    app = run_app(preset="math", layer="3")
    assert app.selectbox(key="analyse_text_preset").value == "math"
    assert app.text_area(key="analyse_text").value == presets()["math"]
    assert app.select_slider[0].value == 3
    assert any(h.value.endswith("· layer 3") for h in app.subheader)
    app.select_slider[0].set_value(1).run()
    assert app.query_params["layer"] == "1"


def test_a_link_with_an_unknown_preset_or_layer_falls_back():
    app = run_app(preset="<script>", layer="99")
    assert app.selectbox(key="analyse_text_preset").value == "english"
    assert app.select_slider[0].value == 0


def view_state(app: AppTest) -> tuple[str, str]:
    """(layer index, pinned position) the routing view opens with, from its HTML."""
    [view] = app.get("iframe")
    return (re.search(r'data-layer="(-?\d+)"', view.proto.srcdoc)[1], re.search(r'data-pinned="(-?\d+)"', view.proto.srcdoc)[1])


def test_a_link_reopens_the_routing_views_layer_and_pinned_token():
    """The view writes ?view_layer=&token= itself as a person switches layers and pins a token
    (tests/test_e2e_browser.py); the server opens the view as the link says."""
    app = run_app(preset="math", view_layer="3", token="17")
    assert view_state(app) == ("3", "17")  # layer 3 is the fourth MoE layer of the bundled model


@pytest.mark.parametrize("layer, token", [("99", "100000"), ("-1", "x"), ("²", "١٧"), ("9" * 5000, "1e3")])
def test_a_link_with_a_view_that_does_not_fit_opens_the_default_view(layer, token):
    app = run_app(preset="math", view_layer=layer, token=token)
    assert view_state(app) == ("0", "-1")
