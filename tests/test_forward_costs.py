"""What moeviz's forward passes compute and copy: logits only where they are read, and the
recorded routing copied to the host once per recording, not per layer."""

from __future__ import annotations

import numpy as np
import torch

from moeviz.model.capture import last_logit_only, recording_routers, trace_text
from moeviz.model.generation import Sampling, trace_generation
from moeviz.runs.corpus import trace_batch


class LmHeadRows:
    """Positions the lm_head computed logits for, per forward pass."""

    def __init__(self, model):
        self.rows = []
        self._handle = model.get_output_embeddings().register_forward_hook(
            lambda module, args, output: self.rows.append(tuple(args[0].shape[:-1])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def test_trace_text_computes_no_logits_but_the_last(tokenizer, tiny_mixtral):
    with LmHeadRows(tiny_mixtral) as head:
        trace = trace_text(tiny_mixtral, tokenizer, "The quick brown fox jumps over the lazy dog.")
    assert trace.num_tokens > 5
    assert head.rows == [(1, 1)]  # not (1, tokens): the logits are never read


def test_trace_batch_computes_one_logit_per_text(tokenizer, tiny_qwen2_moe):
    texts = ["The quick brown fox", "def add(a, b):\n    return a + b", "What is 12 + 7?"]
    with LmHeadRows(tiny_qwen2_moe) as head:
        traces = trace_batch(tiny_qwen2_moe, tokenizer, texts)
    assert head.rows == [(3, 1)]
    for text, trace in zip(texts, traces):  # the routing is what it was
        alone = trace_text(tiny_qwen2_moe, tokenizer, text)
        np.testing.assert_array_equal(trace.topk_ids, alone.topk_ids)


def test_generation_prefill_computes_the_last_logit_only_and_generates_the_same(tokenizer, tiny_mixtral):
    prompt = "The quick brown fox jumps"
    with LmHeadRows(tiny_mixtral) as head:
        trace = trace_generation(tiny_mixtral, tokenizer, prompt, Sampling(max_new_tokens=5))
    assert head.rows == [(1, 1)] * 6  # prefill, then one row per generated token
    ids = list(trace.token_ids[: trace.generated_from])
    with torch.inference_mode():  # greedy from the full logits of every position: the same tokens
        for _ in range(5):
            ids.append(int(tiny_mixtral(torch.tensor([ids])).logits[0, -1].argmax()))
    assert trace.token_ids == ids


def test_a_model_without_logits_to_keep_gets_no_such_argument(tiny_mixtral):
    class Plain(torch.nn.Module):
        def forward(self, input_ids, use_cache=False):
            return input_ids

    assert last_logit_only(tiny_mixtral) == {"logits_to_keep": 1}
    assert last_logit_only(Plain()) == {}


def test_recorded_routing_is_a_copy_taken_when_the_router_ran(tiny_mixtral):
    """Tensors stay on the model's device until the recording ends, so each must be a copy: a
    router output changed in place later must not change what was recorded."""
    router = tiny_mixtral.model.layers[0].mlp.gate
    seen = []
    scribble = router.register_forward_hook(lambda module, args, output: seen.append(output[0]))
    try:
        with recording_routers(tiny_mixtral) as collector, torch.inference_mode():
            tiny_mixtral(torch.tensor([[1, 2, 3, 4]]))
            recorded = collector["model.layers.0.mlp.gate"]["logits"][0].clone()
            seen[0].add_(100.0)  # after the hook: what a model reusing its buffers would do
    finally:
        scribble.remove()
    assert torch.equal(collector["model.layers.0.mlp.gate"]["logits"][0], recorded)
    assert collector["model.layers.0.mlp.gate"]["logits"][0].device.type == "cpu"
