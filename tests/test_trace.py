"""RoutingTrace files: exact round trip, clear errors for damaged or foreign files, bounded
header fields, format versions (an old v1 file opens, a newer one says so)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from factories import make_trace

from moeviz.analysis import metrics
from moeviz.model.capture import trace_text
from moeviz.trace import TRACE_VERSION, RoutingTrace, TraceFileError


def assert_traces_equal(a: RoutingTrace, b: RoutingTrace) -> None:
    for name in ("model_id", "model_type", "num_experts", "top_k", "scoring", "num_layers", "layer_ids",
                 "text", "tokens", "token_ids", "offsets", "input_token_count", "router_class", "generated_from"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("topk_ids", "topk_weights", "router_logits"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert getattr(a, name).dtype == getattr(b, name).dtype


def test_captured_trace_round_trips_exactly(tmp_path, tokenizer, tiny_qwen2_moe):
    trace = trace_text(tiny_qwen2_moe, tokenizer, "Съешь <script>alert(1)</script> 👩‍🔬\x00 end", max_tokens=20)
    loaded = RoutingTrace.load(trace.save(tmp_path / "t.safetensors"))
    assert_traces_equal(trace, loaded)
    assert loaded.truncated == trace.truncated


def test_file_is_safetensors_with_metadata_not_pickle(tmp_path):
    path = make_trace([[[0, 1], [1, 2]]]).save(tmp_path / "t.safetensors")
    assert b"pickle" not in path.read_bytes() and path.read_bytes()[:1] != b"\x80"
    assert set(safetensors.numpy.load_file(path)) == {"topk_ids", "topk_weights", "router_logits"}


@pytest.mark.parametrize("cut", [3, 50, -10])
def test_truncated_file_gives_a_clear_error(tmp_path, cut):
    data = make_trace([[[0, 1], [1, 2], [2, 0]]]).to_bytes()
    with pytest.raises(TraceFileError, match="truncated|too short|damaged"):
        RoutingTrace.from_bytes(data[:cut])


def test_foreign_files_are_refused(tmp_path):
    weights = safetensors.numpy.save({"model.embed_tokens.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(TraceFileError, match="not a moeviz trace"):
        RoutingTrace.from_bytes(weights)
    with pytest.raises(TraceFileError, match="not a moeviz trace"):
        RoutingTrace.from_bytes(b"PK\x03\x04 this is a zip file, not a trace at all")
    with pytest.raises(TraceFileError, match="No trace file"):
        RoutingTrace.load(tmp_path / "missing.safetensors")


def test_inconsistent_arrays_are_rejected():
    with pytest.raises(ValueError, match=r"topk_weights has shape \(1, 2, 1\)"):
        make_trace([[[0, 1], [1, 2]]], topk_weights=np.ones((1, 2, 1)))
    with pytest.raises(ValueError, match="topk_ids must lie in"):
        make_trace([[[0, 5]]], num_experts=4)


def test_router_probs_use_the_model_scoring_function():
    logits = np.array([[[0.0, np.log(3.0)]]], dtype=np.float32)
    softmax = make_trace([[[1]]], router_logits=logits)
    sigmoid = make_trace([[[1]]], router_logits=logits, scoring="sigmoid")
    np.testing.assert_allclose(softmax.router_probs[0, 0], [0.25, 0.75], atol=1e-6)
    np.testing.assert_allclose(sigmoid.router_probs[0, 0], [0.5, 0.75], atol=1e-6)


# -- format versions ---------------------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"


def split_file(data: bytes) -> tuple[dict, dict]:
    """A trace file's JSON fields and its arrays."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(json.loads(data[8 : 8 + length])["__metadata__"]["fields"]), safetensors.numpy.load(data)


def write_file(fields: dict, arrays: dict, version: str = str(TRACE_VERSION)) -> bytes:
    metadata = {"format": "moeviz-trace", "version": version, "fields": json.dumps(fields)}
    return safetensors.numpy.save(arrays, metadata=metadata)


def test_a_version_1_file_from_this_repository_still_opens():
    """tests/fixtures/trace_v1.safetensors was written by moeviz/trace.py at commit 05a758d
    (tests/fixtures/README.md): 2 MoE layers (0 and 2) of 3, 4 experts, top-2, softmax, 6
    tokens of which the last was generated. Its logits are (n mod 5) - 2 for n = 0, 1, ...
    in [layer, token, expert] order."""
    data = (FIXTURES / "trace_v1.safetensors").read_bytes()
    assert b'"version":"1"' in data
    trace = RoutingTrace.from_bytes(data)
    assert (trace.model_id, trace.num_experts, trace.top_k, trace.num_layers) == ("hand-built-v1", 4, 2, 3)
    assert trace.layer_ids == [0, 2] and trace.layer_label(2) == "layer 2"
    assert trace.text == "Grüß dich → 7" and trace.tokens[4] == " →" and trace.offsets[4] == (9, 11)
    assert trace.generated_from == 5 and trace.generated
    # fields added after that commit take their defaults
    assert (trace.shared_experts, trace.encoder_layers, trace.engine, trace.quantization) == (0, 0, "", "none")
    # layer 0, token 0: logits 0 1 2 3 -> -2 -1 0 1; the top-2 are experts 3 and 2
    assert trace.topk_ids[0, 0].tolist() == [3, 2]
    expected = np.exp([-2.0, -1.0, 0.0, 1.0]) / np.exp([-2.0, -1.0, 0.0, 1.0]).sum()
    np.testing.assert_allclose(trace.router_probs[0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(trace.topk_weights[0, 0], expected[[3, 2]] / expected[[3, 2]].sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics.expert_load(trace).sum(axis=1), [2, 2])


def test_files_are_written_in_the_current_version_and_read_back():
    data = make_trace([[[0, 1], [1, 2]]]).to_bytes()
    assert TRACE_VERSION == 2
    assert f'"version":"{TRACE_VERSION}"'.encode() in data
    assert RoutingTrace.from_bytes(data).topk_ids.tolist() == [[[0, 1], [1, 2]]]


def test_a_newer_file_says_so_and_names_both_versions():
    fields, arrays = split_file(make_trace([[[0, 1]]]).to_bytes())
    with pytest.raises(TraceFileError, match=r"made by a newer moeviz \(format v3\); this moeviz reads up to v2"):
        RoutingTrace.from_bytes(write_file(fields, arrays, version="3"))


@pytest.mark.parametrize("version", ["0", "-1", "2.0", "v2", "", "²", "1" * 40])
def test_a_version_that_is_not_a_number_is_damaged(version):
    fields, arrays = split_file(make_trace([[[0, 1]]]).to_bytes())
    with pytest.raises(TraceFileError, match="damaged: its format version .* is not a version number"):
        RoutingTrace.from_bytes(write_file(fields, arrays, version=version))


# -- bounds --------------------------------------------------------------------------------


def ids_only_file(**changes) -> bytes:
    """A one-layer, two-token, top-1 trace file of expert ids only, with `changes` to its fields."""
    trace = make_trace([[[0], [1]]])
    fields, arrays = split_file(trace.to_bytes())
    fields.update(changes)
    return write_file(fields, {"topk_ids": arrays["topk_ids"]})


def test_a_600_byte_file_cannot_claim_ten_billion_layer_experts():
    """Issue 13: 10^5 layers x 10^5 experts loaded, and Compare layers then allocated
    np.full((num_layers, num_experts)) = 80 GB."""
    data = ids_only_file(num_layers=10**5, num_experts=10**5)
    assert len(data) < 700
    with pytest.raises(TraceFileError, match=r"num_experts must lie in \[1, 1,024\], got 100000"):
        RoutingTrace.from_bytes(data)


BOUNDS = {
    "no experts": ({"num_experts": 0, "top_k": 0}, r"num_experts must lie in \[1, 1,024\], got 0"),
    "top_k 0": ({"top_k": 0}, r"top_k must lie in \[1, 2\], got 0"),
    "top_k above experts": ({"top_k": 3}, r"top_k must lie in \[1, 2\], got 3"),
    "top_k above the cap": ({"num_experts": 1024, "top_k": 33}, r"top_k must lie in \[1, 32\], got 33"),
    "no layers": ({"num_layers": 0}, r"num_layers must lie in \[1, 1,024\], got 0"),
    "too many layers": ({"num_layers": 1025}, r"num_layers must lie in \[1, 1,024\], got 1025"),
    "encoder past the layers": ({"encoder_layers": 2}, r"encoder_layers must lie in \[0, 1\], got 2"),
    "negative shared experts": ({"shared_experts": -1}, r"shared_experts must lie in \[0, 1,024\], got -1"),
    "fewer inputs than tokens": ({"input_token_count": 1}, r"input_token_count must lie in \[2, "),
    "generated past the end": ({"generated_from": 3}, r"generated_from must lie in \[-1, 2\], got 3"),
    "no layer ids": ({"layer_ids": []}, "it has no MoE layers"),
    "k disagrees with the ids": ({"num_experts": 4, "top_k": 2}, r"topk_ids has shape \(1, 2, 1\), expected .* = \(1, 2, 2\)"),
    "tokens disagree with the ids": ({"tokens": ["a", "b", "c"], "token_ids": [0, 1, 2], "offsets": [[0, 0]] * 3,
                                      "input_token_count": 3},
                                     r"topk_ids has shape \(1, 2, 1\), expected .* = \(1, 3, 1\)"),
    "too many special ids": ({"special_ids": list(range(4097))}, r"special_ids lists 4,097 ids; at most 4,096"),
    "negative special id": ({"special_ids": [1, -2]}, r"token_ids and special_ids must lie in"),
    "long stop reason": ({"stop_reason": "x" * 4097}, r"stop_reason has 4,097 characters"),
    "negative token id": ({"token_ids": [0, -1]}, r"token_ids and special_ids must lie in \[0, 2,147,483,647\]"),
    "offset past the text": ({"offsets": [[0, 2], [2, 9]]}, r"offset 1 \[2, 9\] is not a span of the 4-character text"),
    "backwards offset": ({"offsets": [[2, 0], [2, 4]]}, r"offset 0 \[2, 0\] is not a span"),
    "long token": ({"tokens": ["t0", "x" * 1025]}, "token 1 has 1,025 characters; a token has at most 1,024"),
    "long model id": ({"model_id": "m" * 4097}, "model_id has 4,097 characters; at most 4,096"),
}


@pytest.mark.parametrize("case", BOUNDS)
def test_every_header_field_is_bounded(case):
    changes, message = BOUNDS[case]
    with pytest.raises(TraceFileError, match=f"damaged: {message}"):
        RoutingTrace.from_bytes(ids_only_file(**changes))


def test_the_bounds_themselves_open():
    trace = RoutingTrace.from_bytes(ids_only_file(num_experts=1024, num_layers=1024, layer_ids=[1023],
                                                  encoder_layers=1024, shared_experts=1024, generated_from=2,
                                                  tokens=["t0", "x" * 1024], offsets=[[0, 0], [4, 4]]))
    assert (trace.num_experts, trace.num_layers, trace.layer_ids) == (1024, 1024, [1023])


@pytest.mark.parametrize("arrays, message", [
    ({"topk_ids": np.zeros((1, 2, 1), np.int32), "extra": np.zeros(1, np.float32)},
     r"arrays a moeviz trace does not have: \[\"extra\"\]"),
    ({"topk_weights": np.zeros((1, 2, 1), np.float32)}, "it has no topk_ids array"),
    ({"topk_ids": np.zeros((1, 2, 1), np.int32), "router_logits": np.zeros((1, 2), np.float32)},
     r"router_logits has shape \[1, 2\]; expected 3 dimensions"),
])
def test_arrays_are_checked_against_the_header_before_loading(arrays, message):
    fields, _ = split_file(make_trace([[[0], [1]]]).to_bytes())
    with pytest.raises(TraceFileError, match=message):
        RoutingTrace.from_bytes(write_file(fields, arrays))


def test_an_array_numpy_cannot_read_is_named():
    fields, _ = split_file(make_trace([[[0], [1]]]).to_bytes())
    header = json.dumps({
        "__metadata__": {"format": "moeviz-trace", "version": "2", "fields": json.dumps(fields)},
        "topk_ids": {"dtype": "BF16", "shape": [1, 2, 1], "data_offsets": [0, 4]},
    }).encode()
    with pytest.raises(TraceFileError, match='topk_ids has dtype "BF16", which numpy cannot read'):
        RoutingTrace.from_bytes(struct.pack("<Q", len(header)) + header + bytes(4))


@pytest.mark.parametrize("header", [b"[" * 100_000 + b"]" * 100_000, b'{"a": ' + b"9" * 5000 + b"}"],
                         ids=["deeply nested", "5,000-digit number"])
def test_a_header_python_cannot_parse_is_not_json(header):
    with pytest.raises(TraceFileError, match="its header is not JSON"):
        RoutingTrace.from_bytes(struct.pack("<Q", len(header)) + header)


def test_a_trace_needs_experts_a_top_k_and_a_layer():
    with pytest.raises(ValueError, match="a trace needs 1 <= top_k <= num_experts, got top_k 3 of 2 experts"):
        make_trace(np.zeros((1, 2, 3), np.int32), num_experts=2)
    with pytest.raises(ValueError, match="at least one MoE layer"):
        make_trace(np.zeros((0, 2, 1), np.int32), num_experts=2, layer_ids=[], num_layers=1)
