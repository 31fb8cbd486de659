"""The Experts page under AppTest: the values it shows are the atlas the library computes for the
domain samples on the default model (its browser test is in test_e2e_browser.py, which owns the
one Playwright session)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from moeviz.analysis import atlas as atlases
from moeviz.model.capture import DEFAULT_MAX_TOKENS, trace_text
from moeviz.model.loading import load_model
from moeviz.model.tokens import context_length
from moeviz.ui import default_model_source, presets

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def samples_atlas(loaded) -> atlases.Atlas:
    """The atlas of the domain samples, special tokens of the default model left out."""
    limit = min(DEFAULT_MAX_TOKENS, context_length(loaded.model.config))  # the sidebar's default token limit
    traces = {domain: trace_text(loaded.model, loaded.tokenizer, text, model_id=loaded.model_id, max_tokens=limit)
              for domain, text in presets().items()}
    special = atlases.special_token_ids(default_model_source())
    return atlases.trace_atlas(traces, counted={d: atlases.counted_mask(t, special) for d, t in traces.items()})


@pytest.fixture(scope="module")
def expected() -> atlases.Atlas:
    return samples_atlas(load_model(default_model_source()))


def test_experts_page_shows_the_atlas_of_the_domain_samples(expected):
    app = AppTest.from_file(APP, default_timeout=300)
    app.run()
    app.switch_page("app_pages/experts.py")
    app.run()
    assert not app.exception, [e.message for e in app.exception]
    layers = app.dataframe[0].value  # balance per layer
    np.testing.assert_allclose(layers["MaxVio"], [layer.maxvio for layer in expected.layers])
    np.testing.assert_allclose(layers["Jain"], [layer.jain for layer in expected.layers])
    assert layers["tokens"].tolist() == [layer.tokens for layer in expected.layers]
    first = expected.layers[0]
    overview = app.dataframe[1].value  # all experts of the layer
    np.testing.assert_allclose(overview["load share"], [card.load_share for card in first.experts])
    assert overview["top tokens"].tolist() == [" ".join(repr(t.token) for t in card.top_tokens[:5])
                                               for card in first.experts]
    assert app.metric[1].value == f"{first.experts[0].count:,}"

    last = expected.layers[-1]
    app.select_slider(key=f"experts_layer-{expected.layer_ids}").set_value(last.layer).run()
    app.selectbox(key="experts_expert").set_value(3).run()
    assert not app.exception
    assert app.subheader[-2].value == f"Expert 3 · {last.label}"
    assert app.metric[0].value == f"{last.experts[3].load_share:.1%}"
