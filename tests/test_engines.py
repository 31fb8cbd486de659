"""Engine records (vLLM, SGLang) built from real local traces of tiny models, encoded as each
engine documents them, read back to the same expert ids, layers and tokens."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import DeepseekV3Config

from moeviz.model.generation import Sampling, trace_generation
from moeviz.runs.engines import (
    EngineRecordError,
    decode_sglang_routed,
    decode_vllm_routed,
    engine_trace,
    moe_facts,
    read_sglang_dump,
    served_model,
    sglang_response_trace,
    vllm_output_trace,
    vllm_response_trace,
)
from moeviz.trace import RoutingTrace
from tests.conftest import tiny_mixtral_config, tiny_qwen2_moe_config

PROMPT = "The quick brown fox jumps over the lazy dog."


def test_moe_layers_come_from_the_config_for_three_families():
    deepseek = DeepseekV3Config(
        vocab_size=400, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=5,
        first_k_dense_replace=2, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        n_shared_experts=1, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    )
    facts = {name: moe_facts(config) for name, config in [
        ("mixtral", tiny_mixtral_config()), ("qwen2_moe", tiny_qwen2_moe_config()), ("deepseek_v3", deepseek)]}
    assert [(f.layer_ids, f.num_layers, f.num_experts, f.top_k, f.shared_experts) for f in facts.values()] == [
        ([0, 1, 2], 3, 6, 2, 0), ([1, 3], 4, 8, 3, 2), ([2, 3, 4], 5, 16, 4, 1)]
    assert facts["deepseek_v3"].scoring == "sigmoid"


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def served(request, tmp_path_factory, tokenizer, tiny_mixtral, tiny_qwen2_moe):
    """(ServedModel from a folder with config.json + tokenizer, local generation trace)."""
    model = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe}[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    local = trace_generation(model, tokenizer, PROMPT, Sampling(max_new_tokens=4), model_id="tiny")
    return served_model(folder, model_id="tiny"), local


def vllm_array(local: RoutingTrace, dtype=np.int32) -> np.ndarray:
    """What vLLM records: [tokens - 1, every layer, k], dense layers as expert 0."""
    routed = np.zeros((local.num_tokens, local.num_layers, local.top_k), dtype=dtype)
    routed[:, local.layer_ids] = local.topk_ids.transpose(1, 0, 2)
    return routed[:-1]


def assert_same_routing(engine: RoutingTrace, local: RoutingTrace, tokens: int | None = None):
    tokens = local.num_tokens - 1 if tokens is None else tokens
    np.testing.assert_array_equal(engine.topk_ids, local.topk_ids[:, :tokens])
    assert engine.layer_ids == local.layer_ids and engine.num_layers == local.num_layers
    assert engine.tokens == local.tokens[:tokens] and engine.token_ids == local.token_ids[:tokens]
    assert engine.num_experts == local.num_experts and engine.top_k == local.top_k
    assert engine.shared_experts == local.shared_experts
    assert not engine.has_logits and not engine.has_weights


def test_vllm_offline_request_output(served):
    model, local = served
    split = local.generated_from
    output = SimpleNamespace(token_ids=local.token_ids[split:], routed_experts=vllm_array(local))
    request = SimpleNamespace(prompt_token_ids=local.token_ids[:split], outputs=[output])
    trace = vllm_output_trace(model, request, text=PROMPT)
    assert_same_routing(trace, local)
    assert trace.engine == "vllm" and trace.generated_from == split
    assert trace.offsets[:split] == local.offsets[:split]  # the prompt keeps the tokenizer's offsets
    assert trace.text.startswith(PROMPT)


def test_vllm_http_nested_lists_with_prompt_routed_experts(served):
    """v0.21: the prompt's rows at the response level, the generated tokens' on the choice."""
    model, local = served
    split = local.generated_from
    routed = vllm_array(local)
    response = json.loads(json.dumps({
        "prompt_token_ids": local.token_ids[:split],
        "prompt_routed_experts": routed[:split].tolist(),
        "choices": [{"index": 0, "text": "...", "token_ids": local.token_ids[split:],
                     "routed_experts": routed[split:].tolist()}],
    }))
    assert_same_routing(vllm_response_trace(model, response), local)

    # One sampled token (a prompt-only request): its row is never recorded, the choice has none.
    response["choices"][0].update(token_ids=local.token_ids[split:split + 1], routed_experts=None)
    trace = vllm_response_trace(model, response)
    assert_same_routing(trace, local, tokens=split)
    assert trace.generated_from == -1


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_vllm_http_base64_npy(served, dtype):
    model, local = served
    buffer = io.BytesIO()
    np.save(buffer, vllm_array(local, dtype))
    response = {"choices": [{"routed_experts": base64.b64encode(buffer.getvalue()).decode("ascii")}]}
    split = local.generated_from
    trace = vllm_response_trace(model, response, prompt_ids=local.token_ids[:split], output_ids=local.token_ids[split:])
    assert_same_routing(trace, local)


def test_vllm_http_encoding_dict(served):
    model, local = served
    routed = vllm_array(local, np.int16)
    record = {"encoding": "base64", "dtype": "int16", "shape": list(routed.shape),
              "data": base64.b64encode(routed.tobytes()).decode("ascii")}
    np.testing.assert_array_equal(decode_vllm_routed(record), routed)
    trace = vllm_response_trace(model, {"prompt_token_ids": local.token_ids, "choices": [{"routed_experts": record}]})
    assert_same_routing(trace, local)
    assert trace.generated_from == -1  # everything given as prompt


def sglang_bytes(local: RoutingTrace, all_layers: bool = True) -> str:
    """SGLang's meta_info.routed_experts: base64 of int32 [tokens, layers, k], no shape."""
    rows = local.topk_ids.transpose(1, 0, 2)
    if all_layers:
        full = np.zeros((local.num_tokens, local.num_layers, local.top_k), dtype=np.int32)
        full[:, local.layer_ids] = rows
        rows = full
    return base64.b64encode(np.ascontiguousarray(rows, dtype="<i4").tobytes()).decode("ascii")


@pytest.mark.parametrize("all_layers", [True, False], ids=["every layer", "moe layers"])
def test_sglang_generate_meta_info(served, all_layers):
    model, local = served
    split = local.generated_from
    response = {"text": "...", "output_ids": local.token_ids[split:],
                "meta_info": {"routed_experts": sglang_bytes(local, all_layers)}}
    trace = sglang_response_trace(model, response, prompt_ids=local.token_ids[:split])
    assert_same_routing(trace, local, tokens=local.num_tokens)
    assert trace.engine == "sglang" and trace.generated_from == split


def test_sglang_openai_choice_meta_info(served):
    model, local = served
    response = {"choices": [{"text": "...", "meta_info": {"routed_experts": sglang_bytes(local)}}]}
    trace = sglang_response_trace(model, response, prompt_ids=local.token_ids)
    assert_same_routing(trace, local, tokens=local.num_tokens)


# -- SGLang's per_token recorder ---------------------------------------------------------------


def recorder_dump(traces: list[RoutingTrace], prefill: int, slots: int = 8, seed: int = 0) -> dict:
    """A per_token recorder dump of `traces` served together: one prefill pass of each trace's
    first `prefill` tokens, then one decode pass per remaining token of every sequence. Every
    logical expert has two physical slots; ids are physical, unused slots -1, dense layers -1."""
    rng = np.random.default_rng(seed)
    first = traces[0]
    experts, layers = first.num_experts, first.num_layers
    mapping = np.stack([rng.permutation(np.arange(2 * experts) % experts) for _ in range(layers)])  # [layers, 2E]

    def physical(trace, tokens):
        ids = np.full((layers, len(tokens), slots), -1, dtype=np.int32)
        for row, layer in enumerate(trace.layer_ids):
            for column, token in enumerate(tokens):
                for slot, expert in enumerate(trace.topk_ids[row, token]):
                    ids[layer, column, slot] = rng.choice(np.flatnonzero(mapping[layer] == expert))
        return ids

    def record(parts, extend):  # as SGLang's _DetailSinglePassGatherer collects one pass
        return {
            "forward_pass_id": len(records), "rank": 0, "gatherer_key": "primary",
            "input_ids": [t.token_ids[i] for t, tokens in parts for i in tokens],
            "positions": [i for _, tokens in parts for i in tokens],
            "extend_seq_lens": extend, "forward_mode": 1 if extend else 2, "misc_objects": [],
            "topk_ids_of_layer": torch.from_numpy(np.concatenate([physical(t, tokens) for t, tokens in parts], axis=1)),
        }

    records: list[dict] = []
    records.append(record([(t, range(prefill)) for t in traces], [prefill] * len(traces)))
    for step in range(prefill, max(t.num_tokens for t in traces)):
        records.append(record([(t, [step]) for t in traces if step < t.num_tokens], None))
    return {"records": records, "last_physical_to_logical_map": torch.from_numpy(mapping)}


def test_sglang_recorder_dump_maps_physical_slots_and_regroups_sequences(served, tmp_path):
    model, local = served
    shorter = dataclasses.replace(  # a second sequence, two tokens shorter
        local, tokens=local.tokens[:-2], token_ids=local.token_ids[:-2], offsets=local.offsets[:-2],
        topk_ids=local.topk_ids[:, :-2], topk_weights=local.topk_weights[:, :-2],
        router_logits=local.router_logits[:, :-2], input_token_count=-1)
    dump = recorder_dump([local, shorter], prefill=5)
    assert (dump["records"][0]["topk_ids_of_layer"][..., local.top_k:] == -1).all()
    path = tmp_path / "expert_distribution_recorder_1764000000.0_0.pt"
    torch.save(dump, path)

    traces = read_sglang_dump(path, model)
    assert len(traces) == 2
    assert_same_routing(traces[0], local, tokens=local.num_tokens)
    assert_same_routing(traces[1], shorter, tokens=shorter.num_tokens)
    assert {t.engine for t in traces} == {"sglang"}


def test_recorder_dump_with_a_pickled_object_is_refused(served, tmp_path):
    model, _ = served
    path = tmp_path / "hostile.pt"
    torch.save({"records": [{"topk_ids_of_layer": torch.zeros(1, 1, 8), "note": SimpleNamespace(x=1)}],
                "last_physical_to_logical_map": torch.zeros(1, 8)}, path)
    with pytest.raises(EngineRecordError, match=r"weights_only=True.*never unpickles arbitrary objects"):
        read_sglang_dump(path, model)


# -- errors people can act on ---------------------------------------------------------------


def test_records_that_do_not_fit_give_clear_errors(served):
    model, local = served
    with pytest.raises(EngineRecordError, match="no routed_experts: start the server with --enable-return-routed"):
        vllm_response_trace(model, {"prompt_token_ids": [1, 2], "choices": [{"text": "hi"}]})
    with pytest.raises(EngineRecordError, match="no meta_info.routed_experts"):
        sglang_response_trace(model, {"text": "hi", "meta_info": {}}, prompt_ids=[1, 2])
    with pytest.raises(EngineRecordError, match="routing for 3 tokens, but the request has 7 token ids"):
        engine_trace(model, vllm_array(local)[:3], local.token_ids[:7], engine="vllm")
    with pytest.raises(EngineRecordError, match="the record has 7 layers"):
        engine_trace(model, np.zeros((2, 7, local.top_k), dtype=np.int32), [1, 2], engine="vllm")
    with pytest.raises(EngineRecordError, match="not valid base64"):
        decode_vllm_routed("not base64!")
    with pytest.raises(EngineRecordError, match="fits neither"):
        decode_sglang_routed(base64.b64encode(b"\x00" * 12).decode(), model, 5)
