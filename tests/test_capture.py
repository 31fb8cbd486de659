"""Capture records exactly what the experts received, per true layer number, thread-safely."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moeviz.model.capture import NoRoutersError, find_routers, recording_routers, trace_text

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Съешь же ещё этих мягких французских булок.",
    "What is 12 + 7? Answer: 19",
    "Emoji 👩‍🔬 and combining e\u0301 and עברית",
    "<script>alert(1)</script> & <img src=x onerror=alert(1)>",
    "lorem ipsum dolor sit amet " * 20,
]


def experts_inputs(model, input_ids):
    """What each MoE layer's experts module received: {layer: (top_k_index, top_k_weights)},
    and each router's logits, observed independently of moeviz."""
    received, logits, handles = {}, {}, []
    for index, layer in enumerate(model.model.layers):
        if not hasattr(layer.mlp, "experts"):
            continue
        handles.append(layer.mlp.experts.register_forward_pre_hook(
            lambda module, args, index=index: received.__setitem__(index, (args[1].clone(), args[2].clone()))))
        handles.append(layer.mlp.gate.register_forward_hook(
            lambda module, args, output, index=index: logits.__setitem__(index, output[0].clone())))
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return received, logits


@pytest.mark.parametrize("model_name, expected_layers", [("tiny_mixtral", [0, 1, 2]), ("tiny_qwen2_moe", [1, 3])])
def test_capture_equals_what_experts_received(request, tokenizer, model_name, expected_layers):
    model = request.getfixturevalue(model_name)
    text = TEXTS[0] + " " + TEXTS[2]
    trace = trace_text(model, tokenizer, text)

    input_ids = torch.tensor([trace.token_ids])
    received, logits = experts_inputs(model, input_ids)
    assert trace.layer_ids == expected_layers == sorted(received)
    assert trace.num_layers == model.config.num_hidden_layers
    for position, layer in enumerate(trace.layer_ids):
        ids, weights = received[layer]
        np.testing.assert_array_equal(trace.topk_ids[position], ids.numpy())
        np.testing.assert_allclose(trace.topk_weights[position], weights.float().numpy(), rtol=0, atol=0)
        np.testing.assert_allclose(trace.router_logits[position], logits[layer].float().numpy(), rtol=0, atol=0)
    assert trace.top_k == model.config.num_experts_per_tok
    assert trace.model_type == model.config.model_type
    # first choice is the highest weight
    assert (trace.topk_weights[..., 0] >= trace.topk_weights[..., -1]).all()


def test_qwen2_moe_weights_are_unnormalised_probabilities(tokenizer, tiny_qwen2_moe):
    # norm_topk_prob=False: the weights the experts get are the raw softmax probabilities.
    trace = trace_text(tiny_qwen2_moe, tokenizer, TEXTS[1])
    picked = np.take_along_axis(trace.router_probs, trace.topk_ids.astype(np.int64), -1)
    np.testing.assert_allclose(trace.topk_weights, picked, atol=1e-6)
    assert (trace.topk_weights.sum(-1) < 1.0).all()


def test_hooks_are_removed_after_the_call(tokenizer, tiny_mixtral):
    trace_text(tiny_mixtral, tokenizer, TEXTS[0])
    assert all(not site.module._forward_hooks for site in find_routers(tiny_mixtral))


def test_hooks_are_removed_when_the_forward_raises(tiny_mixtral):
    out_of_vocabulary = torch.tensor([[tiny_mixtral.config.vocab_size + 5]])
    with pytest.raises(IndexError):
        with recording_routers(tiny_mixtral):
            tiny_mixtral(input_ids=out_of_vocabulary)
    assert all(not site.module._forward_hooks for site in find_routers(tiny_mixtral))


def test_eight_threads_each_get_their_own_routing(tokenizer, tiny_mixtral):
    alone = [trace_text(tiny_mixtral, tokenizer, text) for text in TEXTS]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda text: trace_text(tiny_mixtral, tokenizer, text), TEXTS * 2))
    for expected, got in zip(alone * 2, together):
        assert got.tokens == expected.tokens
        np.testing.assert_array_equal(got.topk_ids, expected.topk_ids)
        np.testing.assert_allclose(got.router_logits, expected.router_logits, atol=1e-5)


def test_dense_model_gives_a_clear_error(tokenizer):
    config = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(NoRoutersError, match=r"\(llama\) has no MoE routers.*dense model"):
        trace_text(LlamaForCausalLM(config), tokenizer, "hello")


def test_text_is_cut_at_the_token_limit(tokenizer, tiny_mixtral):
    trace = trace_text(tiny_mixtral, tokenizer, TEXTS[-1], max_tokens=16)
    assert trace.num_tokens == 16 and trace.topk_ids.shape[1] == 16
    assert trace.truncated and trace.input_token_count > 16


def test_empty_text_is_refused(tokenizer, tiny_mixtral):
    with pytest.raises(ValueError, match="empty"):
        trace_text(tiny_mixtral, tokenizer, " \n\t ")


def test_tokens_keep_offsets_and_show_partial_utf8_bytes(tokenizer, tiny_mixtral):
    text = "ok 👩‍🔬"
    trace = trace_text(tiny_mixtral, tokenizer, text)
    # The emoji is not in the tiny vocabulary: it arrives as byte tokens, shown as \x escapes,
    # and all the bytes together spell the original text.
    joined = "".join(trace.tokens).encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1")
    assert joined.decode("utf-8") == text
    assert any(token.startswith("\\x") for token in trace.tokens)
    for token, (start, end) in zip(trace.tokens, trace.offsets):
        if "\\x" not in token:
            assert text[start:end] == token
