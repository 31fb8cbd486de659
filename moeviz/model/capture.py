"""Capture the routing a MoE model really used, into a RoutingTrace.

Routers are found from the model's own declaration, `_can_record_outputs["router_logits"]`
(transformers v5), not from hard-coded module names. Forward hooks on them record the router
logits and the top-k expert ids and weights the model then hands to its experts: the exact
selection, never re-derived from the logits (that would be wrong for biased or grouped
routers such as DeepSeek-V3's). Routers that report their selection differently, or not at
all, are described in one table, `ROUTER_LAYOUTS`.

Thread safety: `st.cache_resource` shares one model object between browser sessions, so a
hook registered by one call also fires during another thread's forward pass. Each call
therefore registers its own hooks, which record only while that call's collector is the one
set in a `ContextVar` (each thread has its own context), and removes them in `finally`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moeviz.model.tokens import Tokenized, tokenize
from moeviz.model.weights import quantization_of
from moeviz.trace import RoutingTrace

DEFAULT_MAX_TOKENS = 2048


class NoRoutersError(ValueError):
    """The model declares no MoE router modules."""


def _returned(weights: int, ids: int) -> Callable:
    """The selection as the router returns it, at these positions of its output tuple."""
    return lambda router, output: (output[weights], output[ids])


@dataclass(frozen=True)
class RouterLayout:
    """How one router class reports the routing it decided, and how it scores experts.

    logits:    position of router_logits [tokens, experts] in the router's output tuple;
               None when the output is the logits tensor itself.
    selection: (router, output) -> (top_k_weights, top_k_ids), each [tokens, k], exactly as
               the experts receive them. None when the router returns no selection: then it
               is read where the experts module receives it, from its
               `(hidden_states, top_k_index, top_k_weights)` arguments.
    scoring:   how router_logits become the scores shown (`RoutingTrace.router_probs`).
    top_k:     k of a router whose module (and MoE block) has no `top_k` attribute.

    The default fits most v5 routers: `(router_logits, top_k_weights, top_k_indices)`, handed
    to the experts unchanged (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2, GPT-OSS, Jamba,
    GraniteMoE, PhiMoE).
    """

    logits: int | None = 0
    selection: Callable | None = _returned(weights=1, ids=2)
    scoring: str = "softmax"
    top_k: int | None = None


DEFAULT_LAYOUT = RouterLayout()


def _llama4_selection(router, output):
    """Llama4Router returns (router_scores, router_logits): router_scores [tokens, experts] is
    the sigmoid of the top-k logits scattered into -inf, so exactly 0 outside the top-k, and
    the MoE block scales each expert's *input* by its column. The experts used are the top-k
    of router_scores, their weights those scores."""
    return torch.topk(output[0], router.top_k, dim=-1)


def _switch_selection(router, output):
    """SwitchTransformersTop1Router returns (expert_index, router_probs, router_logits):
    expert_index [batch, seq, experts] is the one-hot top-1 choice with tokens beyond an
    expert's capacity zeroed, router_probs [batch, seq, 1] the chosen expert's probability.
    A dropped token keeps the expert it chose, with weight 0: the experts skip it, so its
    MLP output is zero, as a weight of 0 gives."""
    dispatch, probs, logits = output
    kept = dispatch.any(dim=-1, keepdim=True)
    # The router's own choice, as it computed it: argmax of the softmax in the router's dtype.
    chosen = torch.softmax(logits, dim=-1, dtype=router.dtype).to(router.input_dtype).argmax(dim=-1, keepdim=True)
    return probs * kept, torch.where(kept, dispatch.argmax(dim=-1, keepdim=True), chosen)


# Router classes whose output or scoring differs from the default, by class name; each entry
# read from the class's forward in transformers 5.24 and tested in tests/test_families.py.
ROUTER_LAYOUTS: dict[str, RouterLayout] = {
    # Sigmoid scores; experts picked on scores + e_score_correction_bias within the best
    # n_group groups, weighted by the unbiased scores (normalised if norm_topk_prob) times
    # routed_scaling_factor. The default tuple holds exactly that selection.
    "DeepseekV3TopkRouter": RouterLayout(scoring="sigmoid"),
    "Glm4MoeTopkRouter": RouterLayout(scoring="sigmoid"),
    "Llama4Router": RouterLayout(logits=1, selection=_llama4_selection, scoring="sigmoid"),
    "SwitchTransformersTop1Router": RouterLayout(logits=2, selection=_switch_selection, top_k=1),
    # DbrxRouter returns the logits alone; DbrxFFN picks the top-k and p-normalises their
    # weights outside it, then hands them to DbrxExperts.
    "DbrxRouter": RouterLayout(logits=None, selection=None),
}


@dataclass(frozen=True)
class RouterSite:
    """One router module of a model, the MoE block around it and the layer it belongs to.

    `layer_id` numbers layers as `RoutingTrace.layer_ids` does: an encoder-decoder model's
    encoder layers first, then its decoder layers offset by the encoder's layer count.
    """

    name: str
    layer_id: int
    stack: str  # "encoder" or "decoder"
    module: nn.Module
    block: nn.Module  # the router's parent: holds the experts and any shared experts
    layout: RouterLayout


def find_routers(model: nn.Module) -> list[RouterSite]:
    """The router modules a model declares in `_can_record_outputs["router_logits"]`, in
    layer order. Raises NoRoutersError for a model without any."""
    targets = _declared_router_classes(model)
    encoder_layers, _ = layer_counts(model.config)
    sites = []
    for name, module in model.named_modules():
        if not (targets and isinstance(module, targets)):
            continue
        stack = "encoder" if encoder_layers and re.match(r"(.*\.)?encoder\.", name) else "decoder"
        number = _layer_number(name)
        sites.append(RouterSite(
            name=name,
            layer_id=number if stack == "encoder" else encoder_layers + number,
            stack=stack,
            module=module,
            block=model.get_submodule(name.rpartition(".")[0]),
            layout=ROUTER_LAYOUTS.get(type(module).__name__, DEFAULT_LAYOUT),
        ))
    if not sites:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise NoRoutersError(
            f"This model ({model_type}) has no MoE routers: moeviz looks for the router classes "
            "a transformers model declares in `_can_record_outputs['router_logits']` "
            "(e.g. MixtralTopKRouter) and found none. Is it a dense model?"
        )
    return sorted(sites, key=lambda site: site.layer_id)


def _declared_router_classes(model: nn.Module) -> tuple[type, ...]:
    recorders = []
    for module in model.modules():
        declared = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        if declared is not None:
            recorders.extend(declared if isinstance(declared, list) else [declared])
    return tuple({getattr(r, "target_class", r) for r in recorders if isinstance(getattr(r, "target_class", r), type)})


def _layer_number(module_name: str) -> int:
    """The layer number in a module path such as `model.layers.12.mlp.gate` or
    `decoder.block.3.layer.2.mlp.router` (the number within its stack)."""
    match = re.search(r"\.(\d+)\.", f".{module_name}.")
    if match is None:
        raise ValueError(f"Cannot tell which layer router {module_name!r} belongs to")
    return int(match.group(1))


def layer_counts(config) -> tuple[int, int]:
    """(encoder layers, decoder layers) of a model; 0 encoder layers for a decoder-only one.
    Encoder-decoder configs name them num_layers / num_decoder_layers (T5, Switch) or
    encoder_layers / decoder_layers (NLLB-MoE)."""
    if not getattr(config, "is_encoder_decoder", False):
        return 0, config.get_text_config(decoder=True).num_hidden_layers
    encoder = getattr(config, "encoder_layers", None) or config.num_layers
    return encoder, getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None) or encoder


@dataclass(frozen=True)
class RoutingFacts:
    """What a model's routers are, read from its modules without running it."""

    layer_ids: list[int]  # MoE layers, numbered as in RoutingTrace.layer_ids
    num_layers: int  # every layer, dense ones included (encoder + decoder)
    encoder_layers: int  # 0 for a decoder-only model
    num_experts: int  # routed experts per MoE layer
    top_k: int
    scoring: str
    shared_experts: int  # always-active experts beside the routed ones, per MoE layer
    router_class: str


def routing_facts(model: nn.Module) -> RoutingFacts:
    """The routing facts of `model`. Raises NoRoutersError for a dense model."""
    sites = find_routers(model)
    first = sites[0]
    encoder_layers, decoder_layers = layer_counts(model.config)
    return RoutingFacts(
        layer_ids=[site.layer_id for site in sites],
        num_layers=encoder_layers + decoder_layers,
        encoder_layers=encoder_layers,
        num_experts=int(_declared(first, "num_experts") or next(first.module.parameters()).shape[0]),
        top_k=int(_declared(first, "top_k") or first.layout.top_k),
        scoring=first.layout.scoring,
        shared_experts=_shared_experts(first.block, model.config.get_text_config(decoder=True)),
        router_class=type(first.module).__name__,
    )


def _declared(site: RouterSite, name: str):
    """An attribute such as `num_experts` or `top_k` from the router, its MoE block or the
    block's experts, whichever sets it first (DBRX's router knows neither)."""
    for module in (site.module, site.block, getattr(site.block, "experts", None)):
        if getattr(module, name, None) is not None:
            return getattr(module, name)
    return None


def _shared_experts(block: nn.Module, config) -> int:
    """How many always-active experts sit beside the routed ones in a MoE block: none without
    a `shared_expert(s)` module. DeepSeek and GLM fuse `n_shared_experts` experts into that
    one MLP; Qwen2-MoE's is `shared_expert_intermediate_size` wide, a multiple of a routed
    expert's `moe_intermediate_size` (4 in Qwen1.5-MoE-A2.7B); Llama 4 has one."""
    if not (hasattr(block, "shared_experts") or hasattr(block, "shared_expert")):
        return 0
    if getattr(config, "n_shared_experts", None) is not None:
        return int(config.n_shared_experts)
    shared = getattr(config, "shared_expert_intermediate_size", None)
    routed = getattr(config, "moe_intermediate_size", None)
    return max(1, round(shared / routed)) if shared and routed else 1


# -- hooks ---------------------------------------------------------------------------------

PARTS = ("logits", "weights", "ids")

_active_collector: ContextVar[dict | None] = ContextVar("moeviz_router_collector", default=None)


@contextmanager
def recording_routers(model: nn.Module) -> Iterator[dict[str, dict[str, list[torch.Tensor]]]]:
    """Record every router call of `model` made by this thread inside the block.

    Yields {router name: {"logits" | "weights" | "ids": [tensor per forward pass]}}, tensors
    [tokens, experts or k], detached; on the model's device inside the block and on the CPU
    once it ends. Hooks exist only for the duration of the block.
    """
    collector: dict[str, dict[str, list[torch.Tensor]]] = {}
    handles = []
    try:
        for site in find_routers(model):
            handles.append(site.module.register_forward_hook(_router_recorder(site, collector)))
            if site.layout.selection is None:
                experts = site.block.get_submodule("experts")
                handles.append(experts.register_forward_pre_hook(_experts_recorder(site, collector)))
        token = _active_collector.set(collector)
        try:
            yield collector
        finally:
            _active_collector.reset(token)
        _to_host(collector)
    finally:
        for handle in handles:
            handle.remove()


def _router_recorder(site: RouterSite, collector: dict):
    layout = site.layout

    def hook(module, args, output):
        if _active_collector.get() is not collector:
            return  # another call's forward pass on the same shared model
        try:
            if layout.logits is not None and not isinstance(output, tuple):
                raise TypeError("expected a tuple")
            parts = {"logits": output if layout.logits is None else output[layout.logits]}
            if layout.selection is not None:
                parts["weights"], parts["ids"] = layout.selection(module, output)
        except (IndexError, TypeError, ValueError) as error:
            raise TypeError(
                f"Router {type(module).__name__} at {site.name} returned {type(output).__name__}, which "
                "does not fit its layout (by default (router_logits, top_k_weights, top_k_indices)). "
                f"Describe it in moeviz.model.capture.ROUTER_LAYOUTS. ({error})"
            ) from error
        _store(collector, site, parts)

    return hook


def _experts_recorder(site: RouterSite, collector: dict):
    def hook(module, args):
        if _active_collector.get() is not collector:
            return
        if len(args) < 3:
            raise TypeError(
                f"The experts of {site.name} were called with {len(args)} positional arguments; moeviz "
                "reads their selection from (hidden_states, top_k_index, top_k_weights)."
            )
        _store(collector, site, {"ids": args[1], "weights": args[2]})

    return hook


def _store(collector: dict, site: RouterSite, parts: dict[str, torch.Tensor]) -> None:
    """Keep each part as [tokens, last dim], float32 scores and int64 ids, as a copy on the
    model's device (the model may reuse its own tensors); `_to_host` moves them all at the end."""
    calls = collector.setdefault(site.name, {})
    for part, tensor in parts.items():
        tensor = tensor.detach()
        tensor = tensor.reshape(-1, tensor.shape[-1])
        calls.setdefault(part, []).append(tensor.to(torch.float32 if tensor.is_floating_point() else torch.int64, copy=True))


@torch.no_grad()
def _to_host(collector: dict) -> None:
    """Move every recorded tensor to the CPU in one copy per device and dtype. A `.to("cpu")` in
    the hooks would synchronise with the GPU three times per MoE layer and forward pass (~96
    times per generated Mixtral-8x7B token); this is once per recording."""
    slots = [(calls, i) for parts in collector.values() for calls in parts.values() for i in range(len(calls))]
    groups: dict[tuple, list] = {}
    for calls, i in slots:
        if calls[i].device.type != "cpu":
            groups.setdefault((calls[i].device, calls[i].dtype), []).append((calls, i))
    for members in groups.values():
        host = torch.cat([calls[i].reshape(-1) for calls, i in members]).cpu()
        for (calls, i), flat in zip(members, host.split([calls[i].numel() for calls, i in members])):
            calls[i] = flat.view(calls[i].shape)


# -- one text -> one trace ------------------------------------------------------------------


def trace_text(model, tokenizer, text: str, *, model_id: str = "", max_tokens: int = DEFAULT_MAX_TOKENS) -> RoutingTrace:
    """Run `text` through the model once and return the routing it used.

    The text is cut at `max_tokens` tokens; `trace.truncated` tells whether it was.

    An encoder-decoder model (Switch Transformers) reads the text in its encoder, and its
    decoder reads the same text after the decoder start token, as it would while writing it
    (teacher forcing). Decoder position i + 1 then holds token i; the start position is
    dropped, so position i of every layer, encoder or decoder, is token i.
    """
    tokenized = tokenize(tokenizer, text, max_tokens)
    device = next(model.parameters()).device
    inputs = {"input_ids": torch.tensor([tokenized.ids], device=device)}
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    if encoder_decoder:
        inputs["decoder_input_ids"] = torch.tensor([[_decoder_start(model.config)] + tokenized.ids], device=device)
    with recording_routers(model) as collector, torch.inference_mode():
        model(**inputs, use_cache=False, **last_logit_only(model))
    if encoder_decoder:
        for site in find_routers(model):
            if site.stack == "decoder" and site.name in collector:
                collector[site.name] = {part: [call[1:] for call in calls] for part, calls in collector[site.name].items()}
    return build_trace(model, tokenized, text, collector, model_id=model_id)


def last_logit_only(model) -> dict:
    """Forward arguments that compute the logits of the last position only, where the model
    takes them (transformers' `logits_to_keep`; 0 would mean all): a 2,048-token batch of 8 on
    a 152k vocabulary otherwise builds ~5 GB of logits nobody reads."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _decoder_start(config) -> int:
    """The decoder start token; T5-style models (Switch) use the pad token when unset."""
    start = getattr(config, "decoder_start_token_id", None)
    start = config.pad_token_id if start is None else start
    if start is None:
        raise ValueError("This encoder-decoder model's config sets neither decoder_start_token_id nor pad_token_id")
    return start


def build_trace(model, tokenized: Tokenized, text: str, collector: dict, *, model_id: str) -> RoutingTrace:
    """Assemble a RoutingTrace from recorded router calls (several calls are concatenated
    along tokens, e.g. the steps of a generation)."""
    sites = find_routers(model)
    missing = [site.name for site in sites if set(collector.get(site.name, {})) != set(PARTS)]
    if missing:
        raise RuntimeError(f"Routers {missing} did not run during the forward pass")
    logits, weights, ids = (
        np.stack([torch.cat(collector[site.name][part]).numpy() for site in sites]) for part in PARTS
    )
    if not logits.shape[1] == weights.shape[1] == ids.shape[1] == len(tokenized.ids) or weights.shape != ids.shape:
        raise RuntimeError(
            f"The routers recorded logits {logits.shape[1:]}, weights {weights.shape[1:]} and ids "
            f"{ids.shape[1:]} for {len(tokenized.ids)} tokens; expected [tokens, experts] and "
            "[tokens, k]. Check this router's entry in moeviz.model.capture.ROUTER_LAYOUTS."
        )
    ids, weights = _by_weight(ids, weights)
    facts = routing_facts(model)
    return RoutingTrace(
        model_id=model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        model_type=model.config.model_type,
        num_experts=logits.shape[-1],
        top_k=ids.shape[-1],
        scoring=facts.scoring,
        num_layers=facts.num_layers,
        layer_ids=facts.layer_ids,
        text=text,
        tokens=tokenized.tokens,
        token_ids=tokenized.ids,
        offsets=tokenized.offsets,
        topk_ids=ids.astype(np.int32),
        topk_weights=weights.astype(np.float32),
        router_logits=logits.astype(np.float32),
        input_token_count=tokenized.input_token_count,
        router_class=facts.router_class,
        quantization=quantization_of(model),
        shared_experts=facts.shared_experts,
        encoder_layers=facts.encoder_layers,
    )


def _by_weight(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each token's k picks by weight, highest first (stable), so slot 0 is the first
    choice whatever order the router returned them in."""
    order = np.argsort(-weights, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)
