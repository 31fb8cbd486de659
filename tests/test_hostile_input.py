"""Hostile input, below the browser: every case gives a clear message or a faithful, inert
view, and the app keeps serving the next request. The browser side is test_e2e_browser.py."""

from __future__ import annotations

import json
import re
import struct
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from hostile import BLANK_TEXTS, HOSTILE_TEXTS, LONG_TEXT_CHARS, TokenView, long_text
from streamlit.testing.v1 import AppTest
from test_app import app_trace, counted_tokens, limit, token_counts
from transformers import LlamaConfig, LlamaForCausalLM

from moeviz.analysis import metrics
from moeviz.model.capture import DEFAULT_MAX_TOKENS, trace_text
from moeviz.model.loading import ModelLoadError, load_model
from moeviz.model.tokens import tokenize
from moeviz.trace import RoutingTrace, TraceFileError
from moeviz.ui import default_model_source
from moeviz.views import charts

APP = str(Path(__file__).resolve().parent.parent / "app.py")
TIMEOUT = 300
VIEW_TAGS = {"div", "span", "br", "i"}  # all the markup token_view_html may produce


@pytest.fixture(scope="module")
def model():
    return load_model(default_model_source())


def trace_of(model, text: str, **options) -> RoutingTrace:
    return trace_text(model.model, model.tokenizer, text, model_id=model.model_id, **options)


# -- text --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE_TEXTS)
def test_hostile_text_is_traced_and_shown_literally_never_as_markup(model, name):
    text = HOSTILE_TEXTS[name]
    trace = trace_of(model, text)
    assert trace.text == text
    assert trace.num_tokens == len(model.tokenizer(text)["input_ids"])
    starts = [start for start, end in trace.offsets if end > start]
    assert starts == sorted(starts) and all(0 <= s <= e <= len(text) for s, e in trace.offsets)

    layer = trace.layer_ids[-1]
    html = charts.token_view_html(trace, layer)
    view = TokenView(html)
    assert view.tags <= VIEW_TAGS, f"markup from the text became tags: {view.tags - VIEW_TAGS}"
    assert view.attributes <= {"class", "title", "style", "data-positions"}
    # One span per token, or per run of byte-level tokens forming characters: every token once, in order.
    assert [p for first, last in view.positions for p in range(first, last + 1)] == list(range(trace.num_tokens))
    assert all(view.tokens)
    # Nothing invisible reaches the page raw: NUL, a right-to-left override or a zero-width
    # joiner would hide or reorder what the model saw.
    hidden = {ch for ch in html if unicodedata.category(ch) in ("Cc", "Cf") and ch != "\n"}
    assert not hidden, f"invisible characters in the token view: {sorted(map(hex, map(ord, hidden)))}"
    if text.isascii():
        shown = "".join(view.tokens).replace("␣", " ").replace("↵", "\n").replace("→", "\t")
        printable = "".join(ch for ch in text if ch.isprintable() or ch in "\n\t")
        assert printable in shown.replace("\\x00", "").replace("\\x1b", "").replace("\\x7f", "").replace("\\r", "")

    fig = charts.probability_heatmap(trace, layer)
    labels = [*fig.layout.xaxis.ticktext, *fig.data[0].customdata[0], *(row[0] for row in fig.data[1].customdata)]
    assert not [label for label in labels if "<" in label or ">" in label], "unescaped markup in Plotly labels"
    loaded = RoutingTrace.from_bytes(trace.to_bytes())
    assert loaded.text == text and loaded.tokens == trace.tokens


def test_nul_bytes_are_shown_as_escapes(model):
    trace = trace_of(model, HOSTILE_TEXTS["nul"])
    html = charts.token_view_html(trace, trace.layer_ids[0])
    assert "\x00" not in html and "\\x00" in html


@pytest.mark.parametrize("name", BLANK_TEXTS)
def test_blank_text_is_refused_with_a_clear_message(model, name):
    with pytest.raises(ValueError, match="The text is empty"):
        trace_of(model, BLANK_TEXTS[name])


def test_long_text_is_cut_at_the_token_limit_and_says_how_long_it_was(model):
    text = long_text()
    assert len(text) == LONG_TEXT_CHARS
    trace = trace_of(model, text)
    assert trace.num_tokens == DEFAULT_MAX_TOKENS == trace.topk_ids.shape[1]
    assert trace.truncated and trace.input_token_count == len(model.tokenizer(text)["input_ids"])
    assert trace.tokens == tokenize(model.tokenizer, text, DEFAULT_MAX_TOKENS).tokens


@pytest.mark.parametrize("text, position", [("a\ud800b", 1), ("ok \udfff", 3), ("\udc80", 0)])
def test_lone_surrogate_is_a_clear_error_not_a_tokenizer_crash(model, text, position):
    # A str can hold half of a UTF-16 pair (e.g. decoded with errors="surrogateescape"); the
    # Rust tokenizer refuses it with a TypeError nobody can act on.
    with pytest.raises(ValueError, match=rf"U\+D[89A-F][0-9A-F]{{2}} at character {position}, half of a UTF-16"):
        trace_of(model, text)


def test_bytes_are_refused_with_the_type_named(model):
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        trace_of(model, b"invalid \xff\xfe utf-8")


# -- trace files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trace_file(model) -> tuple[dict, dict]:
    """A real trace file, split into its JSON fields and its arrays, to damage."""
    trace = trace_of(model, "The quick brown fox <b>jumps</b>.")
    data = trace.to_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    fields = json.loads(json.loads(data[8 : 8 + length])["__metadata__"]["fields"])
    return fields, safetensors.numpy.load(data)


def write_trace(fields: dict, arrays: dict, **header) -> bytes:
    metadata = {"format": "moeviz-trace", "version": "1", "fields": json.dumps(fields)} | header
    return safetensors.numpy.save(arrays, metadata=metadata)


def raw_safetensors(header) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded


DAMAGED_FIELDS = {
    "tokens are numbers": (lambda f: f.update(tokens=list(range(len(f["tokens"])))), "tokens must be list"),
    "tokens missing": (lambda f: f.pop("tokens"), "tokens"),
    "layer ids are strings": (lambda f: f.update(layer_ids=[str(n) for n in f["layer_ids"]]), "layer_ids must be list"),
    "layer ids are floats": (lambda f: f.update(layer_ids=[n + 0.5 for n in f["layer_ids"]]), "layer_ids must be list"),
    "layer ids repeat": (lambda f: f.update(layer_ids=[0] * len(f["layer_ids"])), "must be distinct layers"),
    "layer id past the model": (lambda f: f.update(num_layers=max(f["layer_ids"])), "must be distinct layers"),
    "negative layer id": (lambda f: f.update(layer_ids=[-1, *f["layer_ids"][1:]]), "must be distinct layers"),
    "num_experts is a string": (lambda f: f.update(num_experts=str(f["num_experts"])), "num_experts must be int"),
    "model id is a number": (lambda f: f.update(model_id=7), "model_id must be str"),
    "offsets are not pairs": (lambda f: f.update(offsets=[[0]] * len(f["offsets"])), "offsets must be list"),
    "unknown field": (lambda f: f.update(evil=1), "unexpected keyword argument 'evil'"),
    "unknown scoring": (lambda f: f.update(scoring="relu"), "scoring must be one of"),
    "lone surrogate in model id": (lambda f: f.update(model_id="x\ud800"), "U\\+D800, half of a UTF-16"),
    "lone surrogate in a token": (lambda f: f["tokens"].__setitem__(0, "\udc80"), "U\\+DC80, half of a UTF-16"),
}


@pytest.mark.parametrize("case", DAMAGED_FIELDS)
def test_trace_file_with_damaged_fields_is_refused_by_name(trace_file, case):
    fields, arrays = trace_file
    damage, message = DAMAGED_FIELDS[case]
    fields = json.loads(json.dumps(fields))
    damage(fields)
    with pytest.raises(TraceFileError, match=f"damaged: .*{message}"):
        RoutingTrace.from_bytes(write_trace(fields, arrays))


def _cast(name, dtype):
    return lambda arrays: arrays.__setitem__(name, arrays[name].astype(dtype))


DAMAGED_ARRAYS = {
    "float expert ids": (_cast("topk_ids", np.float32), "topk_ids has dtype float32"),
    "uint64 expert ids": (_cast("topk_ids", np.uint64), "topk_ids has dtype uint64"),
    "integer weights": (_cast("topk_weights", np.int32), "topk_weights has dtype int32"),
    "ids missing": (lambda arrays: arrays.pop("topk_ids"), "topk_ids"),
    "ids flattened": (lambda arrays: arrays.__setitem__("topk_ids", arrays["topk_ids"][0]), "topk_ids has shape"),
    "no tokens": (lambda arrays: arrays.update({k: v[:, :0] for k, v in arrays.items()}), "shape|no tokens"),
}


@pytest.mark.parametrize("case", DAMAGED_ARRAYS)
def test_trace_file_with_damaged_arrays_is_refused(trace_file, case):
    fields, arrays = trace_file
    damage, message = DAMAGED_ARRAYS[case]
    arrays = dict(arrays)
    damage(arrays)
    with pytest.raises(TraceFileError, match=message):
        RoutingTrace.from_bytes(write_trace(fields, arrays))


@pytest.mark.parametrize("data, message", [
    (raw_safetensors({"__metadata__": ["format", "moeviz-trace"]}), "__metadata__ is not a JSON object"),
    (raw_safetensors({"__metadata__": "moeviz-trace"}), "__metadata__ is not a JSON object"),
    (struct.pack("<Q", 5) + b'{"\xff\xfe"', "header is not JSON"),
    (b"\x00" * 64, "header is not JSON"),
    (struct.pack("<Q", 2) + b"{}", "not a moeviz trace"),
], ids=["metadata list", "metadata string", "invalid utf-8 header", "nul bytes", "empty header"])
def test_trace_file_with_damaged_header_is_refused(data, message):
    with pytest.raises(TraceFileError, match=message):
        RoutingTrace.from_bytes(data)


def test_trace_file_with_damaged_fields_json_or_version_is_refused(trace_file):
    fields, arrays = trace_file
    with pytest.raises(TraceFileError, match="damaged"):
        RoutingTrace.from_bytes(safetensors.numpy.save(arrays, metadata={
            "format": "moeviz-trace", "version": "1", "fields": '{"tokens": ['}))
    with pytest.raises(TraceFileError, match="damaged: its fields are not a JSON object"):
        RoutingTrace.from_bytes(safetensors.numpy.save(arrays, metadata={
            "format": "moeviz-trace", "version": "1", "fields": "[1, 2]"}))
    with pytest.raises(TraceFileError, match=r"made by a newer moeviz \(format v99\); this moeviz reads up to v2"):
        RoutingTrace.from_bytes(write_trace(fields, arrays, version="99"))


def _page_charts(trace: RoutingTrace) -> None:
    """Everything the pages draw from one trace."""
    for layer in trace.layer_ids:
        index = trace.layer_index(layer)
        charts.token_view_html(trace, layer)
        charts.figure_table(charts.probability_heatmap(trace, layer))
        charts.expert_load_chart(metrics.expert_load(trace, 1)[index], metrics.uniform_load(trace, 1))
        charts.coactivation_heatmap(metrics.coactivation(trace, index))
    charts.layer_load_heatmap(trace, metrics.expert_load(trace), metrics.uniform_load(trace))
    if len(trace.layer_ids) > 1:
        charts.transition_sankey(trace, trace.layer_ids)
    metrics.balance_loss(trace)
    metrics.router_entropy(trace)
    metrics.dropped_token_share(trace, 1.25)


ODD_BUT_VALID = {
    "int8 ids": _cast("topk_ids", np.int8),
    "float16 logits": _cast("router_logits", np.float16),
    "float64 weights": _cast("topk_weights", np.float64),
    "infinite logits": lambda arrays: arrays.__setitem__("router_logits", np.full_like(arrays["router_logits"], np.inf)),
}


@pytest.mark.parametrize("case", ODD_BUT_VALID)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_trace_file_that_loads_can_be_drawn(trace_file, case):
    fields, arrays = trace_file
    arrays = dict(arrays)
    ODD_BUT_VALID[case](arrays)
    trace = RoutingTrace.from_bytes(write_trace(fields, arrays))
    _page_charts(trace)


# -- models ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_mixtral, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("checkpoint")
    tiny_mixtral.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def damaged_copy(checkpoint: Path, directory: Path, damage) -> Path:
    directory.mkdir()
    for file in checkpoint.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    weights = directory / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    return directory


def _without(prefix: str):
    def damage(data: bytes) -> bytes:
        arrays = safetensors.numpy.load(data)
        return safetensors.numpy.save({k: v for k, v in arrays.items() if not k.startswith(prefix)}, metadata={"format": "pt"})
    return damage


def _router_reshaped(data: bytes) -> bytes:
    arrays = safetensors.numpy.load(data)
    name = next(k for k in arrays if k.endswith(".gate.weight"))
    return safetensors.numpy.save(arrays | {name: np.zeros((3, 3), np.float32)}, metadata={"format": "pt"})


CORRUPT_WEIGHTS = {
    "empty file": (lambda data: b"", "Could not load"),
    "random bytes": (lambda data: np.random.default_rng(0).bytes(4096), "Could not load"),
    "cut in half": (lambda data: data[: len(data) // 2], "Could not load"),
    "header garbled": (lambda data: data[:8] + b"{" * 40 + data[48:], "Could not load"),
    "a layer missing": (_without("model.layers.1."), "lacks 9 of the model's weights .*model.layers.1"),
    "no tensors": (_without(""), "lacks .* of the model's weights"),
    "router of wrong shape": (_router_reshaped, "Could not load"),
}


@pytest.mark.parametrize("case", CORRUPT_WEIGHTS)
def test_corrupt_model_safetensors_is_refused_never_loaded_random(checkpoint, tmp_path, case):
    damage, message = CORRUPT_WEIGHTS[case]
    with pytest.raises(ModelLoadError, match=message):
        load_model(damaged_copy(checkpoint, tmp_path / "damaged", damage))


# -- the app, one session through all of it ---------------------------------------------------------


@pytest.fixture()
def app() -> AppTest:
    app = AppTest.from_file(APP, default_timeout=TIMEOUT)
    app.run()
    assert not app.exception, [e.message for e in app.exception]
    return app


def enter_text(app: AppTest, text: str) -> AppTest:
    app.text_area(key="analyse_text").set_value(text).run()
    assert not app.exception, [e.message for e in app.exception]
    return app


def test_app_session_survives_every_hostile_text(app, model):
    for name, text in HOSTILE_TEXTS.items():
        enter_text(app, text)
        assert not app.error, (name, [e.value for e in app.error])
        assert token_counts(app) == [counted_tokens(app_trace(model, text))], name
    for name, text in BLANK_TEXTS.items():
        enter_text(app, text)
        assert not app.error and token_counts(app) == [], name
        assert any("Paste or type some text" in i.value for i in app.info), name
    enter_text(app, "Back to normal text.")
    assert not app.error and token_counts(app) == [counted_tokens(app_trace(model, "Back to normal text."))]


def test_app_cuts_a_long_text_with_a_notice(app, model):
    text = long_text()
    enter_text(app, text)
    total = len(model.tokenizer(text)["input_ids"])
    assert token_counts(app) == [counted_tokens(app_trace(model, text))]
    assert [w.value for w in app.warning] == [
        f"The text has {total:,} tokens; only the first {limit(model):,} were analysed "
        "(the token limit is in the sidebar)."]


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, model) -> dict[str, tuple[Path, str]]:
    """Model folders a person might type, each with the message the sidebar must give."""
    root = tmp_path_factory.mktemp("bad-models")
    dense = root / "dense-llama"
    config = LlamaConfig(vocab_size=len(model.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(dense)
    model.tokenizer.save_pretrained(dense)
    good = root / "good"
    model.model.save_pretrained(good)
    model.tokenizer.save_pretrained(good)
    (root / "no-config").mkdir()
    return {
        "missing": (root / "no-such-model", "No model directory at"),
        "not a model": (root / "no-config", "has no config.json"),
        "dense": (dense, "has no MoE routers"),
        "truncated weights": (damaged_copy(good, root / "truncated", lambda data: data[: len(data) // 3]), "Could not load"),
        "weights missing": (damaged_copy(good, root / "partial", _without("model.layers.0.")), "lacks .* weights"),
    }


def test_app_session_survives_bad_model_folders(app, model, bad_models):
    for name, (path, message) in bad_models.items():
        app.sidebar.text_input(key="model_source").set_value(str(path)).run()
        assert not app.exception, (name, [e.message for e in app.exception])
        errors = [e.value for e in app.sidebar.error]
        assert len(errors) == 1 and re.search(message, errors[0]), (name, errors)
        assert token_counts(app) == [], name
    app.sidebar.text_input(key="model_source").set_value(default_model_source()).run()
    assert not app.exception and not app.sidebar.error
    assert token_counts(app) == [counted_tokens(app_trace(model, app.text_area(key="analyse_text").value))]
