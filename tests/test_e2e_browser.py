"""The app as a person uses it: the real server (`streamlit run`), Debian's Chromium driven by
Playwright, text pasted and sliders moved, and what the page shows compared with what the
library computes for the same text, on the default model. Screenshots land in test-artifacts/.
The machinery (server, browser, a tab that waits for its runs) is in browser.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd
import pytest
import safetensors.numpy
from browser import ARTIFACTS, AppFailed, AppPage, chromium, running_app
from hostile import BLANK_TEXTS, HOSTILE_TEXTS, long_text
from transformers import LlamaConfig, LlamaForCausalLM

import moeviz
import moeviz.ui
from moeviz.analysis import contrast, metrics
from moeviz.model.capture import DEFAULT_MAX_TOKENS, trace_text
from moeviz.model.interventions import Intervention
from moeviz.model.loading import load_model
from moeviz.model.tokens import context_length
from moeviz.trace import RoutingTrace
from moeviz.ui import default_model_source, presets
from moeviz.views import charts
from moeviz.views.routing_view import routing_payload

pytestmark = pytest.mark.e2e

SESSIONS = 8


# -- the server and the browser --------------------------------------------------------------


@pytest.fixture(scope="session")
def model():
    return load_model(default_model_source())


@pytest.fixture(scope="session")
def server() -> str:
    """The app on the environment's default model (MOEVIZ_MODEL, else the bundled one)."""
    log = ARTIFACTS / "server.log"
    try:
        with running_app(log) as url:
            yield url
    except AppFailed as error:
        pytest.fail(str(error))
    errors = [line for line in log.read_text(errors="replace").splitlines() if "Traceback" in line]
    assert not errors, f"the server logged errors (see {log}): {errors[:5]}"


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    try:
        with chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
            yield context
    except AppFailed as error:
        pytest.fail(str(error))


@pytest.fixture()
def tab(browser, server):
    page = browser.new_page()
    app = AppPage(page, server)
    yield app
    app.assert_inert()
    page.close()


# -- expected values, from the library ------------------------------------------------------------


def app_limit(model) -> int:
    """The app's default token limit: the model's trained context, at most 2,048."""
    return min(DEFAULT_MAX_TOKENS, context_length(model.model.config))


def expected_trace(model, text: str) -> RoutingTrace:
    return trace_text(model.model, model.tokenizer, text, model_id=model.model_id, max_tokens=app_limit(model))


def counted_tokens(trace: RoutingTrace) -> int:
    """The tokens the statistics count: special ones (BOS) are left out by default."""
    return trace.num_tokens - int(trace.special.sum())


def rgb(color: str) -> str:
    return "rgb({}, {}, {})".format(*(int(color[i : i + 2], 16) for i in (1, 3, 5)))


def assert_view_shows(app: AppPage, trace: RoutingTrace) -> int:
    """The routing view shows every token of `trace` (special ones grey), coloured by its first
    choice in the layer the view is on; returns that layer's index."""
    index = int(app.routing_view().evaluate("() => document.body.dataset.shown"))
    shown = app.token_view()
    assert [text for text, _ in shown] == routing_payload(trace)["labels"]  # a span per token (tests/test_routing_view.py checks the labels)
    colors = charts.expert_colors(trace.num_experts)
    assert [color for _, color in shown] == [rgb("#e8e8e8") if special else rgb(colors[e])
                                             for e, special in zip(trace.first_choice[index], trace.special)]
    return index


def assert_routing_shown(app: AppPage, trace: RoutingTrace, layer: int) -> None:
    """The Analyse page shows `trace` at `layer`: token view (special tokens grey), router
    scores, expert load (special tokens left out)."""
    index = trace.layer_index(layer)
    assert app.token_counts() == [counted_tokens(trace)]
    assert any(heading.endswith(f"· layer {layer}") for heading in app.subheaders())

    assert_view_shows(app, trace)

    figures = app.figures()
    scores, chosen = figures["probabilities"]
    np.testing.assert_allclose(scores["z"], trace.router_probs[index].T, atol=1e-4)
    np.testing.assert_array_equal(chosen["y"], trace.topk_ids[index].reshape(-1))
    if counted_tokens(trace) >= 2:
        bars = figures["expert_load"][0]
        np.testing.assert_allclose(bars["y"], metrics.expert_load(metrics.counted(trace), 1)[index], atol=1e-9)


# -- pages -------------------------------------------------------------------------------------------


def test_analyse_page_shows_the_routing_of_the_default_preset(tab, model):
    tab.open()
    trace = expected_trace(model, presets()["english"])
    assert tab.text_value("analyse_text") == presets()["english"]
    assert_routing_shown(tab, trace, trace.layer_ids[0])
    shares = tab.routing_view().locator("#load > span:nth-child(3n)").all_inner_texts()
    assert shares == [f"{100 * share:.1f}%" for share in metrics.expert_load(metrics.counted(trace), 1)[0]]
    with tab.page.expect_download() as download:  # the chart's data as a CSV file
        tab.page.locator(".st-key-expert_load_csv button").click()
    table = pd.read_csv(download.value.path())
    layer = trace.layer_ids[0]
    assert download.value.suggested_filename == f"expert_load-layer-{layer}.csv"
    assert table.columns.tolist() == ["layer", "layer_label", "expert", "expert_load"]
    assert table.expert.tolist() == list(range(trace.num_experts)) and set(table.layer) == {layer}
    np.testing.assert_allclose(table.expert_load, metrics.expert_load(metrics.counted(trace), 1)[0], atol=1e-9)
    tab.screenshot("analyse")


def test_pasted_text_and_layer_slider(tab, model, server):
    tab.page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server)
    tab.open()
    text = presets()["python"][:600] + "\nIch kopiere auch etwas Deutsch hinein: Grüße! 👋"
    tab.paste_text("analyse_text", text)
    assert tab.text_value("analyse_text") == text
    trace = expected_trace(model, text)
    assert_routing_shown(tab, trace, trace.layer_ids[0])

    slider = tab.page.get_by_role("slider", name="Layer")
    tab.act(lambda: slider.press("End"))
    assert_routing_shown(tab, trace, trace.layer_ids[-1])
    if len(trace.layer_ids) > 2:
        tab.act(lambda: slider.press("ArrowLeft"))
        assert_routing_shown(tab, trace, trace.layer_ids[-2])
    tab.screenshot("analyse-pasted-text-last-layers")


def test_routing_view_switches_layers_in_the_browser(tab, model):
    """The routing view's own slider and arrow keys switch layers with no script run; hover
    shows a token's path across layers, a click pins its top-k and router distribution in every
    layer, and search marks the tokens containing a string."""
    tab.open()
    trace = expected_trace(model, presets()["english"])
    runs = tab.finished
    view = tab.routing_view()
    colors = charts.expert_colors(trace.num_experts)
    positions = [1, 2, 7, trace.num_tokens - 1]

    def first_choices_shown() -> list[str]:
        return [view.locator("#tokens .tok").nth(t).evaluate("span => getComputedStyle(span).backgroundColor")
                for t in positions]

    last = len(trace.layer_ids) - 1
    assert tab.view_layer("End") == last
    assert view.locator("#layer-name").inner_text() == trace.layer_label(trace.layer_ids[-1])
    assert first_choices_shown() == [rgb(colors[e]) for e in trace.first_choice[last, positions]]
    assert assert_view_shows(tab, trace) == last
    assert tab.view_layer("ArrowLeft") == last - 1
    assert first_choices_shown() == [rgb(colors[e]) for e in trace.first_choice[last - 1, positions]]
    view.locator("#tokens").click(position={"x": 1, "y": 1})  # the arrow keys work anywhere in the view
    view.locator("body").press("ArrowLeft")
    view.wait_for_function(f"() => document.body.dataset.shown === '{last - 2}'")
    assert first_choices_shown() == [rgb(colors[e]) for e in trace.first_choice[last - 2, positions]]
    assert tab.finished == runs  # not one script run on the server

    token = view.locator("#tokens .tok").nth(7)
    token.hover()
    path = view.locator("#path .chip").all_inner_texts()
    assert path == [f"{trace.layer_label(n)}: e{trace.first_choice[i, 7]}" for i, n in enumerate(trace.layer_ids)]
    token.click()
    head = view.locator(".pinned-head").inner_text()
    assert head.startswith(f"Pinned: position 7 · token id {trace.token_ids[7]} · text {json.dumps(trace.tokens[7])}")
    for index, line in enumerate(view.locator(".layer-detail").all()):
        picks = [chip.split() for chip in line.locator(".chip").all_inner_texts()]
        assert [int(e[1:]) for e, _ in picks] == trace.topk_ids[index, 7].tolist()
        np.testing.assert_allclose([float(w) for _, w in picks], trace.topk_weights[index, 7], atol=5e-4)
        bars = line.locator(".dist span").evaluate_all("bars => bars.map(bar => bar.title)")
        np.testing.assert_allclose([float(b.split(": ")[1]) for b in bars], trace.router_probs[index, 7], atol=5e-4)

    view.locator("#search").fill("the")
    hits = view.locator("#tokens .tok.hit").evaluate_all("spans => spans.map(span => +span.dataset.pos)")
    assert hits == [t for t, token in enumerate(trace.tokens) if "the" in token.lower()] and hits
    assert view.locator("#matches").inner_text() == f"{len(hits)} tokens match"
    assert tab.finished == runs


LINK_MARK = """key => {
    const gd = document.querySelector(`.st-key-${key} .js-plotly-plot`);
    const mark = gd.querySelector('.moeviz-link'), area = gd.querySelector('.nsewdrag').getBoundingClientRect();
    const [r0, r1] = gd.layout.xaxis.range;
    return {x: +mark.dataset.x, left: mark.getBoundingClientRect().left + 1,
            expected: area.left + (+mark.dataset.x - r0) / (r1 - r0) * area.width};
}"""


def test_hovering_a_token_marks_its_column_and_first_choice_in_the_page_charts(tab, model):
    """Linked views: a token hovered in the routing view is marked in the Plotly charts below,
    at its column of the probability heatmap and at the bar of its first choice in the load
    chart's layer (the charts' slider, here the first MoE layer), where each chart draws them."""
    tab.open()
    trace = expected_trace(model, presets()["english"])
    runs = tab.finished
    view = tab.routing_view()
    for position in (7, 30):
        view.locator("#tokens .tok").nth(position).hover()
        heat = tab.page.evaluate(LINK_MARK, "probabilities")
        assert heat["x"] == position and abs(heat["left"] - heat["expected"]) < 1.5, heat
        load = tab.page.evaluate(LINK_MARK, "expert_load")
        assert load["x"] == trace.first_choice[0, position] and abs(load["left"] - load["expected"]) < 1.5, load
    assert tab.finished == runs  # no script run


def test_overview_strip_moves_the_heatmap_window_and_zoom_resizes_it(tab, model):
    """The strip under the heatmap is the whole text: a click centres the window there, a drag
    follows the mouse, and zoom out shows more tokens, narrower, around the same centre."""
    tab.open()
    trace = expected_trace(model, presets()["english"])
    view = tab.routing_view()

    def window() -> tuple[int, int]:
        start, end = view.evaluate("() => document.body.dataset.window").split("-")
        return int(start), int(end)

    start, end = window()
    size = end - start + 1
    assert start == 0 and 16 <= size < trace.num_tokens
    strip = view.locator("#overview")
    strip.scroll_into_view_if_needed()
    box = strip.bounding_box()
    inner = box["width"] - 60  # the strip's first 60 px hold its label

    def token_at(fraction: float) -> float:
        return fraction * trace.num_tokens

    strip.click(position={"x": 60 + inner * 0.5, "y": 9})
    start, end = window()
    assert abs((start + end + 1) / 2 - token_at(0.5)) <= 1
    title = view.locator("#heat-title").inner_text()
    assert title.endswith(f"tokens {start}–{end}")
    box = strip.bounding_box()
    view.page.mouse.move(box["x"] + 60 + inner * 0.2, box["y"] + 9)
    view.page.mouse.down()
    view.page.mouse.move(box["x"] + 60 + inner * 0.7, box["y"] + 9, steps=5)
    view.page.mouse.up()
    start, end = window()
    assert abs((start + end + 1) / 2 - token_at(0.7)) <= 1
    centre = (start + end + 1) / 2
    view.locator("#zoom-out").click()
    start, end = window()
    wider = end - start + 1  # 8 px columns instead of 12 over the same width: 1.5 times the tokens
    assert wider == trace.num_tokens or size * 3 // 2 <= wider <= (size + 1) * 3 // 2
    assert abs((start + end + 1) / 2 - centre) <= 1 and start <= centre <= end
    view.locator("#zoom-in").click()
    view.locator("#zoom-in").click()
    assert window()[1] - window()[0] + 1 < size  # 16 px columns: fewer tokens than at first
    assert tab.page.locator('[data-testid="stException"]').count() == 0


def test_a_link_reopens_the_routing_view_as_it_was(tab, model):
    """Switching the view's layer and pinning a token write ?view_layer=&token= into the page's
    URL (no script run); that URL opened anew shows the same layer and pinned token."""
    tab.open()
    trace = expected_trace(model, presets()["english"])
    runs = tab.finished
    view = tab.routing_view()
    layer = tab.view_layer("End")
    view.locator("#tokens .tok").nth(9).click()
    query = parse_qs(urlsplit(tab.page.url).query)
    assert query["view_layer"] == [str(trace.layer_ids[layer])] and query["token"] == ["9"]
    assert tab.finished == runs

    tab.act(lambda: tab.page.goto(tab.page.url))
    view = tab.routing_view()
    assert view.evaluate("() => document.body.dataset.shown") == str(layer)
    assert view.locator(".pinned-head").inner_text().startswith(f"Pinned: position 9 · token id {trace.token_ids[9]}")
    assert view.locator("#tokens .tok.pinned").evaluate("span => +span.dataset.pos") == 9
    view.locator("#tokens .tok").nth(9).click()  # unpinned: the token leaves the URL
    assert "token" not in parse_qs(urlsplit(tab.page.url).query)
    tab.screenshot("analyse-routing-view-pinned")


def test_compare_layers_page(tab, model):
    tab.open("compare_layers")
    full = expected_trace(model, presets()["python"])
    assert tab.token_counts() == [counted_tokens(full)]
    trace = metrics.counted(full)  # what every statistic counts; load by first choice, the default
    figures = tab.figures()

    (heatmap,) = figures["layer_load"]
    expected = np.full((trace.num_layers, trace.num_experts), np.nan)
    expected[trace.layer_ids] = metrics.expert_load(trace, 1)
    np.testing.assert_allclose(heatmap["z"], expected, atol=1e-9)

    chosen = sorted({trace.layer_ids[0], trace.layer_ids[-1]})
    if len(chosen) > 1:
        bars = figures["layer_loads"]
        assert [bar["name"] for bar in bars[: len(chosen)]] == [f"layer {n}" for n in chosen]
        for bar, layer in zip(bars, chosen):
            np.testing.assert_allclose(bar["y"], metrics.expert_load(trace, 1)[trace.layer_index(layer)], atol=1e-9)
        (sankey,) = figures["layer_transitions"]
        a, b = (trace.layer_index(n) for n in chosen)
        counts = metrics.layer_transitions(trace, a, b)
        assert sum(sankey["link"]["value"]) == trace.num_tokens == counts.sum()
        labels = sankey["node"]["label"]
        shown = {(labels[s], labels[t]): v for s, t, v in
                 zip(sankey["link"]["source"], sankey["link"]["target"], sankey["link"]["value"])}
        assert shown == {(f"L{chosen[0]} e{i}", f"L{chosen[1]} e{j}"): int(counts[i, j])
                         for i, j in zip(*np.nonzero(counts))}
    tab.screenshot("compare-layers")


def test_compare_prompts_page(tab, model):
    tab.open("compare_prompts")
    names = ["english", "python", "math"]
    traces = [expected_trace(model, presets()[name]) for name in names]
    assert tab.token_counts() == [counted_tokens(trace) for trace in traces]
    figures = tab.figures()
    layer = traces[0].layer_ids[0]
    loads = [metrics.expert_load(metrics.counted(trace), 1)[trace.layer_index(layer)] for trace in traces]
    bars = figures["prompt_loads"]
    assert [bar["name"] for bar in bars[:3]] == ["text 1", "text 2", "text 3"]
    for bar, load in zip(bars, loads):
        np.testing.assert_allclose(bar["y"], load, atol=1e-9)
    (divergence,) = figures["prompt_js"]
    np.testing.assert_allclose(divergence["z"], metrics.load_js_matrix(loads), atol=1e-9)
    tab.screenshot("compare-prompts")


def test_every_page_opens_and_draws(tab):
    """Every page in the navigation, whichever exist: no exception, every chart drawn."""
    tab.open()
    links = tab.page.locator('[data-testid="stSidebarNav"] a')
    titles = links.all_inner_texts()
    assert {"Analyse text", "Compare layers", "Compare prompts"} <= set(titles)
    for number, title in enumerate(titles):
        if number:
            tab.act(lambda: links.nth(number).click())
        assert tab.page.locator("h1").first.inner_text(), title
        tab.screenshot(f"page-{number}-{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')}")


def test_experts_page_shows_the_atlas_of_the_domain_samples(tab, model):
    from test_experts_page import samples_atlas

    expected = samples_atlas(model)
    tab.open("experts")
    figures = tab.figures()
    card = expected.layers[0].experts[0]
    bars, _ = figures["experts_top_tokens"]
    np.testing.assert_allclose(bars["x"], [t.share for t in card.top_tokens], atol=1e-12)
    srp = figures["experts_srp"]
    for line, values in zip(srp, expected.segments.srp):
        np.testing.assert_allclose(np.array(line["y"], dtype=float), values, atol=1e-12)
    np.testing.assert_allclose(np.array(srp[-1]["y"], dtype=float), expected.segments.srp_chance)
    shown = tab.page.locator(".moeviz-context mark").all_inner_texts()
    assert shown == [c.tokens[c.focus].replace("\n", "↵") for c in card.contexts]
    with tab.page.expect_download() as download:  # the SCH chart's data as a CSV file
        tab.page.locator(".st-key-experts_sch_csv button").click()
    table = pd.read_csv(download.value.path())
    assert "chance" not in set(table.series)  # the chance level is a column of each layer's rows, not a series
    first_layer = table[table.series == table.series[0]]
    np.testing.assert_allclose(first_layer["chance"], expected.segments.sch_chance)
    np.testing.assert_allclose(first_layer["SCH"], expected.segments.sch[0], atol=1e-12)
    tab.screenshot("experts")


# -- hostile input, one session through all of it ------------------------------------------------


@pytest.fixture(scope="module")
def hostile_tab(browser, server):
    """One session for every hostile text: each case also proves the previous one left the
    app serving."""
    browser.grant_permissions(["clipboard-read", "clipboard-write"], origin=server)
    page = browser.new_page()
    app = AppPage(page, server).open()
    yield app
    page.close()


@pytest.mark.parametrize("name", list(HOSTILE_TEXTS))
def test_hostile_text_is_analysed_and_shown_literally(hostile_tab, model, name):
    text = HOSTILE_TEXTS[name]
    hostile_tab.enter_text("analyse_text", text)
    sent = hostile_tab.text_value("analyse_text")
    assert sent == text.replace("\r\n", "\n")  # a text area keeps line feeds only (HTML spec)
    trace = expected_trace(model, sent)
    assert_routing_shown(hostile_tab, trace, trace.layer_ids[0])
    assert not hostile_tab.alerts()
    view = hostile_tab.routing_view().locator("#tokens").inner_text()
    for literal in re.findall(r"<[^>]*>", text):  # markup shows as the characters typed
        assert literal.replace(" ", "") in view.replace(" ", "").replace("␣", ""), literal
    # The heatmap's token ticks are drawn as text, never as Plotly's own markup.
    ticks = hostile_tab.page.locator(".st-key-probabilities .xtick text").all_text_contents()
    if trace.num_tokens <= charts.MAX_TOKEN_TICKS:
        expected = [t.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").replace("&#36;", "$")
                    for t in charts.probability_heatmap(trace, trace.layer_ids[0]).layout.xaxis.ticktext]
        assert ticks == expected
    hostile_tab.page.wait_for_timeout(300)  # time for an injected onerror handler to fire
    hostile_tab.assert_inert()
    hostile_tab.screenshot(f"hostile-{name}")


def test_lone_surrogate_arrives_as_replacement_character(hostile_tab, model):
    # A str can hold half a UTF-16 pair; the browser's text area turns it into U+FFFD.
    hostile_tab.enter_text("analyse_text", "half a pair: \ud83d here")
    sent = hostile_tab.text_value("analyse_text")
    assert sent == "half a pair: \ufffd here"
    assert_routing_shown(hostile_tab, expected_trace(model, sent), expected_trace(model, sent).layer_ids[0])


@pytest.mark.parametrize("name", list(BLANK_TEXTS))
def test_blank_text_asks_for_text(hostile_tab, name):
    hostile_tab.enter_text("analyse_text", BLANK_TEXTS[name])
    assert hostile_tab.token_counts() == []
    assert [a for a in hostile_tab.alerts() if "Paste or type some text" in a]
    assert not hostile_tab.page.locator(".js-plotly-plot").count()
    hostile_tab.assert_inert()


def test_long_text_is_cut_with_a_notice(hostile_tab, model):
    text = long_text()
    hostile_tab.paste_text("analyse_text", text)  # typing 200,000 characters takes a person a while
    assert len(hostile_tab.text_value("analyse_text")) == len(text)
    total = len(model.tokenizer(text)["input_ids"])
    limit = app_limit(model)
    assert hostile_tab.token_counts() == [counted_tokens(expected_trace(model, text))]
    assert hostile_tab.alerts() == [f"The text has {total:,} tokens; only the first {limit:,} were "
                                    "analysed (the token limit is in the sidebar)."]
    assert len(hostile_tab.token_view()) == limit
    hostile_tab.screenshot("hostile-200000-characters")


# -- bad models and trace files ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, model) -> dict[str, tuple[Path, str]]:
    """Folders a person might type as the model, with what the sidebar must say."""
    root = tmp_path_factory.mktemp("bad-models")
    dense = root / "dense-llama"
    config = LlamaConfig(vocab_size=len(model.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(dense)
    model.tokenizer.save_pretrained(dense)
    corrupt = root / "corrupt"
    model.model.save_pretrained(corrupt)
    model.tokenizer.save_pretrained(corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    return {
        "missing": (root / "no-such-model", "No model directory at"),
        "dense": (dense, "has no MoE routers"),
        "corrupt": (corrupt, "Could not load the model"),
    }


def test_bad_model_folders_are_explained_and_the_app_recovers(tab, model, bad_models):
    tab.open()
    for name, (path, message) in bad_models.items():
        tab.set_model_source(str(path))
        errors = tab.alerts('[data-testid="stSidebar"]')
        assert len(errors) == 1 and message in errors[0], (name, errors)
        assert str(path) in errors[0] or name == "dense", (name, errors)
        assert tab.token_counts() == [] and not tab.page.locator(".js-plotly-plot").count()
        tab.screenshot(f"model-{name}")
    tab.set_model_source(default_model_source())
    assert not tab.alerts('[data-testid="stSidebar"]')
    trace = expected_trace(model, presets()["english"])
    assert_routing_shown(tab, trace, trace.layer_ids[0])


@pytest.mark.skipif(not hasattr(moeviz.ui, "uploaded_trace"), reason="this app has no trace-file uploader")
def test_trace_files_damaged_or_hostile(tab, model):
    tab.open()
    tab.act(lambda: tab.page.get_by_text("Trace file", exact=True).click())
    uploader = tab.page.locator(".st-key-analyse_text_file input[type=file]")

    def upload(name: str, data: bytes):
        tab.act(lambda: uploader.set_input_files(files=[{"name": name, "mimeType": "application/octet-stream",
                                                          "buffer": data}]))

    trace = expected_trace(model, HOSTILE_TEXTS["script"])
    good = trace.to_bytes()
    weights = safetensors.numpy.save({"model.embed_tokens.weight": np.zeros((4, 4), np.float32)})
    (length,) = np.frombuffer(good[:8], "<u8")
    header = json.loads(good[8 : 8 + int(length)])
    fields = json.loads(header["__metadata__"]["fields"])
    float_ids = safetensors.numpy.save(
        {**safetensors.numpy.load(good), "topk_ids": trace.topk_ids.astype(np.float32)},
        metadata=header["__metadata__"])
    surrogate = safetensors.numpy.save(
        safetensors.numpy.load(good), metadata=header["__metadata__"] | {"fields": json.dumps(fields | {"model_id": "\ud800"})})
    for name, data, message in [
        ("half.safetensors", good[: len(good) // 2], "damaged"),
        ("weights.safetensors", weights, "not a moeviz trace"),
        ("text.safetensors", b"hello, I am a text file \xff\xfe", "not a moeviz trace"),
        ("float-ids.safetensors", float_ids, "topk_ids has dtype float32"),
        ("surrogate.safetensors", surrogate, "half of a UTF-16 surrogate pair"),
    ]:
        upload(name, data)
        # The upload reruns the script; wait until its verdict replaces the previous alert.
        tab.page.locator('[data-testid="stAlert"]', has_text=f"{name}: ").first.wait_for(timeout=60_000)
        errors = tab.alerts()
        assert len(errors) == 1 and errors[0].startswith(f"{name}: ") and message in errors[0], (name, errors)
        assert tab.token_counts() == []

    hostile_name = "<img src=x onerror=alert(1)>.safetensors"
    hostile = dataclasses.replace(trace, model_id="<img src=x onerror=alert(1)> **bold** [x](javascript:alert(1))")
    upload(hostile_name, hostile.to_bytes())
    caption = tab.page.locator('[data-testid="stCaptionContainer"]').filter(has_text="opened from").inner_text()
    assert "<img src=x onerror=alert(1)>" in caption and hostile_name in caption
    assert_routing_shown(tab, hostile, hostile.layer_ids[0])
    tab.page.wait_for_timeout(300)
    tab.assert_inert()
    tab.screenshot("trace-file-hostile")


# -- concurrency ------------------------------------------------------------------------------------------


def test_eight_sessions_at_once_each_see_their_own_routing(browser, server, model):
    names = sorted(presets())
    nonce = uuid.uuid4().hex[:8]  # new texts: nothing cached from earlier tests
    texts = [f"Session {i} ({nonce}): " + presets()[names[i % len(names)]][:400] for i in range(SESSIONS)]
    expected = [expected_trace(model, text) for text in texts]
    tabs = [AppPage(browser.new_page(), server) for _ in range(SESSIONS)]
    try:
        opened = [tab.finished for tab in tabs]
        for tab in tabs:
            tab.page.goto(server, wait_until="commit")
        for tab, before in zip(tabs, opened):
            tab.wait_for_run(before)
        for tab, text in zip(tabs, texts):
            tab.start_typing("analyse_text", text)
        sent = [tab.finished for tab in tabs]
        for tab in tabs:  # all eight runs start within a moment of each other
            tab.send("analyse_text")
        for tab, before in zip(tabs, sent):
            tab.wait_for_run(before)

        for i, (tab, trace) in enumerate(zip(tabs, expected)):
            assert tab.text_value("analyse_text") == texts[i]
            assert_routing_shown(tab, trace, trace.layer_ids[0])
            tab.assert_inert()
        tabs[0].screenshot("concurrent-session-0")
        runs = [tab.runs[-1] for tab in tabs]
        overlapping = max(sum(start <= t < end for start, end in runs) for t, _ in runs)
        assert overlapping >= 2, f"the sessions' runs did not overlap: {runs}"
    finally:
        for tab in tabs:
            tab.page.close()


# -- Intervene ------------------------------------------------------------------------------------


def test_intervene_page_shows_the_library_result(tab, model):
    """Ablate an expert in the browser: the token view's Δ log p, the perplexities and the
    routing-change bars are those of run_intervention on the same text."""
    from moeviz.analysis import effects
    from moeviz.model.interventions import Intervention, run_intervention

    tab.open("intervene")
    ablate = tab.page.locator(".st-key-intervene_ablate")
    tab.act(lambda: (ablate.click(), tab.page.get_by_role("option", name="1", exact=True).click()))
    new_tokens = tab.page.locator(".st-key-intervene_continuation input")
    tab.act(lambda: (new_tokens.fill("0"), new_tokens.press("Enter")))
    text = presets()["english"]
    limit = min(DEFAULT_MAX_TOKENS, context_length(model.model.config))  # the sidebar's default token limit
    expected = run_intervention(model.model, model.tokenizer, text, Intervention(ablate={0: [1]}),
                                model_id=model.model_id, max_tokens=limit)
    delta = expected.changed_logprobs - expected.baseline_logprobs
    shown = tab.page.locator(".moeviz-token[data-delta]").evaluate_all("spans => spans.map(s => s.dataset.delta)")
    np.testing.assert_allclose([float(d) for d in shown], delta, atol=1e-5)
    metrics_shown = tab.page.locator('[data-testid="stMetricValue"]').all_inner_texts()
    assert metrics_shown[:2] == [f"{effects.perplexity(expected.baseline_logprobs):.3f}",
                                 f"{effects.perplexity(expected.changed_logprobs):.3f}"]
    (bars,) = tab.figures()["intervene_routing"]
    np.testing.assert_allclose(bars["y"], effects.experts_changed(expected.baseline, expected.changed), atol=1e-9)
    tab.screenshot("intervene")


def test_link_state_across_pages_and_the_per_token_table(tab, model):
    """Issue 14, items 4-5: a link reopens preset and layer; own text and the preset box survive
    a visit to another page; the per-token CSV holds the trace's values."""
    from moeviz.analysis import tables

    tab.open("?preset=math&layer=2")
    assert tab.text_value("analyse_text") == presets()["math"]
    trace = expected_trace(model, presets()["math"])
    assert_routing_shown(tab, trace, 2)
    with tab.page.expect_download() as download:
        tab.page.locator(".st-key-analyse_trace_file_table_csv button").first.click()
    assert download.value.suggested_filename == "routing-tokens.csv"
    table = pd.read_csv(download.value.path(), keep_default_na=False, na_values=[""])
    expected = tables.token_table(trace)
    assert table.columns.tolist() == tables.COLUMNS
    for column in ("position", "token_id", "token", "layer", "layer_label", "rank", "expert"):
        assert table[column].tolist() == expected[column].tolist(), column
    np.testing.assert_allclose(table.weight, expected.weight, atol=1e-6)
    np.testing.assert_allclose(table.router_prob, expected.router_prob, atol=1e-5)

    own = "Experts, my own words."
    tab.enter_text("analyse_text", own)
    assert "preset=" not in tab.page.url  # the box says "(your own text)"; the text never goes in the URL
    assert "Experts" not in tab.page.url
    tab.act(lambda: tab.page.get_by_role("link", name="Compare layers").click())
    tab.act(lambda: tab.page.get_by_role("link", name="Analyse text").click())
    assert tab.text_value("analyse_text") == own


def test_training_page_plots_the_shipped_histories(tab):
    from test_training_history import WITH_HISTORY

    from moeviz.analysis import training
    from moeviz.model.loading import BUNDLED_MODELS

    tab.open("training")
    radio = tab.page.locator(".st-key-training_model [role=\"radiogroup\"] label")
    assert radio.all_inner_texts() == WITH_HISTORY
    for number, name in enumerate(WITH_HISTORY):
        if number:
            tab.act(lambda: radio.nth(number).click())
        history = training.read_history(BUNDLED_MODELS[name])
        figures = tab.figures()
        lines = figures["training_saturation"]
        assert len(lines) == len(history.moe_layers)
        for line, values in zip(lines, training.saturation(history).T):
            assert line["x"] == history.steps
            np.testing.assert_allclose(line["y"], values, atol=1e-12)
        loads = training.expert_loads(history)
        for line, values in zip(figures["training_max_vio"], training.max_violation(loads).T):
            np.testing.assert_allclose(line["y"], values, atol=1e-12)
        np.testing.assert_allclose(np.array(figures["training_load"][0]["z"], dtype=float), loads[:, 0].T, atol=1e-12)
        if history.biases is None:
            assert "training_bias" not in figures  # balanced with a loss, not biases
        else:
            np.testing.assert_allclose(np.array(figures["training_bias"][0]["z"], dtype=float),
                                       history.biases[:, 0].T, atol=1e-7)
            assert "plus 1 shared expert, always active" in tab.page.inner_text("body")
        tab.screenshot(f"training-{number}")


# -- Contrast and Compare variants: the values they plot are the library's --------------------------


def test_contrast_page_plots_the_risk_differences_and_the_effect_of_one_click(tab, model):
    tab.open("contrast")
    traces = [[expected_trace(model, presets()[name]) for name in names] for names in (["python", "c"],
                                                                                        ["english", "german"])]
    expected = contrast.contrast(*traces)
    figures = tab.figures()
    (heatmap,) = figures["contrast_heatmap"]
    np.testing.assert_allclose(np.asarray(heatmap["z"], dtype=float).reshape(expected.risk_difference.shape),
                               expected.risk_difference, atol=1e-12)
    (top,) = figures["contrast_top"]
    ranking = expected.ranking().head(12)
    np.testing.assert_allclose(np.asarray(top["y"], dtype=float), ranking["risk_difference"], atol=1e-12)
    np.testing.assert_allclose(np.asarray(top["error_y"]["array"], dtype=float),
                               ranking["ci_high"] - ranking["risk_difference"], atol=1e-12)

    tab.act(lambda: tab.page.locator(".st-key-contrast_ablate button").click())
    ablate = contrast.top_experts(expected, 3, "A", per_layer=expected.num_experts - expected.top_k)
    assert tab.subheaders()[-1] == Intervention(ablate=ablate).describe()
    means = []
    for names in (["python", "c"], ["english", "german"]):
        results = [moeviz.intervene(model, presets()[n], ablate=ablate, max_tokens=app_limit(model)) for n in names]
        means.append(contrast.set_effect([r.baseline_logprobs for r in results],
                                         [r.changed_logprobs for r in results]).mean_delta_logprob)
    (bars,) = tab.figures()["contrast_effect"]
    assert list(bars["x"]) == ["Set A", "Set B"]
    np.testing.assert_allclose(np.asarray(bars["y"], dtype=float), means, atol=1e-9)
    assert means[0] < means[1]  # the experts set A uses more matter more to set A
    tab.screenshot("contrast")


def test_compare_variants_page_plots_the_agreement_of_full_precision_and_nf4(tab, model):
    tab.open("compare_variants")
    nf4 = load_model(default_model_source(), quantization="nf4")
    expected = moeviz.compare_variants(model, nf4, presets()["english"], max_tokens=app_limit(model))
    figures = tab.figures()
    first, overlap = figures["variants_agreement"]
    np.testing.assert_allclose(np.asarray(first["y"], dtype=float), expected.first_choice_agreement, atol=1e-12)
    np.testing.assert_allclose(np.asarray(overlap["y"], dtype=float), expected.topk_overlap, atol=1e-12)
    (delta,) = figures["variants_delta"]
    np.testing.assert_allclose(np.asarray(delta["y"], dtype=float), expected.delta_logprobs, atol=1e-5)
    layer = expected.a.layer_ids[0]
    differs = np.flatnonzero(expected.first_choice_differs[0] & expected.counted)
    shown = tab.page.locator(".moeviz-differs").evaluate_all("spans => spans.map(s => +s.dataset.position)")
    assert shown == differs.tolist()
    assert f"at layer {layer}" in tab.page.locator(".moeviz-legend").inner_text()
    tab.screenshot("compare-variants")
