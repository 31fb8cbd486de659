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
    assert trace.special_ids == [0, 1]  # <s>, </s>; <unk> stands for text
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


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A real SentencePiece-style tokenizer (Metaspace: "▁" marks a space; decoding drops the
    one at the start of a sequence), as Mixtral's and Llama 2's tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import TRAINING_TEXT

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_continuation_keeps_the_space_sentencepiece_drops_at_a_sequence_start(sentencepiece_tokenizer):
    from moeviz.model.generation import with_generation
    from moeviz.model.tokens import tokenize

    tok = sentencepiece_tokenizer
    new_ids = tok(" brown", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(new_ids)[0].startswith("\u2581")
    _, text = with_generation(tok, "The quick", tokenize(tok, "The quick", 100), new_ids + [tok.eos_token_id])
    assert text == "The quick brown"  # decoding " brown" alone gives "brown": "The quickbrown"


def test_generated_text_is_the_whole_sequence_decoded(sentencepiece_tokenizer):
    from transformers import MixtralForCausalLM

    from conftest import tiny_mixtral_config

    tok = sentencepiece_tokenizer
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config(vocab_size=len(tok))).eval()
    trace = trace_generation(model, tok, "The quick brown fox", Sampling(max_new_tokens=8))
    assert trace.text == tok.decode(trace.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    generated = trace.offsets[trace.generated_from:]
    assert generated[0][0] == len("The quick brown fox") and generated[-1][1] == len(trace.text)


def test_generation_stops_on_every_end_of_sequence_id(tokenizer, tiny_mixtral):
    """generation_config.eos_token_id may be a list (Llama 3: end of text and end of turn);
    each id in it ends the generation, as `model.generate` does."""
    free = trace_generation(tiny_mixtral, tokenizer, "The quick brown fox", Sampling(max_new_tokens=12))
    new = free.token_ids[free.generated_from:]
    stop_at = next(i for i in range(2, len(new)) if new[i] not in new[:i])
    saved = tiny_mixtral.generation_config.eos_token_id
    tiny_mixtral.generation_config.eos_token_id = [tokenizer.eos_token_id, new[stop_at]]
    try:
        trace = trace_generation(tiny_mixtral, tokenizer, "The quick brown fox", Sampling(max_new_tokens=12))
    finally:
        tiny_mixtral.generation_config.eos_token_id = saved
    assert trace.token_ids[trace.generated_from:] == new[: stop_at + 1]
    assert trace.stop_reason == "eos" and free.stop_reason == "max_new_tokens"


def test_stop_reason_names_the_limit_that_stopped_generation(tokenizer, tiny_mixtral):
    from transformers import MixtralForCausalLM

    from conftest import tiny_mixtral_config
    from moeviz.trace import RoutingTrace

    prompt = "The quick brown fox"
    length = len(tokenizer(prompt)["input_ids"])
    limited = trace_generation(tiny_mixtral, tokenizer, prompt, Sampling(max_new_tokens=12), max_tokens=length + 3)
    assert limited.num_tokens == length + 3 and limited.stop_reason == "token_limit"

    config = tiny_mixtral_config()
    config.max_position_embeddings = length + 2
    torch.manual_seed(0)
    short = MixtralForCausalLM(config).eval()
    trace = trace_generation(short, tokenizer, prompt, Sampling(max_new_tokens=12))
    assert trace.num_tokens == length + 2 and trace.stop_reason == "context"
    assert RoutingTrace.from_bytes(trace.to_bytes()).stop_reason == "context"
    with pytest.raises(ValueError, match=f"trained on {length + 2} positions"):
        trace_generation(short, tokenizer, prompt + " jumps over the lazy dog", Sampling(max_new_tokens=12))
