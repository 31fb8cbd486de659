"""RoutingTrace files: exact round trip, clear errors for damaged or foreign files."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy
from factories import make_trace

from moeviz.model.capture import trace_text
from moeviz.trace import RoutingTrace, TraceFileError


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
