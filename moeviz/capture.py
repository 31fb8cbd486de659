"""Capture the routing a MoE model really used, into a RoutingTrace.

Routers are found from the model's own declaration, `_can_record_outputs["router_logits"]`
(transformers v5), not from hard-coded module names. Forward hooks on them record the router
logits and the top-k expert ids and weights the model then hands to its experts: the exact
selection, never re-derived from the logits (that would be wrong for biased or grouped
routers such as DeepSeek-V3's).

Thread safety: `st.cache_resource` shares one model object between browser sessions, so a
hook registered by one call also fires during another thread's forward pass. Each call
therefore registers its own hooks, which record only while that call's collector is the one
set in a `ContextVar` (each thread has its own context), and removes them in `finally`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moeviz.tokens import Tokenized, tokenize
from moeviz.trace import RoutingTrace

DEFAULT_MAX_TOKENS = 2048


class NoRoutersError(ValueError):
    """The model declares no MoE router modules."""


@dataclass(frozen=True)
class RouterLayout:
    """Where a router class puts logits, weights and ids in its output tuple, and how it
    scores experts. Most v5 routers return `(router_logits, top_k_weights, top_k_indices)`."""

    logits: int = 0
    weights: int = 1
    ids: int = 2
    scoring: str = "softmax"


DEFAULT_LAYOUT = RouterLayout()

# Router classes whose output or scoring differs from the default, by class name.
ROUTER_LAYOUTS: dict[str, RouterLayout] = {
    "DeepseekV3TopkRouter": RouterLayout(scoring="sigmoid"),
}


@dataclass(frozen=True)
class RouterSite:
    """One router module of a model and the decoder layer it belongs to."""

    name: str
    layer_id: int
    module: nn.Module
    layout: RouterLayout


def find_routers(model: nn.Module) -> list[RouterSite]:
    """The router modules a model declares in `_can_record_outputs["router_logits"]`, in
    layer order. Raises NoRoutersError for a model without any."""
    targets = _declared_router_classes(model)
    sites = [
        RouterSite(name, _layer_number(name), module, ROUTER_LAYOUTS.get(type(module).__name__, DEFAULT_LAYOUT))
        for name, module in model.named_modules()
        if targets and isinstance(module, targets)
    ]
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
    """The decoder-layer number in a module path such as `model.layers.12.mlp.gate`."""
    match = re.search(r"\.(\d+)\.", f".{module_name}.")
    if match is None:
        raise ValueError(f"Cannot tell which layer router {module_name!r} belongs to")
    return int(match.group(1))


# -- hooks ---------------------------------------------------------------------------------

_active_collector: ContextVar[dict | None] = ContextVar("moeviz_router_collector", default=None)


@contextmanager
def recording_routers(model: nn.Module) -> Iterator[dict[int, list[tuple]]]:
    """Record every router call of `model` made by this thread inside the block.

    Yields {layer_id: [(logits, weights, ids), ...]} with one entry per forward pass, tensors
    detached and on the CPU. Hooks exist only for the duration of the block.
    """
    collector: dict[int, list[tuple]] = {}
    handles = [site.module.register_forward_hook(_recorder(site, collector)) for site in find_routers(model)]
    token = _active_collector.set(collector)
    try:
        yield collector
    finally:
        _active_collector.reset(token)
        for handle in handles:
            handle.remove()


def _recorder(site: RouterSite, collector: dict):
    layout = site.layout

    def hook(module, args, output):
        if _active_collector.get() is not collector:
            return  # another call's forward pass on the same shared model
        if not isinstance(output, tuple) or len(output) <= max(layout.logits, layout.weights, layout.ids):
            raise TypeError(
                f"Router {type(module).__name__} at {site.name} returned {type(output).__name__}; "
                f"moeviz expects (router_logits, top_k_weights, top_k_indices). Add its layout to "
                "moeviz.capture.ROUTER_LAYOUTS."
            )
        captured = (output[layout.logits], output[layout.weights], output[layout.ids])
        collector.setdefault(site.layer_id, []).append(
            tuple(t.detach().to("cpu", torch.float32 if t.is_floating_point() else torch.int64) for t in captured)
        )

    return hook


# -- one text -> one trace ------------------------------------------------------------------


def trace_text(model, tokenizer, text: str, *, model_id: str = "", max_tokens: int = DEFAULT_MAX_TOKENS) -> RoutingTrace:
    """Run `text` through the model once and return the routing it used.

    The text is cut at `max_tokens` tokens; `trace.truncated` tells whether it was.
    """
    tokenized = tokenize(tokenizer, text, max_tokens)
    device = next(model.parameters()).device
    input_ids = torch.tensor([tokenized.ids], device=device)
    with recording_routers(model) as collector, torch.inference_mode():
        model(input_ids=input_ids, use_cache=False)
    return build_trace(model, tokenized, text, collector, model_id=model_id)


def build_trace(model, tokenized: Tokenized, text: str, collector: dict, *, model_id: str) -> RoutingTrace:
    """Assemble a RoutingTrace from recorded router calls (several calls are concatenated
    along tokens, e.g. the steps of a generation)."""
    sites = find_routers(model)
    layer_ids = [site.layer_id for site in sites]
    missing = [layer for layer in layer_ids if layer not in collector]
    if missing:
        raise RuntimeError(f"Routers of layers {missing} did not run during the forward pass")
    logits, weights, ids = (
        np.stack([torch.cat([call[part] for call in collector[layer]]).numpy() for layer in layer_ids])
        for part in range(3)
    )
    ids, weights = _by_weight(ids, weights)
    config = model.config
    return RoutingTrace(
        model_id=model_id or getattr(config, "_name_or_path", "") or type(model).__name__,
        model_type=config.model_type,
        num_experts=logits.shape[-1],
        top_k=ids.shape[-1],
        scoring=sites[0].layout.scoring,
        num_layers=config.num_hidden_layers,
        layer_ids=layer_ids,
        text=text,
        tokens=tokenized.tokens,
        token_ids=tokenized.ids,
        offsets=tokenized.offsets,
        topk_ids=ids.astype(np.int32),
        topk_weights=weights.astype(np.float32),
        router_logits=logits.astype(np.float32),
        input_token_count=tokenized.input_token_count,
        router_class=type(sites[0].module).__name__,
    )


def _by_weight(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each token's k picks by weight, highest first (stable), so slot 0 is the first
    choice whatever order the router returned them in."""
    order = np.argsort(-weights, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)
