"""Capture the routing a MoE model really used, into a RoutingTrace.

Routers are found from the model's own declaration, `_can_record_outputs["router_logits"]`
(transformers v5), not from hard-coded module names. Forward hooks on them record the router
logits and the top-k expert ids and weights the model then hands to its experts: the exact
selection, never re-derived from the logits (that would be wrong for biased or grouped
routers such as DeepSeek-V3's). Routers that report their selection differently, or not at
all, are described in one table, `ROUTER_LAYOUTS`.

How a router scores experts (softmax, sigmoid, ...) is not looked up by class name: it is
checked against the weights the router handed its experts (`decide_scoring`): the chosen
experts' weights are the scores of those experts under the right function, up to the
router's normalisation and scaling. When no function, or more than one, fits and the model
declares none, the trace says `scoring = "unknown"` and the app shows the raw logits.

Thread safety: `st.cache_resource` shares one model object between browser sessions, so a
hook registered by one call also fires during another thread's forward pass. Each call
therefore registers its own hooks, which record only while that call's collector is the one
set in a `ContextVar` (each thread has its own context), and removes them in `finally`.
"""

from __future__ import annotations

import inspect
import re
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moeviz.model.tokens import Tokenized, tokenize
from moeviz.model.weights import quantization_of
from moeviz.trace import SCORING_FUNCTIONS, RoutingTrace, expert_scores

DEFAULT_MAX_TOKENS = 2048


class NoRoutersError(ValueError):
    """The model declares no MoE router modules."""


class UnsupportedRouterError(NoRoutersError):
    """The model declares routers whose routing moeviz cannot read."""


def _returned(weights: int, ids: int) -> Callable:
    """The selection as the router returns it, at these positions of its output tuple."""
    return lambda router, output: (output[weights], output[ids])


@dataclass(frozen=True)
class RouterLayout:
    """How one router class reports the routing it decided.

    logits:    position of router_logits [tokens, experts] in the router's output tuple;
               None when the output is the logits tensor itself.
    selection: (router, output) -> (top_k_weights, top_k_ids), each [tokens, k], exactly as
               the experts receive them. None when the router returns no selection: then it
               is read where the experts module receives it, from its
               `(hidden_states, top_k_index, top_k_weights)` arguments.
    scoring:   how router_logits become scores, as read from the class's code: used where
               the weights cannot decide it (`decide_scoring`: a model on the meta device,
               weights that fit several functions, or none). None: the weights alone decide.
    top_k:     k of a router whose module (and MoE block) has no `top_k` attribute.

    The default fits most v5 routers: `(router_logits, top_k_weights, top_k_indices)`, handed
    to the experts unchanged (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GPT-OSS, Jamba,
    GraniteMoE, ...). A router declared with its logits elsewhere in its output
    (`OutputRecorder.index`) and absent from the table has its selection read at its experts.
    """

    logits: int | None = 0
    selection: Callable | None = _returned(weights=1, ids=2)
    scoring: str | None = None
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
    # Softmax, top-k, renormalised: with top-1 (its default) every weight is 1, which no
    # scoring function's scores are on every token.
    "HunYuanMoEV1Gate": RouterLayout(scoring="softmax"),
    "Llama4Router": RouterLayout(logits=1, selection=_llama4_selection, scoring="sigmoid"),
    "SwitchTransformersTop1Router": RouterLayout(logits=2, selection=_switch_selection, top_k=1),
    # DbrxRouter returns the logits alone; DbrxFFN picks the top-k and p-normalises their
    # weights outside it, then hands them to DbrxExperts.
    "DbrxRouter": RouterLayout(logits=None, selection=None),
    # sparsemixer: each choice's weight is a softmax over the experts near it (a masked
    # softmax per choice), so the weights are not proportional to one softmax.
    "PhimoeTopKRouter": RouterLayout(scoring="softmax"),
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
    declared = _declared_router_classes(model)
    encoder_layers, _ = layer_counts(model.config)
    sites = []
    for name, module in model.named_modules():
        if not isinstance(module, tuple(declared)):
            continue
        stack = "encoder" if encoder_layers and re.match(r"(.*\.)?encoder\.", name) else "decoder"
        number = _layer_number(name)
        sites.append(RouterSite(
            name=name,
            layer_id=number if stack == "encoder" else encoder_layers + number,
            stack=stack,
            module=module,
            block=model.get_submodule(name.rpartition(".")[0]),
            layout=_layout(module, declared),
        ))
    if not sites:
        raise NoRoutersError(
            f"This model ({_model_type(model)}) has no MoE routers: moeviz looks for the router classes "
            "a transformers model declares in `_can_record_outputs['router_logits']` "
            "(e.g. MixtralTopKRouter) and found none. Is it a dense model?"
        )
    return sorted(sites, key=lambda site: site.layer_id)


def _declared_router_classes(model: nn.Module) -> dict[type, int]:
    """{router class: position of router_logits in its output} from the model's declarations."""
    classes = {}
    for module in model.modules():
        declared = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        for recorder in declared if isinstance(declared, list) else [declared]:
            target = getattr(recorder, "target_class", recorder)
            if isinstance(target, type):
                classes[target] = getattr(recorder, "index", 0)
    return classes


def _layout(router: nn.Module, declared: dict[type, int]) -> RouterLayout:
    """The table's layout for this router class, else the default with the logits where the
    model declares them: a router whose logits are not first returns no selection we know of."""
    name = type(router).__name__
    if name in ROUTER_LAYOUTS:
        return ROUTER_LAYOUTS[name]
    index = next((i for cls, i in declared.items() if isinstance(router, cls)), 0)
    return DEFAULT_LAYOUT if index == 0 else RouterLayout(logits=index, selection=None)


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


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
    """The routing facts of `model`. Raises NoRoutersError for a dense model, and
    UnsupportedRouterError for routers whose k moeviz cannot find.

    The scoring is checked on one MoE block run on a few random hidden states (`probe_scoring`);
    on the meta device (no weights) it is what the model declares, or "unknown"."""
    sites = find_routers(model)
    return _facts(model, sites, probe_scoring(model, sites[0]))


def _facts(model: nn.Module, sites: list[RouterSite], scoring: str) -> RoutingFacts:
    first = sites[0]
    encoder_layers, decoder_layers = layer_counts(model.config)
    return RoutingFacts(
        layer_ids=[site.layer_id for site in sites],
        num_layers=encoder_layers + decoder_layers,
        encoder_layers=encoder_layers,
        num_experts=_num_experts(model, first),
        top_k=_top_k(model, first),
        scoring=scoring,
        shared_experts=_shared_experts(first.block, model.config.get_text_config(decoder=True)),
        router_class=type(first.module).__name__,
    )


# Where configs keep k and E: names differ by family (Gemma 4: top_k_experts; DBRX:
# ffn_config.moe_top_k, read from its MoE block).
TOP_K_NAMES = ("top_k", "num_experts_per_tok", "top_k_experts", "moe_top_k", "num_experts_per_token",
               "experts_per_token", "moe_k", "router_top_k", "num_selected_experts")
NUM_EXPERTS_NAMES = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")


def _top_k(model: nn.Module, site: RouterSite) -> int:
    k = _declared(model, site, TOP_K_NAMES) or site.layout.top_k
    if not k:
        raise UnsupportedRouterError(
            f"moeviz cannot tell how many experts each token uses in this {_model_type(model)} model: its router "
            f"{type(site.module).__name__} and its config set none of {', '.join(TOP_K_NAMES)}."
        )
    return int(k)


def _num_experts(model: nn.Module, site: RouterSite) -> int:
    experts = _declared(model, site, NUM_EXPERTS_NAMES)
    if not experts:
        raise UnsupportedRouterError(
            f"moeviz cannot tell how many experts this {_model_type(model)} model routes to: its router "
            f"{type(site.module).__name__} and its config set none of {', '.join(NUM_EXPERTS_NAMES)}."
        )
    return int(experts)


def _declared(model: nn.Module, site: RouterSite, names: tuple[str, ...]):
    """The first of `names` set on the router, its MoE block, the block's experts, the
    router's own config (Gemma 4) or the model's text config, in that order (DBRX's router
    knows neither k nor E: its block does)."""
    holders = (site.module, site.block, getattr(site.block, "experts", None), getattr(site.module, "config", None),
               model.config.get_text_config(decoder=True), model.config)
    for holder in holders:
        for name in names:
            value = getattr(holder, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _shared_experts(block: nn.Module, config) -> int:
    """How many always-active experts sit beside the routed ones in a MoE block: none without
    a `shared_expert(s)` module. DeepSeek and GLM fuse `n_shared_experts` experts into that
    one MLP; Qwen2-MoE's is `shared_expert_intermediate_size` wide, a multiple of a routed
    expert's `moe_intermediate_size` (4 in Qwen1.5-MoE-A2.7B); Llama 4 and HunYuan
    (`shared_mlp`) have one."""
    if not any(hasattr(block, name) for name in ("shared_experts", "shared_expert", "shared_mlp")):
        return 0
    if getattr(config, "n_shared_experts", None) is not None:
        return int(config.n_shared_experts)
    shared = getattr(config, "shared_expert_intermediate_size", None)
    routed = getattr(config, "moe_intermediate_size", None)
    return max(1, round(shared / routed)) if shared and routed else 1


# -- scoring -------------------------------------------------------------------------------

CANDIDATE_SCORINGS = tuple(name for name in SCORING_FUNCTIONS if name != "unknown")
# Largest relative spread of weight / score allowed where the scoring fits: bf16 weights carry
# rounding errors up to 2^-8 ≈ 0.4%; a wrong function misses by far more on almost every token.
SCORING_TOLERANCE = 2e-2


def decide_scoring(logits: np.ndarray, weights: np.ndarray, ids: np.ndarray, declared: str | None = None) -> str:
    """How a router turned `logits` float[layers, tokens, experts] into the `weights`
    float[layers, tokens, k] it gave experts `ids` int[layers, tokens, k], or "unknown".

    A scoring function fits when the weights are the chosen experts' scores up to one factor
    per token (top-k normalisation, routed_scaling_factor): with two or more weighted picks
    per token, their ratios must equal those of the scores; with one (top-1), weight / score
    must be one constant across the tokens of a layer (Llama 4: sigmoid, Switch: softmax).
    Softmax over the top-k logits only (GPT-OSS, GraniteMoE) is the full softmax
    renormalised, so "softmax" fits it. "probabilities" fits a router that returns
    distributions itself (every row >= 0, summing to 1: Gemma 4), whatever its weights.
    Zero weights (a token dropped at capacity) say nothing and are skipped.

    One fitting function is the answer; with several (too few tokens to tell apart), or none
    (PhiMoE's sparsemixer weights), the `declared` one (`declared_scoring`, or the probe's) if
    it is among them or none fits; otherwise "unknown".
    """
    fits = [name for name in CANDIDATE_SCORINGS if _fits(name, logits, weights, ids)]
    if len(fits) == 1:
        return fits[0]
    if declared in CANDIDATE_SCORINGS and (declared in fits or not fits):
        return declared
    return "unknown"


def _fits(scoring: str, logits: np.ndarray, weights: np.ndarray, ids: np.ndarray) -> bool:
    """Whether `weights` are `scoring`'s scores of `ids` up to a factor per token (a factor per
    layer for top-1), within SCORING_TOLERANCE. One layer at a time: a whole trace's scores in
    float64 would take gigabytes."""
    if scoring == "probabilities":
        return bool((logits >= 0).all() and np.allclose(logits.sum(-1), 1.0, atol=1e-3))
    spreads = [_ratio_spread(expert_scores(layer_logits, scoring), np.asarray(layer_weights, np.float64), layer_ids)
               for layer_logits, layer_weights, layer_ids in zip(logits, weights, np.asarray(ids, np.int64))]
    return max(spreads, default=0.0) <= SCORING_TOLERANCE


def _ratio_spread(scores: np.ndarray, weights: np.ndarray, ids: np.ndarray) -> float:
    """The largest relative spread of weight / score [tokens, k] within a token, or across
    the layer's tokens when none has two weighted picks; inf where a weighted pick scores <= 0."""
    scores = np.take_along_axis(scores, ids, axis=-1)
    # Weights far below their token's largest are lost to rounding: only the rest are evidence.
    used = weights > 1e-6 * weights.max(axis=-1, keepdims=True)
    if ((scores <= 0) & used).any():
        return np.inf
    ratio = weights / np.where(used, scores, 1.0)
    several = used.sum(-1) >= 2
    if several.any():
        high, low = (np.where(used, ratio, fill)[several] for fill in (-np.inf, np.inf))
        return float((high.max(-1) / low.min(-1)).max() - 1)
    kept = ratio[used]
    return float(kept.max() / kept.min() - 1) if kept.size else 0.0


def declared_scoring(model: nn.Module, site: RouterSite) -> str | None:
    """The scoring the model states: its router's ROUTER_LAYOUTS entry, else its config's
    `scoring_func` (DeepSeek-V4, Inkling 2) or `expert_selection_fn` (Cohere 2 MoE)."""
    if site.layout.scoring is not None:
        return site.layout.scoring
    config = model.config.get_text_config(decoder=True)
    for name in ("scoring_func", "expert_selection_fn"):
        value = getattr(config, name, None)
        if value in CANDIDATE_SCORINGS:
            return value
    return None


PROBE_TOKENS = 32
_probed: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


class _Recorded(Exception):
    """Stops a probe's MoE block once its router's selection is recorded."""


def probe_scoring(model: nn.Module, site: RouterSite) -> str:
    """The scoring of `site`'s router, decided (`decide_scoring`) on one call with PROBE_TOKENS
    random hidden states: the function is in the router's code, whatever its input. The router
    is called alone where it returns its selection (Gemma 4's sits in the decoder layer), else,
    or if it needs more than hidden states (MiniMax-M2's takes its bias from the block), its
    MoE block, stopped once the selection is recorded, before any expert runs. Remembered per
    model. On the meta device, or when neither call works, what the model declares, or
    "unknown"."""
    if model in _probed:
        return _probed[model]
    declared = declared_scoring(model, site)
    parameter = next(site.block.parameters())
    if parameter.is_meta:
        return declared or "unknown"
    hidden_size = model.config.get_text_config(decoder=True).hidden_size
    hidden = torch.randn(1, PROBE_TOKENS, hidden_size, generator=torch.Generator().manual_seed(0))
    hidden = hidden.to(parameter.device, parameter.dtype)
    targets = ([site.module] if site.layout.selection is not None else []) + [site.block]
    scoring = declared or "unknown"
    for target in targets:
        recorded = _probe_call(model, site, target, hidden)
        if recorded is not None:
            scoring = decide_scoring(*recorded, declared)
            break
    _probed[model] = scoring
    return scoring


def _probe_call(model: nn.Module, site: RouterSite, target: nn.Module, hidden: torch.Tensor):
    """(logits, weights, ids), each [1, tokens, ...], from calling `target` (the router or its
    block) on `hidden`; None when it cannot be called with hidden states alone."""
    recorded: dict = {}

    def stop(*_):
        if set(recorded.get(site.name, {})) == set(PARTS):
            raise _Recorded

    handles = []
    try:
        with recording_routers(model, [site]) as collector, torch.inference_mode():
            recorded = collector
            # Registered after the recorder's hook, so `stop` runs right after it.
            if site.layout.selection is None:
                handles.append(site.block.experts.register_forward_pre_hook(stop))
            else:
                handles.append(site.module.register_forward_hook(stop))
            target(hidden)
    except _Recorded:
        return tuple(torch.cat(recorded[site.name][part]).numpy()[None] for part in PARTS)
    except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError):  # needs more than hidden states
        return None
    finally:
        for handle in handles:
            handle.remove()
    return None  # it never called the router


# -- hooks ---------------------------------------------------------------------------------

PARTS = ("logits", "weights", "ids")

_active_collector: ContextVar[dict | None] = ContextVar("moeviz_router_collector", default=None)


@contextmanager
def recording_routers(model: nn.Module, sites: list[RouterSite] | None = None) -> Iterator[dict[str, dict[str, list[torch.Tensor]]]]:
    """Record every router call of `model` (or of `sites` only) made by this thread inside the block.

    Yields {router name: {"logits" | "weights" | "ids": [tensor per forward pass]}}, tensors
    [tokens, experts or k], detached; on the model's device inside the block and on the CPU
    once it ends. Hooks exist only for the duration of the block. A router whose output does
    not fit its layout raises UnsupportedRouterError.
    """
    collector: dict[str, dict[str, list[torch.Tensor]]] = {}
    handles = []
    try:
        for site in find_routers(model) if sites is None else sites:
            handles.append(site.module.register_forward_hook(_router_recorder(model, site, collector)))
            if site.layout.selection is None:
                experts = getattr(site.block, "experts", None)
                if experts is None:
                    raise _unreadable(model, site, "its MoE block has no `experts` module to read the selection from")
                handles.append(experts.register_forward_pre_hook(_experts_recorder(model, site, collector)))
        token = _active_collector.set(collector)
        try:
            yield collector
        finally:
            _active_collector.reset(token)
        _to_host(collector)
    finally:
        for handle in handles:
            handle.remove()


def _unreadable(model: nn.Module, site: RouterSite, why: str) -> UnsupportedRouterError:
    return UnsupportedRouterError(
        f"moeviz cannot read the routing of this {_model_type(model)} model: router {type(site.module).__name__} "
        f"at {site.name}: {why}."
    )


def _router_recorder(model: nn.Module, site: RouterSite, collector: dict):
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
            raise _unreadable(model, site, f"it returned {type(output).__name__}, not (router_logits, top_k_weights, "
                                           f"top_k_indices) nor a layout in ROUTER_LAYOUTS ({error})") from error
        _store(collector, site, _checked(model, site, parts))

    return hook


def _experts_recorder(model: nn.Module, site: RouterSite, collector: dict):
    def hook(module, args):
        if _active_collector.get() is not collector:
            return
        if len(args) < 3:
            raise _unreadable(model, site, f"its experts were called with {len(args)} positional arguments, not "
                                           "(hidden_states, top_k_index, top_k_weights)")
        _store(collector, site, _checked(model, site, {"ids": args[1], "weights": args[2]}))

    return hook


def _checked(model: nn.Module, site: RouterSite, parts: dict) -> dict:
    """Refuse what is not a selection: ids must be integers, weights floats of the same shape,
    and the logits a float tensor (NLLB-MoE's tuple, read by the default layout, has floats
    where the ids should be)."""
    ids, weights, logits = parts.get("ids"), parts.get("weights"), parts.get("logits")
    problems = [
        (ids is not None and not (isinstance(ids, torch.Tensor) and not ids.is_floating_point()), "expert ids that are not integers"),
        (weights is not None and not (isinstance(weights, torch.Tensor) and weights.is_floating_point()), "weights that are not floats"),
        (ids is not None and weights is not None and getattr(ids, "shape", None) != getattr(weights, "shape", None),
         "ids and weights of different shapes"),
        (logits is not None and not (isinstance(logits, torch.Tensor) and logits.is_floating_point()), "router logits that are not floats"),
    ]
    for wrong, what in problems:
        if wrong:
            raise _unreadable(model, site, f"it reported {what}")
    return parts


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


def trace_text(model, tokenizer, text: str, *, model_id: str = "", max_tokens: int = DEFAULT_MAX_TOKENS,
               all_logits: bool = False) -> RoutingTrace:
    """Run `text` through the model once and return the routing it used.

    The text is cut at `max_tokens` tokens; `trace.truncated` tells whether it was. The model
    computes next-token logits at the last position only, unless `all_logits` (for a caller that
    reads them from the model's output, as interventions do).

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
        model(**inputs, use_cache=False, **({} if all_logits else last_logit_only(model)))
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
    try:
        logits, weights, ids = (
            np.stack([torch.cat(collector[site.name][part]).numpy() for site in sites]) for part in PARTS
        )
    except (RuntimeError, ValueError) as error:  # layers or calls of different widths
        raise _unreadable(model, sites[0], f"its routers recorded parts that do not stack ({error})") from None
    if not logits.shape[1] == weights.shape[1] == ids.shape[1] == len(tokenized.ids) or weights.shape != ids.shape:
        raise _unreadable(model, sites[0], f"its routers recorded logits {logits.shape[1:]}, weights "
                                           f"{weights.shape[1:]} and ids {ids.shape[1:]} for {len(tokenized.ids)} "
                                           "tokens, not [tokens, experts] and [tokens, k]")
    ids, weights = _by_weight(ids, weights)
    facts = _facts(model, sites, _trace_scoring(model, sites[0], logits, weights, ids))
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
        special_ids=tokenized.special_ids,
    )


def _trace_scoring(model, site: RouterSite, logits, weights, ids) -> str:
    """The scoring the weights of this very call show, the model's declared one where they
    cannot tell, else the probe's (run only then: it calls a MoE block once more)."""
    scoring = decide_scoring(logits, weights, ids, declared_scoring(model, site))
    if scoring == "unknown" and (probed := probe_scoring(model, site)) != "unknown":
        scoring = decide_scoring(logits, weights, ids, probed)
    return scoring


def _by_weight(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each token's k picks by weight, highest first (stable), so slot 0 is the first
    choice whatever order the router returned them in."""
    order = np.argsort(-weights, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)
