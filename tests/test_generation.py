"""Routing captured during generation equals one forward pass over the same tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeviz.model.capture import build_trace, recording_routers
from moeviz.model.generation import Sampling, trace_generation
from moeviz.model.tokens import Tokenized


def single_forward_trace(model, trace):
    tokenized = Tokenized(trace.token_ids, trace.tokens, trace.offsets, trace.num_tokens)
    with recording_routers(model) as collector, torch.inference_mode():
        model(input_ids=torch.tensor([trace.token_ids]), use_cache=False)
    return build_trace(model, tokenized, trace.text, collector, model_id="")


@pytest.mark.parametrize("sampling", [Sampling(max_new_tokens=12), Sampling(max_new_tokens=12, temperature=1.0, seed=3)])
@pytest.mark.parametrize("model_name", ["tiny_mixtral", "tiny_qwen2_moe"])
def test_generation_trace_equals_single_forward(request, tokenizer, model_name, sampling):
    model = request.getfixturevalue(model_name)
    prompt = "The quick brown fox"
    trace = trace_generation(model, tokenizer, prompt, sampling)
    prompt_length = len(tokenizer(prompt)["input_ids"])

    assert trace.generated and trace.generated_from == prompt_length
    assert trace.num_tokens == prompt_length + 12  # the tiny vocabulary has no reachable EOS here
    assert trace.text.startswith(prompt) and len(trace.text) > len(prompt)
    reference = single_forward_trace(model, trace)
    np.testing.assert_array_equal(trace.first_choice, reference.first_choice)
    np.testing.assert_allclose(trace.router_probs, reference.router_probs, atol=1e-5)
    np.testing.assert_allclose(trace.topk_weights, reference.topk_weights, atol=1e-5)


def test_generation_is_reproducible_with_a_seed(tokenizer, tiny_mixtral):
    sampling = Sampling(max_new_tokens=8, temperature=1.5, seed=7)
    first = trace_generation(tiny_mixtral, tokenizer, "hello", sampling)
    again = trace_generation(tiny_mixtral, tokenizer, "hello", sampling)
    other = trace_generation(tiny_mixtral, tokenizer, "hello", Sampling(max_new_tokens=8, temperature=1.5, seed=8))
    assert first.token_ids == again.token_ids != other.token_ids


def test_generated_offsets_cover_the_continuation(tokenizer, tiny_mixtral):
    trace = trace_generation(tiny_mixtral, tokenizer, "Answer:", Sampling(max_new_tokens=6))
    generated = trace.offsets[trace.generated_from:]
    assert generated[0][0] == len("Answer:") and generated[-1][1] == len(trace.text)
    assert all(a_end == b_start for (_, a_end), (b_start, _) in zip(generated, generated[1:]))


def test_bad_sampling_and_long_prompts_are_refused(tokenizer, tiny_mixtral):
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sampling(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match="token limit"):
        trace_generation(tiny_mixtral, tokenizer, "word " * 50, max_tokens=10)


def test_generated_part_is_marked_in_the_charts(tokenizer, tiny_mixtral):
    from html.parser import HTMLParser

    from moeviz.views import charts

    trace = trace_generation(tiny_mixtral, tokenizer, "The quick", Sampling(max_new_tokens=5))
    layer = trace.layer_ids[0]
    heatmap = charts.probability_heatmap(trace, layer)
    [line] = [shape for shape in heatmap.layout.shapes if shape.type == "line"]
    assert line.x0 == line.x1 == trace.generated_from - 0.5

    classes = []

    class Spans(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "span" and "moeviz-token" in dict(attrs).get("class", ""):
                classes.append(dict(attrs)["class"])

    Spans().feed(charts.token_view_html(trace, layer))
    marked = ["moeviz-generated" in c for c in classes]
    assert marked == [i >= trace.generated_from for i in range(trace.num_tokens)]
