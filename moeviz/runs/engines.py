"""Routing recorded by serving engines (vLLM, SGLang), read into RoutingTraces.

Models such as DeepSeek-V3 run on multi-GPU vLLM or SGLang servers, not in transformers on one
card. Both engines can report the experts each token used; this module turns their records into
traces of expert ids only (`RoutingTrace.has_logits` is False: engines report no scores).

What a record leaves out comes from the model's own `config.json` (`served_model`): the model is
built on PyTorch's meta device, which allocates no weights, and `moeviz.model.capture.routing_facts`
reads its routers, so which layers are MoE (`first_k_dense_replace`, `decoder_sparse_step`,
`mlp_only_layers`, ...), the experts, top-k and shared experts are exactly what moeviz's own
capture would find. Token strings come from the model's tokenizer when the folder has one.

Formats (DESIGN.md §6; engines change them between versions, so readers are tolerant):
- vLLM offline: `CompletionOutput.routed_experts`, int32 [tokens, num_hidden_layers, top_k] for
  prompt + generated tokens minus the last sampled one (never forwarded). Dense layers read as
  expert 0, so layers are picked by the config, never by the values.
- vLLM HTTP: `choices[i].routed_experts` as nested lists (v0.21, with the prompt's rows in the
  response's `prompt_routed_experts`), as a base64 `.npy` string, or as a
  `{"encoding", "dtype", "shape", "data"}` dict (`decode_vllm_routed`).
- SGLang: `meta_info["routed_experts"]`, base64 bytes of int32 [tokens, layers, top_k] without a
  shape (`decode_sglang_routed`); and the `per_token` expert-distribution recorder's dump files
  (`read_sglang_dump`), read with `torch.load(weights_only=True)` only.

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
from dataclasses import dataclass
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
    `config.json`, and its tokenizer (None when the folder has none)."""

    model_id: str
    model_type: str
    facts: RoutingFacts
    tokenizer: object | None = None


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
    return ServedModel(model_id or config._name_or_path or path.name, config.model_type, moe_facts(config), tokenizer)


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


# -- one record -> one trace ------------------------------------------------------------------


def engine_trace(model: ServedModel, routed, token_ids: Sequence[int], *, engine: str, prompt_tokens: int | None = None,
                 text: str | None = None) -> RoutingTrace:
    """A trace of expert ids from `routed` int[rows, layers, slots] as an engine reports it.

    `token_ids` are prompt + generated tokens (the first `prompt_tokens` of them are the prompt;
    None: all). `rows` is the token count, or one less when the engine never forwarded the last
    sampled token (vLLM): that token is then left out. `layers` is every decoder layer (dense
    ones are dropped by the config) or the MoE layers alone. Unused slots (-1) are dropped;
    each token must keep exactly top-k experts.
    """
    facts = model.facts
    routed = _as_int_array(routed, "routed experts")
    token_ids = [int(i) for i in token_ids]
    if routed.ndim != 3:
        raise EngineRecordError(f"routed experts have shape {routed.shape}; expected [tokens, layers, top_k]")
    rows = routed.shape[0]
    if rows == len(token_ids) - 1:
        token_ids = token_ids[:-1]  # the last sampled token was never forwarded: no routing
    elif rows != len(token_ids):
        raise EngineRecordError(
            f"the engine reported routing for {rows} tokens, but the request has {len(token_ids)} token ids; "
            "expected as many, or one fewer (the last sampled token is never forwarded)"
        )
    if not token_ids:
        raise EngineRecordError("the record holds no tokens")
    topk_ids = _moe_layers(routed, facts).transpose(1, 0, 2)  # [layers, tokens, slots]
    topk_ids = _used_slots(topk_ids, facts.top_k)
    if topk_ids.size and (topk_ids.min() < 0 or topk_ids.max() >= facts.num_experts):
        raise EngineRecordError(
            f"expert ids run {topk_ids.min()}..{topk_ids.max()}, outside this model's {facts.num_experts} experts: "
            "is config.json the served model's? (ids must be logical, not physical)"
        )
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


def _moe_layers(routed: np.ndarray, facts: RoutingFacts) -> np.ndarray:
    """The MoE layers' columns of routed [tokens, layers, slots]: every layer is reported
    (vLLM fills dense ones with 0), or the MoE layers alone."""
    layers = routed.shape[1]
    if layers == facts.num_layers:
        return routed[:, facts.layer_ids]
    if layers == len(facts.layer_ids):
        return routed
    raise EngineRecordError(
        f"the record has {layers} layers; this model has {facts.num_layers} layers, of which "
        f"{len(facts.layer_ids)} are MoE ({facts.layer_ids}): is config.json the served model's?"
    )


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


# -- vLLM ------------------------------------------------------------------------------------


def decode_vllm_routed(value) -> np.ndarray:
    """int[tokens, layers, top_k] from any form vLLM gives `routed_experts` in: an array, nested
    lists, a base64 `.npy` string, or a {"encoding", "dtype", "shape", "data"} dict."""
    if isinstance(value, np.ndarray):
        return _as_int_array(value, "routed experts")
    if isinstance(value, str):
        return _npy(_b64(value, "routed_experts"))
    if isinstance(value, Mapping):
        missing = {"dtype", "shape", "data"} - set(value)
        if missing:
            raise EngineRecordError(
                f"routed_experts dict lacks {sorted(missing)}; expected encoding, dtype, shape, data"
            )
        if value.get("encoding", "base64") != "base64":
            raise EngineRecordError(f"routed_experts encoding {value['encoding']!r}; moeviz reads \"base64\"")
        raw = _b64(value["data"], "routed_experts data")
        if raw.startswith(b"\x93NUMPY"):
            return _npy(raw)
        dtype = np.dtype(value["dtype"])
        if dtype.kind not in "iu":
            raise EngineRecordError(f"routed_experts dtype {dtype}; expected integer expert ids")
        shape = tuple(int(n) for n in value["shape"])
        array = np.frombuffer(raw, dtype=dtype.newbyteorder("<") if dtype.byteorder == "=" else dtype)
        if array.size != int(np.prod(shape)):
            raise EngineRecordError(
                f"routed_experts data holds {array.size} ids, but its shape {list(shape)} needs {int(np.prod(shape))}"
            )
        return array.reshape(shape).astype(np.int64)
    if isinstance(value, list):
        array = np.asarray(value)
        if array.size == 0:
            return np.zeros((0, 0, 0), dtype=np.int64)
        return _as_int_array(array, "routed experts")
    raise EngineRecordError(f"routed_experts is a {type(value).__name__}; expected a list, a base64 string or a dict")


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


def vllm_output_trace(model: ServedModel, request_output, choice: int = 0, text: str | None = None) -> RoutingTrace:
    """The trace of one completion of vLLM's offline API: `LLM.generate(...)[n]`, a
    `RequestOutput` with `prompt_token_ids` and `outputs[choice]` holding `token_ids` and
    `routed_experts` (engine arg `enable_return_routed_experts=True`)."""
    output = request_output.outputs[choice]
    if getattr(output, "routed_experts", None) is None:
        raise EngineRecordError(
            "this vLLM output has no routed_experts: start the engine with enable_return_routed_experts=True"
        )
    prompt = list(request_output.prompt_token_ids)
    return engine_trace(model, decode_vllm_routed(output.routed_experts), prompt + list(output.token_ids),
                        engine="vllm", prompt_tokens=len(prompt), text=text)


def vllm_response_trace(model: ServedModel, response: Mapping, choice: int = 0, *,
                        prompt_ids: Sequence[int] | None = None, output_ids: Sequence[int] | None = None,
                        text: str | None = None) -> RoutingTrace:
    """The trace of `choices[choice]` of a vLLM OpenAI-compatible response (completions or chat)
    from a server started with `--enable-return-routed-experts`.

    Token ids come from the response (`prompt_token_ids`, `choices[i].token_ids`, present when
    the request sets `return_token_ids`) or from `prompt_ids` / `output_ids`. When the response
    has `prompt_routed_experts`, those are the prompt's rows and `routed_experts` the generated
    tokens'; otherwise `routed_experts` covers prompt and generated tokens.
    """
    chosen = _choice(response, choice)
    prompt_ids = _first_present(response.get("prompt_token_ids"), chosen.get("prompt_token_ids"), prompt_ids)
    output_ids = _first_present(chosen.get("token_ids"), output_ids, [])
    if prompt_ids is None:
        raise EngineRecordError(
            "the response has no prompt_token_ids: send the request with \"return_token_ids\": true"
        )
    prompt_rows = _first_present(response.get("prompt_routed_experts"), chosen.get("prompt_routed_experts"))
    parts = [decode_vllm_routed(rows) for rows in (prompt_rows, chosen.get("routed_experts")) if rows is not None]
    if not parts:
        raise EngineRecordError(
            "the vLLM response has no routed_experts: start the server with --enable-return-routed-experts"
        )
    routed = np.concatenate([rows for rows in parts if rows.size] or parts[:1])
    return engine_trace(model, routed, list(prompt_ids) + list(output_ids), engine="vllm",
                        prompt_tokens=len(prompt_ids), text=text)


def _choice(response: Mapping, choice: int) -> Mapping:
    choices = response.get("choices") if isinstance(response, Mapping) else None
    if not isinstance(choices, list) or not 0 <= choice < len(choices) or not isinstance(choices[choice], Mapping):
        raise EngineRecordError(f"the response has no choices[{choice}]; is it an OpenAI-compatible completion?")
    return choices[choice]


def _first_present(*values):
    return next((value for value in values if value is not None), None)


# -- SGLang, per request --------------------------------------------------------------------


def decode_sglang_routed(data: str, model: ServedModel, tokens: int) -> np.ndarray:
    """int[rows, layers, top_k] from SGLang's `meta_info["routed_experts"]`: base64 bytes of
    int32 ids without a shape. The shape is the one of [tokens or tokens - 1, every layer or the
    MoE layers, top_k] that the byte count fits."""
    raw = _b64(data, "meta_info.routed_experts")
    if len(raw) % 4:
        raise EngineRecordError(f"meta_info.routed_experts has {len(raw)} bytes, not whole int32 values")
    ids = np.frombuffer(raw, dtype="<i4")
    facts = model.facts
    for rows in (tokens, tokens - 1):
        for layers in dict.fromkeys((facts.num_layers, len(facts.layer_ids))):
            if rows > 0 and ids.size == rows * layers * facts.top_k:
                return ids.reshape(rows, layers, facts.top_k).astype(np.int64)
    raise EngineRecordError(
        f"meta_info.routed_experts holds {ids.size} expert ids, which fits neither {tokens} nor {tokens - 1} tokens "
        f"x {facts.num_layers} (or {len(facts.layer_ids)} MoE) layers x top-{facts.top_k}: "
        "is config.json the served model's?"
    )


def sglang_response_trace(model: ServedModel, response: Mapping, *, prompt_ids: Sequence[int], choice: int = 0,
                          output_ids: Sequence[int] | None = None, text: str | None = None) -> RoutingTrace:
    """The trace of an SGLang response with `meta_info.routed_experts` (server flag
    `--enable-return-routed-experts`, request field `return_routed_experts: true`): a `/generate`
    result, or `choices[choice]` of an OpenAI-compatible one. `prompt_ids` are the ids sent
    (`input_ids`); generated ids come from `output_ids` in the response or the argument."""
    record = response
    if isinstance(response, Mapping) and "choices" in response:
        record = _choice(response, choice)
    meta = record.get("meta_info") if isinstance(record.get("meta_info"), Mapping) else {}
    data = _first_present(meta.get("routed_experts"), record.get("routed_experts"),
                          (response.get("meta_info") or {}).get("routed_experts"))
    if data is None:
        raise EngineRecordError(
            "the SGLang response has no meta_info.routed_experts: start the server with "
            "--enable-return-routed-experts and send \"return_routed_experts\": true"
        )
    output_ids = list(_first_present(record.get("output_ids"), meta.get("output_ids"), output_ids, []))
    ids = list(prompt_ids) + output_ids
    return engine_trace(model, decode_sglang_routed(data, model, len(ids)), ids, engine="sglang",
                        prompt_tokens=len(prompt_ids), text=text)


# -- SGLang, the per_token expert-distribution recorder ----------------------------------------


def read_sglang_dump(path: str | Path, model: ServedModel) -> list[RoutingTrace]:
    """The sequences of an SGLang `per_token` recorder dump file
    (`expert_distribution_recorder_{time}_{rank}.pt`), one trace each, in the order they began.

    The file is read with `torch.load(weights_only=True)`: tensors, lists, dicts and numbers
    only; a file that would need unpickling other objects is refused. Each record is one forward
    pass: `input_ids` and `positions` per token, `extend_seq_lens` (tokens per sequence in a
    prefill pass; absent in a decode pass, one token per sequence) and `topk_ids_of_layer`
    int[layers, tokens, slots] of physical expert slots, -1 where unused, mapped to logical
    experts through `last_physical_to_logical_map` [layers, physical slots]. Sequences are
    rebuilt from positions: a segment at position 0 starts one; a segment at position p
    continues the earliest-started sequence that holds p tokens and has not grown in this pass.
    """
    dump = _load_dump(Path(path))
    records, mapping = dump.get("records"), dump.get("last_physical_to_logical_map")
    if not isinstance(records, list) or mapping is None:
        raise EngineRecordError(
            f"{path} is not a per_token recorder dump: it needs \"records\" and \"last_physical_to_logical_map\" "
            "(start SGLang with --expert-distribution-recorder-mode per_token)"
        )
    mapping = _as_int_array(_numpy(mapping, "last_physical_to_logical_map"), "last_physical_to_logical_map")
    sequences: list[dict] = []
    for number, record in enumerate(records):
        _append_pass(sequences, record, mapping, number, path)
    if not sequences:
        raise EngineRecordError(f"{path} holds no tokens: record while the server handles requests, then dump")
    return [
        engine_trace(model, np.concatenate(s["routed"]), s["ids"], engine="sglang")
        for s in sequences
    ]


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


def _append_pass(sequences: list[dict], record, mapping: np.ndarray, number: int, path) -> None:
    where = f"{path}, record {number}"
    if not isinstance(record, Mapping) or "topk_ids_of_layer" not in record:
        raise EngineRecordError(f"{where} has no topk_ids_of_layer: was the recorder in per_token mode?")
    physical = _as_int_array(_numpy(record["topk_ids_of_layer"], "topk_ids_of_layer"), f"{where}: topk_ids_of_layer")
    input_ids = _numpy(record.get("input_ids"), "input_ids").reshape(-1)
    positions = _numpy(record.get("positions"), "positions").reshape(-1)
    if physical.ndim != 3 or not physical.shape[1] == len(input_ids) == len(positions):
        raise EngineRecordError(
            f"{where}: topk_ids_of_layer {physical.shape}, {len(input_ids)} input_ids and {len(positions)} positions; "
            "expected [layers, tokens, slots] and one id and position per token"
        )
    if mapping.shape[0] != physical.shape[0] or (physical >= mapping.shape[1]).any():
        raise EngineRecordError(
            f"{where}: physical expert ids up to {physical.max()} in {physical.shape[0]} layers do not fit "
            f"last_physical_to_logical_map of shape {mapping.shape}"
        )
    layer_rows = np.arange(physical.shape[0])[:, None, None]
    logical = np.where(physical >= 0, mapping[layer_rows, np.maximum(physical, 0)], -1)
    lengths = record.get("extend_seq_lens")
    if lengths is None:  # a decode pass: one token per sequence
        lengths = [1] * len(input_ids)
    else:
        lengths = [int(n) for n in _numpy(lengths, "extend_seq_lens").reshape(-1)]
    if sum(lengths) != len(input_ids):
        raise EngineRecordError(
            f"{where}: extend_seq_lens sum to {sum(lengths)}, but the pass has {len(input_ids)} tokens"
        )
    grown: set[int] = set()
    start = 0
    for length in lengths:
        segment = slice(start, start + length)
        start += length
        if length == 0:
            continue
        position = int(positions[segment][0])
        target = _sequence_at(sequences, position, grown)
        if target is None:
            raise EngineRecordError(
                f"{where}: a segment starts at position {position}, but no recorded sequence has {position} tokens; "
                "start recording before the requests are sent"
            )
        grown.add(target)
        sequences[target]["ids"].extend(int(i) for i in input_ids[segment])
        sequences[target]["routed"].append(logical[:, segment].transpose(1, 0, 2))


def _sequence_at(sequences: list[dict], position: int, grown: set[int]) -> int | None:
    if position == 0:
        sequences.append({"ids": [], "routed": []})
        return len(sequences) - 1
    return next((n for n, s in enumerate(sequences) if n not in grown and len(s["ids"]) == position), None)
