"""Engine records (vLLM, SGLang) built with the engines' own serialization, re-implemented line by
line from their released code (cited at each builder), read back to the exact expert ids, or
refused with a message that says what to do.

Shapes: real local traces of tiny models (tokens and text), and configs shaped like the served
models where a record's size fits two readings: 61 layers with 1 dense layer (Kimi-K2: 384
experts, so vLLM sends uint16) and 3 (DeepSeek-V3), 27 layers with 1 (DeepSeek-V2-Lite). A text as
long as the model has layers is the case in point: tokens x MoE layers = (tokens - 1) x layers.
"""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config

from moeviz.model.generation import Sampling, trace_generation
from moeviz.runs.engines import (
    EngineRecordError,
    decode_sglang_routed,
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


# -- the engines' serialization, re-implemented ------------------------------------------------


def vllm_rows(truth: np.ndarray, layer_ids, num_layers: int, num_experts: int, prompt_start: int = 0) -> np.ndarray:
    """vLLM 0.22.0 / 0.33.0 offline `CompletionOutput.routed_experts` for `truth`
    int[tokens, MoE layers, k]. 0.22.0 model_executor/layers/fused_moe/routed_experts_capturer.py
    `RoutedExpertsManager`: `expert_id_dtype = np.uint8 if num_experts <= 256 else np.uint16`, a
    zeroed slot buffer (slots, num_hidden_layers, k) written at `layer_id` (the decoder layer);
    v1/core/sched/scheduler.py: the prompt's rows from `routed_experts_prompt_start`, then one row
    per decode step for the token it forwarded; v1/engine/output_processor.py concatenates them.
    The last sampled token is never forwarded. (0.33.0: `output_dtype_name = "uint8" if
    num_experts <= 256 else "uint16"`, `get_total_num_hidden_layers()` columns.)"""
    buffer = np.zeros((len(truth) - 1, num_layers, truth.shape[2]), dtype=np.uint8 if num_experts <= 256 else np.uint16)
    buffer[:, layer_ids] = truth[:-1]
    return buffer[prompt_start:]


def numpy2base64(array: np.ndarray) -> str:
    """vLLM 0.33.0 utils/serial_utils.py `numpy2base64` (0.22.0 completion/serving.py writes the
    same bytes with `np.save(buf, ...)` and `base64.b64encode(buf.getvalue())`)."""
    with io.BytesIO() as buffer:
        np.save(buffer, array, allow_pickle=False)
        return base64.b64encode(buffer.getbuffer()).decode("ascii")


def vllm_021_parts(truth: np.ndarray, rows: int, prompt_len: int, num_output_tokens: int):
    """vLLM 0.21.0 (prompt_routed_experts, generated routed_experts). routed_experts_capturer.py:
    `_RoutedExpertsHostCache` int16 zeros (seq_len, `_count_moe_layers(hf_text_config)` = `rows`,
    k) indexed by `FusedMoE.moe_layer_id` (layer.py: a counter over MoE layers as built), rows
    scattered at the forwarded positions; `split_routed_experts` cuts at prompt_len, clips the
    generated part to num_output_tokens, and turns an empty part into None."""
    buffer = np.zeros((len(truth) - 1, rows, truth.shape[2]), dtype=np.int16)
    buffer[:, :truth.shape[1]] = truth[:-1]
    prompt, generated = buffer[:prompt_len], buffer[prompt_len:]
    if generated.shape[0] > num_output_tokens > 0:
        generated = generated[:num_output_tokens]
    return (prompt if prompt.size else None), (generated if generated.size else None)


def sglang_payload(truth: np.ndarray, layer_ids, num_layers: int, start_len: int = 0,
                   wire: str | None = None) -> tuple[str, str | None]:
    """SGLang's (routed_experts, routed_experts_dtype). 0.5.23 srt/state_capturer/base.py: an
    int32 host buffer (tokens, num_hidden_layers, k) written at the decoder layer,
    `get_topk` returns rows `[start_len, seqlen - 1)`; srt/managers/detokenizer_manager.py
    `_b64_encode_per_request`: `pybase64.b64encode(item.numpy().tobytes())`, no dtype sent.
    SGLang main (srt/state_capturer/routed_experts_wire.py `encode_routed_experts_for_wire`,
    `wire` = SGLANG_ROUTED_EXPERTS_DTYPE): cast to the wire dtype unless an id does not fit, in
    which case int32, and say which in `routed_experts_dtype`."""
    buffer = np.zeros((len(truth), num_layers, truth.shape[2]), dtype=np.int32)
    buffer[:, layer_ids] = truth
    array = buffer[min(start_len, len(truth) - 1):len(truth) - 1]
    if wire is None:
        return base64.b64encode(array.tobytes()).decode("utf-8"), None
    target = np.dtype(wire)
    if target.kind == "u" and array.size and (array.min() < np.iinfo(target).min or array.max() > np.iinfo(target).max):
        target = np.dtype(np.int32)
    return base64.b64encode(array.astype(target, copy=False).tobytes()).decode("utf-8"), target.name


# -- served models shaped like the real ones ---------------------------------------------------

_SMALL = {"vocab_size": 300, "hidden_size": 16, "intermediate_size": 16, "moe_intermediate_size": 8,
          "num_attention_heads": 2, "num_key_value_heads": 2, "kv_lora_rank": 8, "q_lora_rank": 8,
          "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 4}
SHAPES = {
    "deepseek-v3 (61 layers, 3 dense)": lambda: DeepseekV3Config(
        **_SMALL, num_hidden_layers=61, first_k_dense_replace=3, n_routed_experts=256, num_experts_per_tok=8,
        n_group=8, topk_group=4, n_shared_experts=1),
    "kimi-k2 (61 layers, 1 dense)": lambda: DeepseekV3Config(
        **_SMALL, num_hidden_layers=61, first_k_dense_replace=1, n_routed_experts=384, num_experts_per_tok=8,
        n_group=1, topk_group=1, n_shared_experts=1),
    "deepseek-v2-lite (27 layers, 1 dense)": lambda: DeepseekV2Config(
        **{**_SMALL, "q_lora_rank": None}, num_hidden_layers=27, first_k_dense_replace=1, n_routed_experts=64,
        num_experts_per_tok=6, n_group=1, topk_group=1, n_shared_experts=2),
    "tiny mixtral (3 layers)": tiny_mixtral_config,
}


@pytest.fixture(scope="module", params=list(SHAPES))
def shaped(request, tmp_path_factory):
    """(ServedModel without tokenizer, truth int[tokens, MoE layers, k], token ids): as many
    tokens as the model has layers, distinct experts per token and layer."""
    folder = tmp_path_factory.mktemp("shaped")
    SHAPES[request.param]().save_pretrained(folder)
    model = served_model(folder, model_id=request.param)
    facts, rng = model.facts, np.random.default_rng(len(request.param))
    tokens = max(facts.num_layers, 8)
    truth = np.stack([np.stack([rng.permutation(facts.num_experts)[:facts.top_k] for _ in facts.layer_ids])
                      for _ in range(tokens)])
    return model, truth, [int(i) for i in rng.integers(3, 290, tokens)]


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepseek-v3")
    SHAPES["deepseek-v3 (61 layers, 3 dense)"]().save_pretrained(folder)
    return served_model(folder, model_id="deepseek-v3")


def assert_ids(trace: RoutingTrace, truth: np.ndarray, ids: list[int], start: int = 0):
    """The trace holds tokens start .. -2 (the last sampled token is never forwarded) with the
    true experts at the true MoE layers."""
    np.testing.assert_array_equal(trace.topk_ids, truth[start:-1].transpose(1, 0, 2))
    assert trace.token_ids == ids[start:-1] and trace.num_tokens == len(ids) - 1 - start


@pytest.mark.parametrize("prompt_start", [0, 5])
def test_vllm_022_and_033_offline_and_http(shaped, prompt_start):
    model, truth, ids = shaped
    facts, split = model.facts, len(ids) - 4
    routed = vllm_rows(truth, facts.layer_ids, facts.num_layers, facts.num_experts, prompt_start)
    assert routed.dtype == (np.uint16 if facts.num_experts > 256 else np.uint8)
    output = SimpleNamespace(token_ids=ids[split:], routed_experts=routed)
    offline = vllm_output_trace(model, SimpleNamespace(prompt_token_ids=ids[:split], outputs=[output]),
                                prompt_start=prompt_start)
    assert_ids(offline, truth, ids, prompt_start)
    assert offline.generated_from == split - prompt_start and offline.layer_ids == facts.layer_ids
    response = json.loads(json.dumps({"choices": [{  # /v1/completions with return_token_ids
        "index": 0, "text": "...", "prompt_token_ids": ids[:split], "token_ids": ids[split:],
        "routed_experts": numpy2base64(routed)}]}))
    assert_ids(vllm_response_trace(model, response, prompt_start=prompt_start), truth, ids, prompt_start)
    chat = {"prompt_token_ids": ids[:split], "choices": [{"index": 0, "token_ids": ids[split:],
                                                           "routed_experts": numpy2base64(routed)}]}
    assert_ids(vllm_response_trace(model, chat, prompt_start=prompt_start), truth, ids, prompt_start)
    if prompt_start:
        with pytest.raises(EngineRecordError, match="pass the request's start option"):
            vllm_response_trace(model, response)


def test_vllm_021_offline_and_http(shaped):
    model, truth, ids = shaped
    split = len(ids) - 4
    prompt_rows, generated = vllm_021_parts(truth, model.vllm_021_layer_rows, split, len(ids) - split)
    request = SimpleNamespace(prompt_token_ids=ids[:split], prompt_routed_experts=prompt_rows,
                              outputs=[SimpleNamespace(token_ids=ids[split:], routed_experts=generated)])
    assert_ids(vllm_output_trace(model, request), truth, ids)
    response = json.loads(json.dumps({  # completion/serving.py: .tolist() of both parts
        "prompt_routed_experts": prompt_rows.tolist(),
        "choices": [{"index": 0, "prompt_token_ids": ids[:split], "token_ids": ids[split:],
                     "routed_experts": generated.tolist()}]}))
    assert_ids(vllm_response_trace(model, response), truth, ids)


def test_a_vllm_021_record_handed_over_as_a_newer_one_is_refused(deepseek):
    """DeepSeek-V3 in vLLM 0.21: 61 rows as in 0.22, but the 58 MoE layers packed into rows
    0..57 and rows 58..60 zero. Read at the MoE layers' own columns, the last three are zeros."""
    model = deepseek
    rng = np.random.default_rng(0)
    truth = np.stack([np.stack([rng.permutation(256)[:8] for _ in range(58)]) for _ in range(61)])
    prompt_rows, generated = vllm_021_parts(truth, 61, 57, 4)
    packed = np.concatenate([prompt_rows, generated])
    output = SimpleNamespace(token_ids=list(range(57, 61)), routed_experts=packed)
    with pytest.raises(EngineRecordError, match="lists expert 0 twice at layer 58"):
        vllm_output_trace(model, SimpleNamespace(prompt_token_ids=list(range(57)), outputs=[output]))


def test_vllm_021_rows_of_a_prefix_cache_hit_are_refused(shaped):
    """vLLM 0.21 scatters only the forwarded positions into a zeroed buffer: a prefix-cache hit
    leaves the cached tokens' rows at 0."""
    model, truth, ids = shaped
    split = len(ids) - 4
    prompt_rows, generated = vllm_021_parts(truth, model.vllm_021_layer_rows, split, 4)
    prompt_rows[:3] = 0
    request = SimpleNamespace(prompt_token_ids=ids[:split], prompt_routed_experts=prompt_rows,
                              outputs=[SimpleNamespace(token_ids=ids[split:], routed_experts=generated)])
    with pytest.raises(EngineRecordError, match="--no-enable-prefix-caching"):
        vllm_output_trace(model, request)


@pytest.mark.parametrize("start_len", [0, 3])
@pytest.mark.parametrize("wire", [None, "int32", "uint16", "uint8"], ids=["0.5.23", "main int32", "main uint16",
                                                                         "main uint8"])
def test_sglang_generate(shaped, wire, start_len):
    model, truth, ids = shaped
    facts, split = model.facts, len(ids) - 4
    data, dtype = sglang_payload(truth, facts.layer_ids, facts.num_layers, start_len, wire)
    if wire == "uint8" and facts.num_experts > 256:
        assert dtype == "int32"  # the ids do not fit: SGLang keeps int32 and says so
    meta = {"id": "x", "prompt_tokens": split, "routed_experts": data}
    if dtype is not None:
        meta["routed_experts_dtype"] = dtype
    response = json.loads(json.dumps({"text": "...", "output_ids": ids[split:], "meta_info": meta}))
    trace = sglang_response_trace(model, response, prompt_ids=ids[:split], start_len=start_len)
    assert_ids(trace, truth, ids, start_len)
    assert trace.engine == "sglang" and trace.generated_from == split - start_len


def test_sglang_openai_sglext(shaped):
    """serving_completions.py: the first choice's record at response level, `sglext.routed_experts`;
    `token_ids` / `prompt_token_ids` on the choice when the request sets return_token_ids."""
    model, truth, ids = shaped
    split = len(ids) - 4
    data, _ = sglang_payload(truth, model.facts.layer_ids, model.facts.num_layers)
    response = {"object": "text_completion", "choices": [{"index": 0, "text": "...", "token_ids": ids[split:],
                                                          "prompt_token_ids": ids[:split]}],
                "sglext": {"routed_experts": data}}
    assert_ids(sglang_response_trace(model, response), truth, ids)
    with pytest.raises(EngineRecordError, match="no sglext.routed_experts"):
        sglang_response_trace(model, {"choices": response["choices"]})


def test_sglang_narrow_bytes_without_their_dtype_are_refused(shaped):
    model, truth, ids = shaped
    data, _ = sglang_payload(truth, model.facts.layer_ids, model.facts.num_layers, wire="uint16")
    with pytest.raises(EngineRecordError, match="fits uint16 ids, but the response does not say routed_experts_dtype"):
        sglang_response_trace(model, {"output_ids": ids[-2:], "meta_info": {"routed_experts": data}},
                              prompt_ids=ids[:-2])


# -- real local traces: tokens and text --------------------------------------------------------


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def served(request, tmp_path_factory, tokenizer, tiny_mixtral, tiny_qwen2_moe):
    """(ServedModel from a folder with config.json + tokenizer, local generation trace)."""
    model = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe}[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    local = trace_generation(model, tokenizer, PROMPT, Sampling(max_new_tokens=4), model_id="tiny")
    return served_model(folder, model_id="tiny"), local


def truth_of(local: RoutingTrace) -> np.ndarray:
    return local.topk_ids.transpose(1, 0, 2)


def assert_same_routing(engine: RoutingTrace, local: RoutingTrace, tokens: int):
    np.testing.assert_array_equal(engine.topk_ids, local.topk_ids[:, :tokens])
    assert engine.layer_ids == local.layer_ids and engine.num_layers == local.num_layers
    assert engine.tokens == local.tokens[:tokens] and engine.token_ids == local.token_ids[:tokens]
    assert engine.num_experts == local.num_experts and engine.top_k == local.top_k
    assert engine.shared_experts == local.shared_experts
    assert not engine.has_logits and not engine.has_weights


def test_vllm_offline_keeps_the_prompt_text(served):
    model, local = served
    split = local.generated_from
    routed = vllm_rows(truth_of(local), local.layer_ids, local.num_layers, local.num_experts)
    output = SimpleNamespace(token_ids=local.token_ids[split:], routed_experts=routed)
    trace = vllm_output_trace(model, SimpleNamespace(prompt_token_ids=local.token_ids[:split], outputs=[output]),
                              text=PROMPT)
    assert_same_routing(trace, local, local.num_tokens - 1)
    assert trace.engine == "vllm" and trace.generated_from == split
    assert trace.offsets[:split] == local.offsets[:split]  # the prompt keeps the tokenizer's offsets
    assert trace.text.startswith(PROMPT)


def test_vllm_021_with_one_sampled_token(served):
    """A prompt-only request: split_routed_experts leaves the generated part empty (None)."""
    model, local = served
    split = local.generated_from
    truth = truth_of(local)[:split + 1]
    prompt_rows, generated = vllm_021_parts(truth, model.vllm_021_layer_rows, split, 1)
    assert generated is None
    response = {"prompt_routed_experts": prompt_rows.tolist(), "choices": [
        {"prompt_token_ids": local.token_ids[:split], "token_ids": local.token_ids[split:split + 1],
         "routed_experts": None}]}
    trace = vllm_response_trace(model, response)
    assert_same_routing(trace, local, split)
    assert trace.generated_from == -1


def test_sglang_generate_with_tokens(served):
    model, local = served
    split = local.generated_from
    data, _ = sglang_payload(truth_of(local), local.layer_ids, local.num_layers)
    response = {"text": "...", "output_ids": local.token_ids[split:], "meta_info": {"routed_experts": data}}
    trace = sglang_response_trace(model, response, prompt_ids=local.token_ids[:split], text=PROMPT)
    assert_same_routing(trace, local, local.num_tokens - 1)
    assert trace.offsets[:split] == local.offsets[:split]


# -- SGLang's per_token recorder ---------------------------------------------------------------

EXTEND, DECODE = 1, 2  # ForwardMode (srt/model_executor/forward_batch_info.py)


class Recorder:
    """Records passes as SGLang 0.5.23's `_DetailSinglePassGatherer` does (srt/eplb/
    expert_distribution.py): per pass `input_ids`, `positions`, `extend_seq_lens`
    (`extend_seq_lens_cpu`, None in decode), `forward_mode`, and `topk_ids_of_layer` int32
    [num_layers, tokens, 8], reset to -1 before each pass and written at the decoder layer with
    physical slots; `_DetailAccumulator.dump` adds `last_physical_to_logical_map`. Every logical
    expert has two physical slots here (as with redundant experts)."""

    def __init__(self, model, seed=0, identity=False):
        facts = model.facts
        self.facts, self.rng, self.records = facts, np.random.default_rng(seed), []
        experts = facts.num_experts
        self.mapping = (np.tile(np.arange(experts), (facts.num_layers, 1)) if identity else
                        np.stack([self.rng.permutation(np.arange(2 * experts) % experts)
                                  for _ in range(facts.num_layers)]))

    def record(self, mode, parts):
        """parts: (truth int[tokens, MoE layers, k], ids, positions) per sequence in the batch."""
        slots = np.full((self.facts.num_layers, sum(len(p) for _, _, p in parts), 8), -1, dtype=np.int32)
        column = 0
        for truth, _, positions in parts:
            for position in positions:
                for row, layer in enumerate(self.facts.layer_ids):
                    for slot, expert in enumerate(truth[position, row]):
                        slots[layer, column, slot] = self.rng.choice(np.flatnonzero(self.mapping[layer] == expert))
                column += 1
        self.records.append({
            "forward_pass_id": len(self.records), "rank": 0, "gatherer_key": "primary",
            "input_ids": [ids[p] for _, ids, positions in parts for p in positions],
            "positions": [p for _, _, positions in parts for p in positions],
            "extend_seq_lens": None if mode == DECODE else [len(p) for _, _, p in parts],
            "forward_mode": mode, "misc_objects": [], "topk_ids_of_layer": torch.from_numpy(slots),
        })

    def save(self, path):
        torch.save({"records": self.records, "last_physical_to_logical_map": torch.from_numpy(self.mapping)}, path)
        return path


def sequences(shaped_model, lengths, seed=1):
    facts, rng = shaped_model.facts, np.random.default_rng(seed)
    return [(np.stack([np.stack([rng.permutation(facts.num_experts)[:facts.top_k] for _ in facts.layer_ids])
                       for _ in range(n)]), [int(i) for i in rng.integers(3, 290, n)]) for n in lengths]


def assert_sequence(trace, truth, ids):
    np.testing.assert_array_equal(trace.topk_ids, truth.transpose(1, 0, 2))
    assert trace.token_ids == ids




def test_recorder_rebuilds_sequences_served_together(deepseek, tmp_path):
    (a, a_ids), (b, b_ids) = sequences(deepseek, [9, 7])
    recorder = Recorder(deepseek)
    recorder.record(EXTEND, [(a, a_ids, range(5)), (b, b_ids, range(3))])
    for step in range(4):  # B ends first: it leaves the batch
        recorder.record(DECODE, [(t, i, [n + step]) for t, i, n in [(a, a_ids, 5), (b, b_ids, 3)] if n + step < len(i)])
    dump = read_sglang_dump(recorder.save(tmp_path / "expert_distribution_recorder_1.0_0.pt"), deepseek)
    assert len(dump.traces) == 2 and not dump.refused
    assert_sequence(dump.traces[0], a, a_ids)
    assert_sequence(dump.traces[1], b, b_ids)
    assert "EPLB rebalanced while recording" in dump.mapping_note


def test_recorder_refuses_a_radix_cache_hit_and_keeps_the_sequence_of_that_length(deepseek, tmp_path):
    """Request B's first 8 tokens come from the radix cache: its prefill starts at position 8,
    where A (8 tokens, decoding) also is. B is refused; A keeps its own tokens."""
    (a, a_ids), (b, b_ids) = sequences(deepseek, [11, 13])
    recorder = Recorder(deepseek, identity=True)
    recorder.record(EXTEND, [(a, a_ids, range(6))])
    recorder.record(DECODE, [(a, a_ids, [6])])
    recorder.record(DECODE, [(a, a_ids, [7])])
    recorder.record(EXTEND, [(b, b_ids, range(8, 10))])
    for step in range(8, 11):
        recorder.record(DECODE, [(a, a_ids, [step]), (b, b_ids, [step + 2])])
    dump = read_sglang_dump(recorder.save(tmp_path / "hit.pt"), deepseek)
    assert len(dump.traces) == 1
    assert_sequence(dump.traces[0], a, a_ids)
    assert len(dump.refused) == 1 and "began in record 3 at position 8" in dump.refused[0]
    assert "--disable-radix-cache" in dump.refused[0]
    assert "identity" in dump.mapping_note


def test_recorder_chunked_prefill_needs_the_radix_cache_off(deepseek, tmp_path):
    (a, a_ids), = sequences(deepseek, [12])
    recorder = Recorder(deepseek)
    recorder.record(EXTEND, [(a, a_ids, range(6))])
    recorder.record(EXTEND, [(a, a_ids, range(6, 10))])  # the next chunk of the same prompt
    for step in (10, 11):
        recorder.record(DECODE, [(a, a_ids, [step])])
    path = recorder.save(tmp_path / "chunked.pt")
    rebuilt = read_sglang_dump(path, deepseek, radix_cache=False)
    assert len(rebuilt.traces) == 1 and not rebuilt.refused
    assert_sequence(rebuilt.traces[0], a, a_ids)
    unsure = read_sglang_dump(path, deepseek)
    assert not unsure.traces and len(unsure.refused) == 2
    assert all("read the dump with radix_cache=False" in message for message in unsure.refused)


def test_recorder_refuses_equal_length_sequences_and_keeps_the_others(deepseek, tmp_path):
    """A and B have the same length and decode together: their batch order may flip, and the
    recorder keeps no request ids. C, one token longer, is kept."""
    (a, a_ids), (b, b_ids), (c, c_ids) = sequences(deepseek, [8, 8, 9])
    recorder = Recorder(deepseek)
    recorder.record(EXTEND, [(a, a_ids, range(5)), (b, b_ids, range(5)), (c, c_ids, range(6))])
    for step in range(5, 9):
        batch = [(b, b_ids, [step]), (a, a_ids, [step])] if step % 2 else [(a, a_ids, [step]), (b, b_ids, [step])]
        recorder.record(DECODE, [part for part in batch if step < len(part[1])] + (
            [(c, c_ids, [step + 1])] if step + 1 < len(c_ids) else []))
    dump = read_sglang_dump(recorder.save(tmp_path / "equal.pt"), deepseek, radix_cache=False)
    assert len(dump.traces) == 1
    assert_sequence(dump.traces[0], c, c_ids)
    assert len(dump.refused) >= 2 and all("one request at a time" in message for message in dump.refused)


def test_recorder_mixed_pass_continues_a_decode_beside_a_new_prefill(deepseek, tmp_path):
    """--enable-mixed-chunk: a mixed pass (forward mode 3) holds running requests' decode tokens as
    one-token segments beside new prefills."""
    (a, a_ids), (b, b_ids) = sequences(deepseek, [8, 6])
    recorder = Recorder(deepseek)
    recorder.record(EXTEND, [(a, a_ids, range(5))])
    recorder.record(3, [(a, a_ids, [5]), (b, b_ids, range(4))])
    recorder.record(DECODE, [(a, a_ids, [6]), (b, b_ids, [4])])
    recorder.record(DECODE, [(a, a_ids, [7]), (b, b_ids, [5])])
    path = recorder.save(tmp_path / "mixed.pt")
    dump = read_sglang_dump(path, deepseek, radix_cache=False)
    assert not dump.refused
    assert_sequence(dump.traces[0], a, a_ids)
    assert_sequence(dump.traces[1], b, b_ids)
    unsure = read_sglang_dump(path, deepseek)  # with a radix cache, A's token could start a new request
    assert [len(t.token_ids) for t in unsure.traces] == [6] and len(unsure.refused) == 2


def test_recorder_refuses_speculative_decoding_passes(deepseek, tmp_path):
    (a, a_ids), = sequences(deepseek, [6])
    recorder = Recorder(deepseek)
    recorder.record(EXTEND, [(a, a_ids, range(6))])
    recorder.records[-1]["forward_mode"] = 5  # TARGET_VERIFY
    with pytest.raises(EngineRecordError, match="record without speculative decoding"):
        read_sglang_dump(recorder.save(tmp_path / "verify.pt"), deepseek)


def test_recorder_dump_with_a_pickled_object_is_refused(deepseek, tmp_path):
    path = tmp_path / "hostile.pt"
    torch.save({"records": [{"topk_ids_of_layer": torch.zeros(1, 1, 8), "note": SimpleNamespace(x=1)}],
                "last_physical_to_logical_map": torch.zeros(1, 8)}, path)
    with pytest.raises(EngineRecordError, match=r"weights_only=True.*never unpickles arbitrary objects"):
        read_sglang_dump(path, deepseek)


# -- errors people can act on ---------------------------------------------------------------


def test_records_that_do_not_fit_give_clear_errors(shaped):
    model, truth, ids = shaped
    facts = model.facts
    with pytest.raises(EngineRecordError, match="no routed_experts: start the server with --enable-return-routed"):
        vllm_response_trace(model, {"choices": [{"text": "hi", "prompt_token_ids": [1, 2], "token_ids": [3]}]})
    with pytest.raises(EngineRecordError, match="return_token_ids"):
        vllm_response_trace(model, {"choices": [{"routed_experts": "AAAA"}]})
    with pytest.raises(EngineRecordError, match="no meta_info.routed_experts"):
        sglang_response_trace(model, {"text": "hi", "meta_info": {}}, prompt_ids=[1, 2])
    routed = vllm_rows(truth, facts.layer_ids, facts.num_layers, facts.num_experts)
    output = SimpleNamespace(token_ids=ids[-2:], routed_experts=routed[:3])
    with pytest.raises(EngineRecordError, match=f"routing for 3 tokens, but the request has {len(ids)} token ids"):
        vllm_output_trace(model, SimpleNamespace(prompt_token_ids=ids[:-2], outputs=[output]))
    with pytest.raises(EngineRecordError, match="the record has 7 layers"):
        engine_trace(model, np.zeros((2, 7, facts.top_k), dtype=np.int32), [1, 2], engine="vllm")
    with pytest.raises(EngineRecordError, match="not valid base64"):
        vllm_response_trace(model, {"choices": [{"routed_experts": "not base64!", "prompt_token_ids": [1],
                                                 "token_ids": [2]}]})
    with pytest.raises(EngineRecordError, match="routed_experts holds 12 bytes"):
        decode_sglang_routed(base64.b64encode(b"\x00" * 12).decode(), model, 5)
