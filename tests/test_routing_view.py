"""The in-browser routing view's HTML: the data it embeds is the trace's, exactly, and token
text stays data (JSON inside a `<script type="application/json">`), never markup or script."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from factories import make_trace

from moeviz.model.capture import trace_text
from moeviz.views import routing_view
from moeviz.views.charts import character_runs, expert_colors
from moeviz.views.routing_view import CONTINUED, token_labels

HOSTILE = ["</script><script>alert(1)</script>", '<img src=x onerror="alert(1)">', "a&amp;b", "\u2028", "<!--", "\n"]
PAYLOAD = re.compile(r'<script type="application/json" id="moeviz-routing-data">(.*?)</script>', re.DOTALL)


def payload_of(page: str) -> dict:
    found = PAYLOAD.findall(page)
    assert len(found) == 1
    return json.loads(found[0])


@pytest.fixture()
def trace():
    """3 layers (ids 1, 2, 4: layer 3 dense), 6 hostile tokens, 4 experts, top-2, softmax."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 4)).astype(np.float32)
    ids = np.argsort(-logits, axis=-1)[..., :2].astype(np.int32)
    weights = rng.uniform(size=(3, 6, 2)).astype(np.float32)
    return make_trace(ids, logits, weights, layer_ids=[1, 2, 4], tokens=HOSTILE, token_ids=[5, 6, 7, 8, 9, 1],
                      special_ids=[1])


def test_payload_round_trips_the_trace_arrays(trace):
    data = payload_of(routing_view.routing_view_html(trace))
    np.testing.assert_array_equal(routing_view.read_typed_array(data["topk_ids"]), trace.topk_ids)
    np.testing.assert_array_equal(routing_view.read_typed_array(data["topk_weights"]), trace.topk_weights)
    np.testing.assert_array_equal(routing_view.read_typed_array(data["router_probs"]), trace.router_probs)
    assert data["tokens"] == HOSTILE
    assert data["token_ids"] == [5, 6, 7, 8, 9, 1]
    assert data["layer_ids"] == [1, 2, 4] and data["layer_labels"] == ["layer 1", "layer 2", "layer 4"]
    assert data["num_experts"] == 4 and data["top_k"] == 2
    assert data["colors"] == expert_colors(4)
    assert data["labels"][-1] == "↵"  # a whitespace token is drawn visibly, its text kept in "tokens"


def test_left_out_tokens_and_start_layer(trace):
    page = routing_view.routing_view_html(trace, layer_id=4, left_out=trace.special)
    assert payload_of(page)["left_out"] == [False] * 5 + [True]
    assert '<body data-layer="2" data-pinned="-1">' in page  # layer 4 is the third MoE layer, nothing pinned
    assert '<body data-layer="0" data-pinned="5">' in routing_view.routing_view_html(trace, pinned=5)
    with pytest.raises(ValueError, match="cannot pin token 6: the text has 6 tokens"):
        routing_view.routing_view_html(trace, pinned=6)
    with pytest.raises(ValueError, match="one flag per token"):
        routing_view.routing_payload(trace, left_out=[True])


def test_ids_only_trace_ships_no_scores():
    ids_only = make_trace([[[0, 1], [1, 0]]])
    ids_only = type(ids_only)(**{**ids_only.__dict__, "topk_weights": None, "router_logits": None, "engine": "vllm"})
    data = payload_of(routing_view.routing_view_html(ids_only))
    assert data["topk_weights"] is None and data["router_probs"] is None
    np.testing.assert_array_equal(routing_view.read_typed_array(data["topk_ids"]), [[[0, 1], [1, 0]]])


class Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.scripts = [], 0

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.scripts += tag == "script"


def test_hostile_tokens_stay_inert(trace):
    page = routing_view.routing_view_html(trace)
    assert page.count("</script>") == 2  # the data element's and the code's, nothing from a token
    assert "<img" not in page and "<!--" not in page and "\u2028" not in page
    parsed = Elements()
    parsed.feed(page)
    assert parsed.scripts == 2
    assert {tag for tag, _ in parsed.tags} == {"html", "head", "meta", "style", "body", "script", "div", "label",
                                              "input", "span", "h4", "canvas", "br", "button"}
    assert not any(name.startswith("on") for _, attrs in parsed.tags for name in attrs)


def test_height_grows_with_experts_and_layers_up_to_a_cap(trace):
    assert routing_view.routing_view_height(trace) == 40 + 330 + (14 * 4 + 100) + 24 + 60 + (30 * 3 + 30)
    wide = make_trace(np.zeros((40, 2, 1), dtype=np.int32), num_experts=512)
    assert routing_view.routing_view_height(wide) == 40 + 330 + 520 + 24 + 60 + 310


def test_byte_pieces_of_a_character_show_that_character(tiny_mixtral, tokenizer):
    """Chinese and an emoji split over byte-level pieces: the view shows the characters on a run's
    first piece and a dot on the others (each keeps its own routing); no raw bytes are shown."""
    trace = trace_text(tiny_mixtral, tokenizer, "今天 😀 ok")
    labels = token_labels(trace)
    runs = [(first, end, chars) for first, end, chars in character_runs(trace) if chars is not None]
    assert runs and any(r"\x" in token for token in trace.tokens)  # the tokenizer does split them
    assert not any(r"\x" in label for label in labels)
    assert "".join(label for label in labels if label != CONTINUED).replace("␣", " ").endswith("今天 😀 ok")
    for first, end, chars in runs:
        assert labels[first:end] == [chars] + [CONTINUED] * (end - first - 1)
    assert payload_of(routing_view.routing_view_html(trace))["labels"] == labels
