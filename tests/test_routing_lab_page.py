"""The Routing lab page under AppTest: its numbers equal `moeviz.analysis.policies` on the same trace.

Expected values come from the default model (whichever it is) run on the same preset with
`trace_text` (or from a hand-built trace file), then from `policies`, never from numbers
written down for one model.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import plotly.io as pio
import pytest
from factories import make_trace
from streamlit.testing.v1 import AppTest

from moeviz.analysis import metrics, policies
from moeviz.analysis.metrics import expert_capacity
from moeviz.model.capture import DEFAULT_MAX_TOKENS, trace_text
from moeviz.model.loading import load_model
from moeviz.model.tokens import context_length
from moeviz.ui import default_model_source, presets

TIMEOUT = 300
APP = str(Path(__file__).resolve().parent.parent / "app.py")
PAGE = "app_pages/routing_lab.py"


@pytest.fixture(scope="module")
def trace():
    """The tokens the lab routes: the app's trace of the preset at its default token limit,
    special tokens left out as the statistics leave them out."""
    loaded = load_model(default_model_source())
    limit = min(DEFAULT_MAX_TOKENS, context_length(loaded.model.config))
    return metrics.counted(trace_text(loaded.model, loaded.tokenizer, presets()["english"], max_tokens=limit))


def open_lab() -> AppTest:
    app = AppTest.from_file(APP, default_timeout=TIMEOUT)
    app.switch_page(PAGE)
    app.run()
    assert not app.exception, [e.message for e in app.exception]
    return app


def rerun(app: AppTest) -> None:
    app.run()
    assert not app.exception, [e.message for e in app.exception]


def _number(cell: str) -> float:
    return float(cell[:-1]) / 100 if cell.endswith("%") else float(cell)


def assert_table_matches(app: AppTest, model, policy, scores) -> None:
    """The page's comparison table against policies.py, to the precision it shows."""
    table = app.table[0].value
    assert list(table.columns) == [model.policy, policy.label]
    for column, assignment in zip(table.columns, (model, policy)):
        cells = table[column].tolist()
        expected = [
            policies.load_cv(policies.expert_load(assignment)),
            policies.balance_loss(assignment, scores),
            policies.dropped_token_share(assignment),
            policies.unrouted_token_share(assignment),
            policies.agreement(assignment, model),
        ]
        np.testing.assert_allclose([_number(c) for c in cells[:5]], expected, atol=6e-4)
        assert cells[5] == ("—" if assignment.capacity is None else str(assignment.capacity))


def figures(app: AppTest) -> dict:
    """The page's Plotly figures by title, with typed arrays decoded."""
    out = {}
    for element in app.get("plotly_chart"):
        fig = pio.from_json(element.proto.spec)
        out[fig.layout.title.text] = fig
    return out


def values(array) -> np.ndarray:
    """A data array from a figure spec: plain list, or Plotly's base64 typed array."""
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"])
    return np.asarray(array, dtype=float)


def token_views(app: AppTest) -> list[str]:
    return [element.proto.body for element in app.get("html")]


def test_default_policy_is_switch_capacity_with_its_sweep(trace):
    app = open_lab()
    assert any("replays the routing decision only" in i.value and "not recomputed" in i.value for i in app.info)
    layer = trace.layer_ids[0]
    scores, model = policies.layer_scores(trace, layer), policies.model_routing(trace, layer)
    policy = policies.top_k_capacity(scores, trace.top_k, 1.25, "token")
    assert_table_matches(app, model, policy, scores)

    charts = figures(app)
    load = charts["Expert load: share of tokens each expert processes"]
    np.testing.assert_allclose(values(load.data[0].y), policies.expert_load(model), rtol=1e-6)
    np.testing.assert_allclose(values(load.data[1].y), policies.expert_load(policy), rtol=1e-6)

    sweep = charts["Tokens dropped against capacity factor"]
    factors = values(sweep.data[0].x)
    assert factors[0] == 0.5 and factors[-1] == 3.0
    np.testing.assert_allclose(values(sweep.data[0].y), policies.capacity_sweep(model, factors))
    np.testing.assert_allclose(
        values(sweep.data[1].y), policies.capacity_sweep(model, factors, policies.batch_priority(scores))
    )
    np.testing.assert_allclose(values(sweep.data[2].x), [1.25, 2.0, 1.25, 2.0])
    at_125 = policies.capacity_sweep(model, [1.25])[0]
    capacity = policies.sweep_capacity(model, 1.25)  # the C beside the drop figure
    assert any(f"α = 1.25 (C = {capacity}): {at_125:.1%} dropped" in c.value for c in app.caption)

    model_view, policy_view = token_views(app)
    assert "moeviz-dropped" not in model_view and "moeviz-unrouted" not in model_view
    dropped_tokens = round(policies.dropped_token_share(policy) * trace.num_tokens)
    outlined = re.findall(r'<span class="moeviz-token[^"]*" title="[^"]*" style="[^"]*outline', policy_view)
    assert len(outlined) == dropped_tokens
    assert f"an assignment dropped ({dropped_tokens})" in policy_view


def _set_policy(app: AppTest, name: str) -> None:
    app.selectbox(key="lab_policy").set_value(name)
    rerun(app)


def test_score_order_capacity_on_the_last_layer(trace):
    app = open_lab()
    layer = trace.layer_ids[-1]
    if len(trace.layer_ids) > 1:
        app.select_slider[0].set_value(layer)
    app.slider(key=f"lab_k-{trace.num_experts}").set_value(1)
    app.slider(key="lab_alpha").set_value(1.0)
    app.radio(key="lab_order").set_value("score order (batch prioritized routing, V-MoE)")
    rerun(app)
    scores = policies.layer_scores(trace, layer)
    policy = policies.top_k_capacity(scores, 1, 1.0, "score")
    assert_table_matches(app, policies.model_routing(trace, layer), policy, scores)
    assert any(h.value.endswith(trace.layer_label(layer)) for h in app.subheader)
    unrouted = round(policies.unrouted_token_share(policy) * trace.num_tokens)
    assert token_views(app)[1].count("moeviz-unrouted") == unrouted


def test_expert_choice_gives_every_expert_c_tokens(trace):
    app = open_lab()
    _set_policy(app, "Expert choice")
    capacity = max(1, expert_capacity(trace.num_tokens, trace.num_experts, trace.top_k, 1.0) // 2)
    app.slider(key=f"lab_capacity-{trace.num_tokens}").set_value(capacity)
    rerun(app)
    layer = trace.layer_ids[0]
    scores = policies.layer_scores(trace, layer)
    policy = policies.expert_choice(scores, capacity)
    assert_table_matches(app, policies.model_routing(trace, layer), policy, scores)
    load = figures(app)["Expert load: share of tokens each expert processes"]
    np.testing.assert_allclose(values(load.data[1].y), capacity / trace.num_tokens, rtol=1e-6)
    per_token = figures(app)["Experts per token"]
    counts = policies.experts_per_token(policy)
    np.testing.assert_allclose(values(per_token.data[1].y)[: counts.size], counts / trace.num_tokens, rtol=1e-6)


def test_random_hash_ignores_the_router(trace):
    app = open_lab()
    _set_policy(app, "Hash")
    app.radio(key="lab_hash").set_value("fixed random hash")
    rerun(app)
    layer = trace.layer_ids[0]
    policy = policies.hash_routing(trace.token_ids, trace.num_experts, "random")
    assert_table_matches(app, policies.model_routing(trace, layer), policy, policies.layer_scores(trace, layer))


def test_bias_balancing_reports_its_final_bias(trace):
    app = open_lab()
    _set_policy(app, "Bias balancing (DeepSeek-V3)")
    app.select_slider(key="lab_gamma").set_value(0.03)
    app.select_slider(key="lab_chunk").set_value(8)
    rerun(app)
    layer = trace.layer_ids[0]
    scores = policies.layer_scores(trace, layer)
    policy = policies.bias_balancing(scores, trace.top_k, 0.03, 8)
    assert_table_matches(app, policies.model_routing(trace, layer), policy, scores)
    bias = figures(app)["Final bias per expert (added to the scores for selection only)"]
    np.testing.assert_allclose(values(bias.data[0].y), policy.bias)
    assert re.search(r"γ = 0\.03, chunk = 8", app.table[0].value.columns[1])


def test_a_trace_file_of_a_sigmoid_router_needs_no_model():
    # A hand-built DeepSeek-V3-like trace: sigmoid scores, one MoE layer (decoder layer 1).
    logits = np.random.default_rng(0).normal(size=(1, 12, 4)).astype(np.float32)
    topk = np.argsort(-logits, axis=-1)[..., :2]
    uploaded = make_trace(topk, logits, scoring="sigmoid", layer_ids=[1], num_layers=2)
    app = open_lab()
    app.radio(key="lab_text_source").set_value("Trace file")
    rerun(app)
    app.get("file_uploader")[0].set_value(("v3.safetensors", uploaded.to_bytes(), "application/octet-stream"))
    rerun(app)
    assert any("sigmoid" in c.value and "learnt bias" in c.value for c in app.caption)
    scores = policies.layer_scores(uploaded, 1)
    policy = policies.top_k_capacity(scores, 2, 1.25, "token")
    assert_table_matches(app, policies.model_routing(uploaded, 1), policy, scores)
