"""Routing recorded by serving engines (vLLM, SGLang), read into RoutingTraces.

Models such as DeepSeek-V3 run on multi-GPU vLLM or SGLang servers, not in transformers on one
card. Both engines can report the experts each token used; this module turns their records into
traces of expert ids only (`RoutingTrace.has_logits` is False: engines report no scores).

What a record leaves out comes from the model's own `config.json` (`served_model`): the model is
built on PyTorch's meta device, which allocates no weights, and `moeviz.model.capture.routing_facts`
reads its routers, so which layers are MoE (`first_k_dense_replace`, `decoder_sparse_step`,
`mlp_only_layers`, ...), the experts, top-k and shared experts are exactly what moeviz's own
capture would find. Token strings come from the model's tokenizer when the folder has one.

Each reader takes one record kind in exactly the layout the engine's code writes (read in the
released packages, cited in each docstring) and nothing else: the form of a record says which
layout it is in, never its size. A record whose size or values do not fit that layout is refused
with a message that says why. Checks that hold for every kind: one row per token the record
covers, a column per decoder layer (dense layers unused), and each token's top-k experts at a
MoE layer distinct (a router picks k different experts, so a row of zeros is "no routing", e.g. a
cached token that was never forwarded).

Text and offsets: when the caller gives the text the prompt ids came from and the tokenizer
turns it into those ids, the prompt keeps the tokenizer's offsets and generated tokens span the
characters they add (as `moeviz.model.generation`); otherwise the trace's text is the decoded ids and
each token spans the characters its id adds to the decoded prefix. Without a tokenizer, tokens
are shown as their ids ("#1234") and the text is empty.
"""

from __future__ import annotations

import base64
import binascii
import io
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moeviz.model.capture import RoutingFacts, routing_facts
from moeviz.model.generation import with_generation
from moeviz.model.tokens import Tokenized, token_strings
from moeviz.trace import RoutingTrace


class EngineRecordError(ValueError):
    """An engine record moeviz cannot read, with a message that says what was expected."""


@dataclass(frozen=True)
class ServedModel:
    """What a reader needs to know about the model a server ran: its routing facts from
    `config.json`, its tokenizer (None when the folder has none), and the layer rows of a vLLM
    0.21 record (`vllm_021_layer_rows`, see `vllm_021_layer_rows`)."""

    model_id: str
    model_type: str
    facts: RoutingFacts
    tokenizer: object | None = None
    vllm_021_layer_rows: int | None = None


def served_model(path: str | Path, model_id: str = "") -> ServedModel:
    """The routing facts (and tokenizer, if present) of the model in folder `path`, which needs
    `config.json` only: no weights are read or allocated."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise EngineRecordError(f"No config.json in {path}: give the folder of the model the server ran")
    config = AutoConfig.from_pretrained(path)
    tokenizer = None
    if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(path)
    return ServedModel(model_id or config._name_or_path or path.name, config.model_type, moe_facts(config), tokenizer,
                       vllm_021_layer_rows(config))


def moe_facts(config) -> RoutingFacts:
    """Routing facts of the model `config` describes, from its modules built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    facts = routing_facts(model)
    if facts.encoder_layers:
        raise EngineRecordError(
            f"{config.model_type} is an encoder-decoder model; serving engines record decoder-only MoE models"
        )
    return facts


def vllm_021_layer_rows(config) -> int:
    """The layer rows of a vLLM 0.21 routing record: its own count of MoE layers, which reads
    `layers_block_type`, `decoder_sparse_step` and `mlp_only_layers` but not DeepSeek's
    `first_k_dense_replace` (vllm 0.21.0, model_executor/layers/fused_moe/routed_experts_capturer.py,
    `_count_moe_layers`, applied to `hf_text_config`)."""
    text = config.get_text_config()
    block_types = getattr(text, "layers_block_type", None)
    if block_types is not None:
        return list(block_types).count("moe")
    layers = text.num_hidden_layers
    mlp_only = getattr(text, "mlp_only_layers", None) or []
    step = getattr(text, "decoder_sparse_step", 1) or 1
    if step > 1:
        return sum(1 for i in range(layers) if (i + 1) % step == 0 and i not in mlp_only)
    return layers - sum(1 for i in mlp_only if 0 <= i < layers)


# -- one record -> one trace ------------------------------------------------------------------


def engine_trace(model: ServedModel, routed, token_ids: Sequence[int], *, engine: str, prompt_tokens: int | None = None,
                 text: str | None = None) -> RoutingTrace:
    """A trace of expert ids from `routed` int[tokens, num_hidden_layers, slots], one row per
    token of `token_ids` and one column per decoder layer (dense layers are dropped by the
    config). The first `prompt_tokens` ids are the prompt (None: all). Unused slots (-1) are
    dropped; each token must keep exactly top-k distinct experts at every MoE layer.
    """
    facts = model.facts
    routed = _as_int_array(routed, "routed experts")
    token_ids = [int(i) for i in token_ids]
    if routed.ndim != 3 or routed.shape[0] != len(token_ids):
        raise EngineRecordError(
            f"routed experts have shape {list(routed.shape)}; expected [{len(token_ids)} tokens, layers, top_k]"
        )
    if not token_ids:
        raise EngineRecordError("the record holds no tokens")
    if routed.shape[1] != facts.num_layers:
        raise EngineRecordError(
            f"the record has {routed.shape[1]} layers; this model has {facts.num_layers} layers, of which "
            f"{len(facts.layer_ids)} are MoE ({facts.layer_ids}): is config.json the served model's?"
        )
    topk_ids = _used_slots(routed[:, facts.layer_ids].transpose(1, 0, 2), facts.top_k)  # [layers, tokens, k]
    if topk_ids.size and (topk_ids.min() < 0 or topk_ids.max() >= facts.num_experts):
        raise EngineRecordError(
            f"expert ids run {topk_ids.min()}..{topk_ids.max()}, outside this model's {facts.num_experts} experts: "
            "is config.json the served model's? (ids must be logical, not physical)"
        )
    _check_distinct(topk_ids, facts.layer_ids, engine)
    prompt_count = len(token_ids) if prompt_tokens is None else min(prompt_tokens, len(token_ids))
    tokenized, trace_text = _tokens(model.tokenizer, token_ids, prompt_count, text)
    return RoutingTrace(
        model_id=model.model_id, model_type=model.model_type, num_experts=facts.num_experts, top_k=facts.top_k,
        scoring=facts.scoring, num_layers=facts.num_layers, layer_ids=list(facts.layer_ids), text=trace_text,
        tokens=tokenized.tokens, token_ids=tokenized.ids, offsets=tokenized.offsets,
        topk_ids=topk_ids.astype(np.int32), topk_weights=None, router_logits=None,
        router_class=facts.router_class, generated_from=prompt_count if prompt_count < len(token_ids) else -1,
        shared_experts=facts.shared_experts, engine=engine,
    )


def _as_int_array(value, what: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise EngineRecordError(f"{what} have dtype {array.dtype}; expected integer expert ids")
    return array.astype(np.int64)


def _used_slots(topk_ids: np.ndarray, top_k: int) -> np.ndarray:
    """topk_ids int[layers, tokens, slots] without its unused slots (-1), keeping slot order:
    int[layers, tokens, top_k]."""
    used = topk_ids >= 0
    if topk_ids.shape[-1] == top_k and used.all():
        return topk_ids
    counts = used.sum(axis=-1)
    if not (counts == top_k).all():
        bad = np.argwhere(counts != top_k)[0]
        raise EngineRecordError(
            f"a token has {counts[tuple(bad)]} experts at MoE layer position {bad[0]}, token {bad[1]}; "
            f"this model routes each token to top-{top_k} (one more would be a shared expert fused into the "
            "routed slots: record with shared-expert fusion disabled)"
        )
    order = np.argsort(~used, axis=-1, kind="stable")[..., :top_k]  # used slots first, in order
    return np.take_along_axis(topk_ids, order, -1)


def _check_distinct(topk_ids: np.ndarray, layer_ids: list[int], engine: str) -> None:
    """A router picks k different experts: a repeated id means the row holds no routing."""
    ordered = np.sort(topk_ids, axis=-1)
    repeated = (ordered[..., 1:] == ordered[..., :-1]).any(axis=-1)
    if repeated.any():
        layer, token = np.argwhere(repeated)[0]
        row = ordered[layer, token]
        expert = int(row[np.flatnonzero(row[1:] == row[:-1])[0]])
        hint = " (vLLM 0.21 leaves the rows of prefix-cache hits at 0: start it with --no-enable-prefix-caching)"
        raise EngineRecordError(
            f"token {token} lists expert {expert} twice at layer {layer_ids[layer]}: a token is routed to "
            f"k different experts, so this row holds no routing; was the record made for this model and these "
            f"tokens?{hint if engine == 'vllm' else ''}"
        )


def _tokens(tokenizer, ids: list[int], prompt_count: int, text: str | None) -> tuple[Tokenized, str]:
    if tokenizer is None:
        return Tokenized(ids, [f"#{i}" for i in ids], [(0, 0)] * len(ids), len(ids)), ""
    prompt_ids = ids[:prompt_count]
    if text is not None:
        encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        if list(encoding["input_ids"]) == prompt_ids:
            prompt = Tokenized(prompt_ids, token_strings(tokenizer, prompt_ids),
                               [tuple(span) for span in encoding["offset_mapping"]], len(prompt_ids))
            tokenized, full_text = with_generation(tokenizer, text, prompt, ids[prompt_count:])
            return tokenized, full_text
    tokenized, full_text = with_generation(tokenizer, "", Tokenized([], [], [], 0), ids)
    return tokenized, full_text


def _covered(ids: Sequence[int], rows: int, start: int, what: str) -> list[int]:
    """The ids a record of `rows` rows covers: tokens start .. len(ids) - 2, the last sampled
    token never being forwarded (both engines)."""
    ids = [int(i) for i in ids]
    expected = len(ids) - 1 - start
    if rows != expected:
        raise EngineRecordError(
            f"{what} has routing for {rows} tokens, but the request has {len(ids)} token ids: expected "
            f"{expected} (every token but the last sampled one, which is never forwarded"
            + (f", from token {start})" if start else ")")
            + "; pass the request's start option if it skipped prompt tokens"
        )
    return ids[start:len(ids) - 1]


# -- vLLM ------------------------------------------------------------------------------------


def vllm_output_trace(model: ServedModel, request_output, choice: int = 0, text: str | None = None, *,
                      prompt_start: int = 0) -> RoutingTrace:
    """The trace of one completion of vLLM's offline API: `LLM.generate(...)[n]`, a
    `RequestOutput`, engine arg `enable_return_routed_experts=True`.

    vLLM >= 0.22 (read in 0.22.0 and 0.33.0: outputs.py, v1/engine/output_processor.py,
    v1/core/sched/scheduler.py, model_executor/layers/fused_moe/routed_experts_capturer.py):
    `outputs[choice].routed_experts`, uint8 (<= 256 experts) or uint16
    [tokens - 1 - prompt_start, num_hidden_layers, top_k], one column per decoder layer (dense
    ones 0); `prompt_start` is the request's `routed_experts_prompt_start`.

    vLLM 0.21 (its `RequestOutput` has `prompt_routed_experts`): the prompt's rows there and the
    generated tokens' (but the last) in `outputs[choice].routed_experts`, int16, in the layout
    `vllm_021_rows` reads.
    """
    output = request_output.outputs[choice]
    ids = list(request_output.prompt_token_ids) + list(output.token_ids)
    prompt_tokens = len(request_output.prompt_token_ids)
    if hasattr(request_output, "prompt_routed_experts"):
        routed = vllm_021_rows(model, [request_output.prompt_routed_experts, output.routed_experts])
        covered = _covered(ids, len(routed), 0, "the vLLM 0.21 output")
        return engine_trace(model, routed, covered, engine="vllm", prompt_tokens=prompt_tokens, text=text)
    if getattr(output, "routed_experts", None) is None:
        raise EngineRecordError(
            "this vLLM output has no routed_experts: start the engine with enable_return_routed_experts=True"
        )
    routed = _as_int_array(output.routed_experts, "routed experts")
    covered = _covered(ids, len(routed), prompt_start, "the vLLM output")
    return engine_trace(model, routed, covered, engine="vllm", prompt_tokens=prompt_tokens - prompt_start,
                        text=text if not prompt_start else None)


def vllm_021_rows(model: ServedModel, parts) -> np.ndarray:
    """int[tokens, num_hidden_layers, top_k] from vLLM 0.21's routing parts (arrays or nested
    lists, None for an empty part), in the layout of the other readers.

    vLLM 0.21 (vllm 0.21.0, model_executor/layers/fused_moe/routed_experts_capturer.py and
    layer.py) keeps [tokens, rows, top_k] with `rows` its own MoE-layer count
    (`vllm_021_layer_rows`), indexed by `FusedMoE.moe_layer_id`, a counter over the MoE layers
    in the order they are built: row j is the j-th MoE layer, the rows past the last MoE layer
    stay 0 (for DeepSeek-V3, 58 MoE layers fill rows 0..57 of 61). `split_routed_experts` cuts
    the record into the prompt's rows and the generated tokens'.
    """
    arrays = [_as_int_array(part, "routed experts") for part in parts if part is not None and np.size(part)]
    if not arrays:
        raise EngineRecordError(
            "this vLLM 0.21 record has no routed_experts: start the engine with --enable-return-routed-experts"
        )
    packed = np.concatenate(arrays)
    facts, rows = model.facts, model.vllm_021_layer_rows
    moe = len(facts.layer_ids)
    if packed.ndim != 3 or packed.shape[1] != rows or packed.shape[2] != facts.top_k or moe > rows:
        raise EngineRecordError(
            f"the vLLM 0.21 record has shape {list(packed.shape)}; for this model vLLM 0.21 writes "
            f"[tokens, {rows}, {facts.top_k}] holding its {moe} MoE layers: is config.json the served model's?"
        )
    if packed[:, moe:].any():
        raise EngineRecordError(
            f"the vLLM 0.21 record has routing in rows {moe}..{rows - 1}, past this model's {moe} MoE layers: "
            "is config.json the served model's (or did a draft model's MoE layers write into it)?"
        )
    routed = np.zeros((len(packed), facts.num_layers, facts.top_k), dtype=np.int64)
    routed[:, facts.layer_ids] = packed[:, :moe]
    return routed


def vllm_response_trace(model: ServedModel, response: Mapping, choice: int = 0, *,
                        prompt_ids: Sequence[int] | None = None, output_ids: Sequence[int] | None = None,
                        text: str | None = None, prompt_start: int = 0) -> RoutingTrace:
    """The trace of `choices[choice]` of a vLLM OpenAI-compatible response (/v1/completions or
    /v1/chat/completions) from a server started with `--enable-return-routed-experts`.

    vLLM >= 0.22 (entrypoints/openai/completion/serving.py and chat_completion/serving.py of
    0.22.0 and 0.33.0): `choices[i].routed_experts` is the base64 of `np.save` of the offline
    array (`vllm_output_trace`). vLLM 0.21: nested lists, the generated tokens' on the choice and
    the prompt's in the response's `prompt_routed_experts`.

    Token ids come from the response (the choice's `prompt_token_ids` for completions, the
    response's for chat, and the choice's `token_ids`, all present when the request sets
    `return_token_ids`) or from `prompt_ids` / `output_ids`. `prompt_start` is the request's
    `routed_experts_prompt_start`.
    """
    chosen = _choice(response, choice)
    prompt_ids = _first_present(chosen.get("prompt_token_ids"), response.get("prompt_token_ids"), prompt_ids)
    output_ids = _first_present(chosen.get("token_ids"), output_ids)
    if prompt_ids is None or output_ids is None:
        raise EngineRecordError(
            "the response has no prompt_token_ids or token_ids: send the request with \"return_token_ids\": true"
        )
    ids = list(prompt_ids) + list(output_ids)
    routed, prompt_rows = chosen.get("routed_experts"), response.get("prompt_routed_experts")
    if isinstance(routed, list) or isinstance(prompt_rows, list):  # vLLM 0.21
        rows = vllm_021_rows(model, [prompt_rows, routed])
        return engine_trace(model, rows, _covered(ids, len(rows), 0, "the vLLM 0.21 response"), engine="vllm",
                            prompt_tokens=len(prompt_ids), text=text)
    if routed is None:
        raise EngineRecordError(
            "the vLLM response has no routed_experts: start the server with --enable-return-routed-experts"
        )
    if not isinstance(routed, str):
        raise EngineRecordError(
            f"choices[{choice}].routed_experts is a {type(routed).__name__}; vLLM sends a base64 .npy string "
            "(>= 0.22) or nested lists (0.21)"
        )
    rows = _npy(_b64(routed, "routed_experts"))
    return engine_trace(model, rows, _covered(ids, len(rows), prompt_start, "the vLLM response"), engine="vllm",
                        prompt_tokens=len(prompt_ids) - prompt_start, text=text if not prompt_start else None)


def _b64(data, what: str) -> bytes:
    if not isinstance(data, str):
        raise EngineRecordError(f"{what} is a {type(data).__name__}; expected a base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise EngineRecordError(f"{what} is not valid base64") from None


def _npy(raw: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError as error:
        raise EngineRecordError(f"routed_experts is not a readable .npy array ({error})") from None
    return _as_int_array(array, "routed experts")


def _choice(response: Mapping, choice: int) -> Mapping:
    choices = response.get("choices") if isinstance(response, Mapping) else None
    if not isinstance(choices, list) or not 0 <= choice < len(choices) or not isinstance(choices[choice], Mapping):
        raise EngineRecordError(f"the response has no choices[{choice}]; is it an OpenAI-compatible completion?")
    return choices[choice]


def _first_present(*values):
    return next((value for value in values if value is not None), None)


# -- SGLang, per request --------------------------------------------------------------------

SGLANG_WIRE_DTYPES = {"int32": np.dtype("<i4"), "uint16": np.dtype("<u2"), "uint8": np.dtype("u1")}


def decode_sglang_routed(data: str, model: ServedModel, rows: int, dtype: str | None = None) -> np.ndarray:
    """int[rows, num_hidden_layers, top_k] from SGLang's base64 routing bytes, which carry no
    shape: `rows` is tokens - 1 - routed_experts_start_len. `dtype` is the response's
    `routed_experts_dtype` (SGLang main, env SGLANG_ROUTED_EXPERTS_DTYPE); without it the bytes
    are int32 (SGLang 0.5.23: srt/state_capturer/base.py `BaseTopkCapturer.get_topk` returns host
    rows `[start_len, seqlen - 1)` of an int32 [tokens, num_hidden_layers, top_k] buffer, fused
    shared-expert columns cut off; srt/managers/detokenizer_manager.py `_b64_encode_per_request`
    sends `tensor.numpy().tobytes()`)."""
    name = "int32" if dtype is None else str(dtype).strip().lower()
    if name not in SGLANG_WIRE_DTYPES:
        raise EngineRecordError(f"routed_experts_dtype {dtype!r}; SGLang sends {', '.join(SGLANG_WIRE_DTYPES)}")
    raw = _b64(data, "routed_experts")
    facts = model.facts
    values = rows * facts.num_layers * facts.top_k
    wire = SGLANG_WIRE_DTYPES[name]
    if rows < 1 or len(raw) != values * wire.itemsize:
        narrower = [n for n, d in SGLANG_WIRE_DTYPES.items() if d.itemsize < 4 and len(raw) == values * d.itemsize]
        hint = (f"; the size fits {narrower[0]} ids, but the response does not say routed_experts_dtype: unset "
                "SGLANG_ROUTED_EXPERTS_DTYPE on the server, or read /generate's meta_info, which says it"
                if dtype is None and narrower and rows >= 1 else "")
        raise EngineRecordError(
            f"routed_experts holds {len(raw)} bytes; SGLang sends {name} [{rows} tokens (all but the last, from "
            f"routed_experts_start_len), {facts.num_layers} layers, top-{facts.top_k}] = {values * wire.itemsize} "
            f"bytes: is config.json the served model's, and the start option the request's?{hint}"
        )
    return np.frombuffer(raw, dtype=wire).reshape(rows, facts.num_layers, facts.top_k).astype(np.int64)


def sglang_response_trace(model: ServedModel, response: Mapping, *, prompt_ids: Sequence[int] | None = None,
                          output_ids: Sequence[int] | None = None, text: str | None = None,
                          start_len: int = 0) -> RoutingTrace:
    """The trace of an SGLang response from a server started with `--enable-return-routed-experts`
    to a request with `return_routed_experts: true` (and `routed_experts_start_len`: `start_len`).

    `/generate` (SGLang 0.5.23, srt/managers/tokenizer_manager.py): `meta_info.routed_experts`,
    and `meta_info.routed_experts_dtype` on SGLang main; generated ids in `output_ids`.
    OpenAI-compatible `/v1/completions` and `/v1/chat/completions` (srt/entrypoints/openai/
    serving_completions.py, serving_chat.py, protocol.py `SglExt`): the first choice's record at
    response level in `sglext.routed_experts` (one record per response: send n = 1), generated
    ids in `choices[0].token_ids` when the request sets `return_token_ids`. `prompt_ids` are the
    ids sent, or the choice's `prompt_token_ids`. Bytes as `decode_sglang_routed` reads them.
    """
    if "choices" in response:
        chosen = _choice(response, 0)
        sglext = response.get("sglext") if isinstance(response.get("sglext"), Mapping) else {}
        data, dtype = sglext.get("routed_experts"), None
        where = "sglext.routed_experts"
        prompt_ids = _first_present(prompt_ids, chosen.get("prompt_token_ids"))
        output_ids = _first_present(chosen.get("token_ids"), output_ids)
    else:
        meta = response.get("meta_info") if isinstance(response.get("meta_info"), Mapping) else {}
        data, dtype = meta.get("routed_experts"), meta.get("routed_experts_dtype")
        where = "meta_info.routed_experts"
        output_ids = _first_present(response.get("output_ids"), output_ids)
    if data is None:
        raise EngineRecordError(
            f"the SGLang response has no {where}: start the server with --enable-return-routed-experts and send "
            "\"return_routed_experts\": true"
        )
    if prompt_ids is None or output_ids is None:
        raise EngineRecordError(
            "the SGLang response's token ids are unknown: give the prompt ids sent, and send "
            "\"return_token_ids\": true to an OpenAI-compatible endpoint"
        )
    ids = list(prompt_ids) + list(output_ids)
    rows = decode_sglang_routed(data, model, len(ids) - 1 - start_len, dtype)
    covered = _covered(ids, len(rows), start_len, "the SGLang response")
    return engine_trace(model, rows, covered, engine="sglang", prompt_tokens=len(prompt_ids) - start_len,
                        text=text if not start_len else None)


# -- SGLang, the per_token expert-distribution recorder ----------------------------------------

# `ForwardMode` of SGLang 0.5.23 (srt/model_executor/forward_batch_info.py, enum.auto() from 1).
_EXTEND, _DECODE, _MIXED, _IDLE = 1, 2, 3, 4

_ONE_AT_A_TIME = (
    "send one request at a time while recording, or use the per-request record "
    "(--enable-return-routed-experts and \"return_routed_experts\": true)"
)


@dataclass(frozen=True)
class RecorderDump:
    """What `read_sglang_dump` rebuilt from one dump file."""

    traces: list[RoutingTrace]  # the sequences rebuilt, in the order they began
    refused: list[str]  # one message per sequence not rebuilt: which, why, and what to do
    mapping_note: str  # which physical -> logical map the expert ids went through


@dataclass(eq=False)  # sequences are told apart by identity
class _Sequence:
    first_record: int
    start: int  # position of its first recorded token
    ids: list[int] = field(default_factory=list)
    routed: list[np.ndarray] = field(default_factory=list)  # int[tokens, layers, slots] per segment
    last_pass: int = -1
    decoded: bool = False  # has had a decode step (so no prefill chunk can follow)
    refusal: str | None = None

    @property
    def length(self) -> int:
        return self.start + len(self.ids)

    def add(self, segment: _Segment, number: int, decoding: bool) -> None:
        self.ids.extend(segment.ids)
        self.routed.append(segment.routed)
        self.last_pass, self.decoded = number, self.decoded or decoding


@dataclass(frozen=True)
class _Segment:
    position: int
    ids: list[int]
    routed: np.ndarray  # logical ids, int[tokens, layers, slots]


def read_sglang_dump(path: str | Path, model: ServedModel, *, radix_cache: bool = True) -> RecorderDump:
    """The sequences of an SGLang `per_token` recorder dump file
    (`expert_distribution_recorder_{time}_{rank}.pt`), one trace each, where the records say
    unambiguously which tokens belong together; every other sequence is refused with a message.

    Layout (SGLang 0.5.23, srt/eplb/expert_distribution.py `_DetailSinglePassGatherer` and
    `_DetailAccumulator.dump`): `records`, one per forward pass, each with `input_ids` and
    `positions` per token, `extend_seq_lens` (tokens per sequence; None in a decode pass, one
    token per sequence), `forward_mode`, and `topk_ids_of_layer` int32 [num_hidden_layers, tokens,
    8] of physical expert slots, -1 where unused; and `last_physical_to_logical_map` [layers,
    physical slots]. The file is read with `torch.load(weights_only=True)` only.

    The records keep no request ids, so sequences are rebuilt from positions: a segment at
    position 0 starts one; a segment at position p > 0 continues the one sequence that holds p
    tokens and could take it (in a decode pass: one that was in the previous decode pass or was
    prefilled since, as every running request is; in a prefill pass: one still prefilling, a
    chunked prefill). It is refused, with the sequences it could belong to, when
    - no sequence fits: its first tokens were never forwarded while recording (a radix-cache hit,
      or a request sent before recording started);
    - several fit, e.g. requests of equal length decoding together (their batch order can change);
    - the server may reuse its radix cache (`radix_cache=True`, the default; pass False for a
      server started with `--disable-radix-cache`) and the pass is a prefill: a new request can
      then start at p from the cache, indistinguishable from a chunk that continues a sequence.
    Passes other than prefill, decode and mixed (speculative decoding's verify passes) are
    refused for the whole file.
    """
    dump = _load_dump(Path(path))
    records, mapping = dump.get("records"), dump.get("last_physical_to_logical_map")
    if not isinstance(records, list) or mapping is None:
        raise EngineRecordError(
            f"{path} is not a per_token recorder dump: it needs \"records\" and \"last_physical_to_logical_map\" "
            "(start SGLang with --expert-distribution-recorder-mode per_token)"
        )
    mapping = _as_int_array(_numpy(mapping, "last_physical_to_logical_map"), "last_physical_to_logical_map")
    sequences: list[_Sequence] = []
    last_decode = -1
    for number, record in enumerate(records):
        mode, segments = _pass(record, mapping, f"{path}, record {number}")
        _assign(sequences, segments, mode, number, last_decode, radix_cache)
        if mode in (_DECODE, _MIXED):
            last_decode = number
    if not sequences:
        raise EngineRecordError(f"{path} holds no tokens: record while the server handles requests, then dump")
    traces = [engine_trace(model, np.concatenate(s.routed), s.ids, engine="sglang")
              for s in sequences if s.refusal is None]
    refused = [f"the sequence that began in record {s.first_record} at position {s.start} ({len(s.ids)} tokens "
               f"recorded): {s.refusal}" for s in sequences if s.refusal is not None]
    return RecorderDump(traces, refused, _mapping_note(mapping, model.facts.num_experts))


def _assign(sequences: list[_Sequence], segments: list[_Segment], mode: int, number: int, last_decode: int,
            radix_cache: bool) -> None:
    """Give each segment of pass `number` to its sequence, or refuse it and the sequences it could
    belong to."""
    waiting: dict[int, list[_Segment]] = {}
    for segment in segments:
        if segment.position == 0:
            sequences.append(_Sequence(number, 0))
            sequences[-1].add(segment, number, mode == _DECODE)
        else:
            waiting.setdefault(segment.position, []).append(segment)
    for position, group in waiting.items():
        free = [s for s in sequences if s.length == position and s.last_pass < number]
        decoding = [s for s in free if s.last_pass >= last_decode]  # every running request decodes each pass
        prefilling = [s for s in free if not s.decoded]
        if mode == _DECODE:
            candidates = decoding
        elif mode == _EXTEND or any(len(segment.ids) > 1 for segment in group):
            candidates = prefilling
        else:  # a mixed pass: one token continues a decode or a prefill
            candidates = [s for s in free if s in decoding or s in prefilling]
        may_start_here = radix_cache and mode != _DECODE
        if len(group) == 1 and len(candidates) == 1 and not may_start_here:
            sequence = candidates[0]
            sequence.add(group[0], number, mode == _DECODE or sequence not in prefilling)
            continue
        if not candidates:
            reason = (f"it starts at position {position} and its first {position} tokens were never forwarded while "
                      "recording: a radix-cache hit (start SGLang with --disable-radix-cache) or a request sent "
                      "before recording started (start recording first)")
        elif may_start_here:
            reason = (f"a prefill at position {position} could continue it (a chunked prefill) or start another "
                      "request from the radix cache, and the dump cannot tell which: start SGLang with "
                      "--disable-radix-cache and read the dump with radix_cache=False")
        else:
            reason = (f"{max(len(group), len(candidates))} sequences of {position} tokens were in flight together, "
                      "and the recorder keeps no request ids, so which tokens belong to which cannot be told: "
                      + _ONE_AT_A_TIME)
        for sequence in candidates:
            sequence.refusal = sequence.refusal or reason
        for segment in group:  # kept, refused, so that their later tokens go nowhere else
            sequences.append(_Sequence(number, position, refusal=reason))
            sequences[-1].add(segment, number, mode == _DECODE)


def _pass(record, mapping: np.ndarray, where: str) -> tuple[int, list[_Segment]]:
    """The forward mode and the segments (one per sequence) of one record, ids made logical."""
    if not isinstance(record, Mapping) or "topk_ids_of_layer" not in record:
        raise EngineRecordError(f"{where} has no topk_ids_of_layer: was the recorder in per_token mode?")
    mode = int(record.get("forward_mode", -1))
    if mode not in (_EXTEND, _DECODE, _MIXED, _IDLE):
        raise EngineRecordError(
            f"{where} is a pass of forward mode {mode}; moeviz rebuilds sequences from prefill (1), decode (2) and "
            "mixed (3) passes: record without speculative decoding"
        )
    physical = _as_int_array(_numpy(record["topk_ids_of_layer"], "topk_ids_of_layer"), f"{where}: topk_ids_of_layer")
    input_ids = _numpy(record.get("input_ids"), "input_ids").reshape(-1)
    positions = _numpy(record.get("positions"), "positions").reshape(-1).astype(np.int64)
    if physical.ndim != 3 or not physical.shape[1] == len(input_ids) == len(positions):
        raise EngineRecordError(
            f"{where}: topk_ids_of_layer {list(physical.shape)}, {len(input_ids)} input_ids and {len(positions)} "
            "positions; expected [layers, tokens, slots] and one id and position per token"
        )
    if mode == _IDLE or not len(input_ids):
        return mode, []
    if mapping.ndim != 2 or mapping.shape[0] != physical.shape[0] or (physical >= mapping.shape[1]).any():
        raise EngineRecordError(
            f"{where}: physical expert ids up to {physical.max()} in {physical.shape[0]} layers do not fit "
            f"last_physical_to_logical_map of shape {list(mapping.shape)}"
        )
    layer_rows = np.arange(physical.shape[0])[:, None, None]
    logical = np.where(physical >= 0, mapping[layer_rows, np.maximum(physical, 0)], -1).transpose(1, 0, 2)
    lengths = record.get("extend_seq_lens")
    if mode == _DECODE:
        lengths = [1] * len(input_ids)
    elif lengths is None:
        raise EngineRecordError(f"{where}: a prefill pass without extend_seq_lens")
    lengths = [int(n) for n in np.asarray(lengths).reshape(-1)]
    if sum(lengths) != len(input_ids):
        raise EngineRecordError(f"{where}: extend_seq_lens sum to {sum(lengths)}, but the pass has {len(input_ids)} tokens")
    segments, start = [], 0
    for length in lengths:
        span = slice(start, start + length)
        start += length
        if not length:
            continue
        if not (positions[span] == positions[span][0] + np.arange(length)).all():
            raise EngineRecordError(f"{where}: the positions of a sequence's tokens are not consecutive")
        segments.append(_Segment(int(positions[span][0]), [int(i) for i in input_ids[span]], logical[span]))
    return mode, segments


def _mapping_note(mapping: np.ndarray, num_experts: int) -> str:
    note = ("Physical expert slots were mapped to experts with the dump's last_physical_to_logical_map, the map in "
            "force when it was dumped: SGLang keeps no map per record (srt/eplb/expert_distribution.py, "
            "_DetailAccumulator.dump). ")
    if mapping.shape[1] == num_experts and (mapping == np.arange(num_experts)).all():
        return note + "It is the identity (no redundant or moved experts), as on a server without EPLB."
    return note + ("If EPLB rebalanced while recording (--enable-eplb), the records made before the rebalance are "
                   "mapped wrong: record between rebalances, or with EPLB off.")


def _load_dump(path: Path) -> dict:
    if not path.is_file():
        raise EngineRecordError(f"No recorder dump at {path}")
    try:
        dump = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise EngineRecordError(
            f"{path} holds Python objects other than tensors, lists, dicts and numbers; moeviz reads recorder "
            f"dumps with torch.load(weights_only=True) only and never unpickles arbitrary objects ({first_line})"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise EngineRecordError(f"{path} is not a readable torch.save file ({error})") from None
    if not isinstance(dump, dict):
        raise EngineRecordError(f"{path} holds a {type(dump).__name__}; a recorder dump is a dict")
    return dump


def _numpy(value, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError):
        raise EngineRecordError(f"{what} is not an array") from None
