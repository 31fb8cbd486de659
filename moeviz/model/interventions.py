"""Re-run a MoE model with its routing changed: experts ablated, forced or steered, another k,
or a capacity per expert, applied inside the forward pass so that the outputs change too.

Each intervention acts where the experts receive their selection. A forward hook on the router
(for DBRX, whose router returns logits only, a pre-hook on its experts) replaces the
(weights, ids) the model would use by those the family's own routing computes under the
intervention: the router's scoring and normalisation re-run as its class does it, one small
function per router class in `REROUTES`, each read from the class's forward in transformers 5.24.
With nothing changed each returns the router's own output bit for bit (tested). What each
intervention means, at one MoE layer:

- ablate e: e can never be selected. Softmax and logit routers: its router logit is −inf before
  selection, so the others renormalise through the router's own softmax. DeepSeek-V3 / GLM-4.5
  (sigmoid scores + e_score_correction_bias, group-limited): its choice score is −inf; the
  weights of the picks are normalised as the router does.
- force e: e takes a slot of every token; the other k − f slots are chosen by the family's own
  rule among the experts neither forced nor ablated, and the weights come from the family's own
  formula on the final set. With as many forced experts as k, all routing goes onto them.
- top_k: the family's own selection with another k.
- bias b (float[experts]): added to the router logits, as if the router's linear layer had this
  bias; it moves the selection and the weights (DeepSeek-V3: its sigmoid scores).
- capacity_factor α: each expert takes at most C = max(⌈α·k·T/E⌉, 4) of the T tokens of a forward
  pass (`moeviz.analysis.metrics.expert_capacity`, as DeepSpeed sizes it); first choices of all
  tokens queue before second choices, in token order (GShard), and a
  token over capacity skips that expert: weight 0, its other weights kept
  (`moeviz.analysis.policies.limit_capacity`, the Routing lab's rule). Switch Transformers:
  replaces its own expert_capacity.
- policy (`RoutingPolicy`): a Routing-lab policy (`moeviz.analysis.policies`) decides the
  selection from the family's scores (softmax, or sigmoid for DeepSeek-V3 / GLM-4.5 / Llama 4,
  after any bias; ablated experts left out), over the T tokens of each forward pass in order:
  expert choice (each expert takes its C = ⌈c·T/E⌉ best-scoring tokens; weights = those scores,
  Zhou et al. 2022), hash (one expert per token from its id, Roller et al. 2021) or bias
  balancing (top-k of s + b, b updated after each chunk, DeepSeek-V3). Hash and bias balancing
  fix each token's set; the weights come from the family's own formula on that set, as for
  forced experts. Expert choice looks at all T tokens at once, later ones included (the paper's
  own caveat for decoding); greedy continuations re-read the whole text, so it applies there too.
Families whose router cannot do one of these exactly refuse it with `InterventionRefused`.

Thread safety, as in capture.py: hooks exist for one call only, act only while that call's
state is the one set in a ContextVar (each thread has its own), and are removed in `finally`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from moeviz.analysis import policies
from moeviz.analysis.metrics import expert_capacity
from moeviz.model.capture import (
    DEFAULT_MAX_TOKENS,
    RouterSite,
    find_routers,
    layer_counts,
    trace_text,
)
from moeviz.model.tokens import token_strings, tokenize
from moeviz.trace import RoutingTrace, layer_label

TOP_PREDICTIONS = 5


class InterventionRefused(ValueError):
    """This model's router cannot do the intervention asked for, exactly."""


POLICIES = ("expert choice", "hash", "bias balancing")


@dataclass(frozen=True)
class RoutingPolicy:
    """A Routing-lab policy applied inside the forward pass (see the module's docstring).

    name:              one of POLICIES
    experts_per_token: expert choice's c, experts per token on average (None: the layer's k)
    hash_method:       hash: "modulo" (token id mod E) or "random" (SplitMix64 of the id)
    update_speed:      bias balancing's γ (DeepSeek-V3: 0.001 per training batch)
    chunk_size:        bias balancing: tokens between two bias updates
    """

    name: str
    experts_per_token: float | None = None
    hash_method: str = "modulo"
    update_speed: float = 0.01
    chunk_size: int = 16

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"A routing policy is one of {', '.join(POLICIES)}; got {self.name!r}.")
        if self.experts_per_token is not None and not (math.isfinite(self.experts_per_token)
                                                       and self.experts_per_token > 0):
            raise ValueError(f"Expert choice's experts per token c must be a number > 0; got {self.experts_per_token}.")
        if self.hash_method not in policies.HASH_METHODS:
            raise ValueError(f"The hash is one of {', '.join(policies.HASH_METHODS)}; got {self.hash_method!r}.")
        if not (math.isfinite(self.update_speed) and self.update_speed > 0):
            raise ValueError(f"The bias update speed γ must be a number > 0; got {self.update_speed}.")
        if int(self.chunk_size) != self.chunk_size or self.chunk_size < 1:
            raise ValueError(f"The bias is updated every chunk_size >= 1 tokens; got {self.chunk_size}.")

    def describe(self) -> str:
        if self.name == "expert choice":
            return "expert choice" + ("" if self.experts_per_token is None else f" (c = {self.experts_per_token:g})")
        if self.name == "hash":
            return "hash (token id mod E)" if self.hash_method == "modulo" else "hash (random)"
        return f"bias balancing (γ = {self.update_speed:g}, every {self.chunk_size} tokens)"


@dataclass(frozen=True)
class Intervention:
    """What to change, by MoE layer: the model's own layer numbers (`RoutingTrace.layer_ids`).

    ablate:          {layer: experts never selected}
    force:           {layer: experts put into every token's selection}
    top_k:           k for every MoE layer, or {layer: k}
    bias:            {layer: {expert: value}} or {layer: float[experts]}, added to router logits
    capacity_factor: α for every MoE layer, or {layer: α}
    policy:          a RoutingPolicy for every MoE layer, or {layer: RoutingPolicy}
    """

    ablate: Mapping[int, Sequence[int]] = field(default_factory=dict)
    force: Mapping[int, Sequence[int]] = field(default_factory=dict)
    top_k: int | Mapping[int, int] | None = None
    bias: Mapping[int, Mapping[int, float] | Sequence[float]] = field(default_factory=dict)
    capacity_factor: float | Mapping[int, float] | None = None
    policy: RoutingPolicy | Mapping[int, RoutingPolicy] | None = None

    @property
    def empty(self) -> bool:
        return (not (self.ablate or self.force or self.bias) and self.top_k is None and self.capacity_factor is None
                and not self.policy)

    def describe(self, encoder_layers: int = 0) -> str:
        """One line a person can read, e.g. "ablate layer 1: 3, 5 · top-1 at every layer"."""
        def at(layer):
            return layer_label(layer, encoder_layers)

        parts = [f"ablate {at(n)}: {', '.join(map(str, e))}" for n, e in sorted(self.ablate.items())]
        parts += [f"force {at(n)}: {', '.join(map(str, e))}" for n, e in sorted(self.force.items())]
        parts += _every_layer("top", self.top_k, at, "-{}")
        for n, values in sorted(self.bias.items()):
            pairs = values.items() if isinstance(values, Mapping) else [(e, v) for e, v in enumerate(values) if v]
            parts.append(f"bias {at(n)}: " + ", ".join(f"{e} {v:+g}" for e, v in pairs))
        parts += _every_layer("capacity factor", self.capacity_factor, at, " {}")
        if isinstance(self.policy, RoutingPolicy):
            parts.append(f"{self.policy.describe()} at every MoE layer")
        elif self.policy:
            parts += [f"{policy.describe()} at {at(n)}" for n, policy in sorted(self.policy.items())]
        return " · ".join(parts) or "no intervention"


def _every_layer(name: str, value, at, form: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [f"{name}{form.format(v)} at {at(n)}" for n, v in sorted(value.items())]
    return [f"{name}{form.format(value)} at every MoE layer"]


@dataclass(frozen=True)
class LayerPlan:
    """The intervention at one MoE layer, checked against the model."""

    label: str
    k: int
    num_experts: int
    slots: int  # k of the widest layer: narrower layers fill the rest with weight-0 slots
    ablate: tuple[int, ...] = ()
    force: tuple[int, ...] = ()
    bias: tuple[float, ...] | None = None
    capacity_factor: float | None = None
    policy: RoutingPolicy | None = None
    # Per forward pass, set by a policy: each token's experts, int[tokens, k] (others: `force`).
    token_force: torch.Tensor | None = field(default=None, compare=False)


# -- each family's routing, re-run ---------------------------------------------------------

NEG_INF = float("-inf")


def _fill(scores: torch.Tensor, experts: tuple[int, ...], value: float = NEG_INF) -> torch.Tensor:
    if not experts:
        return scores
    return scores.index_fill(-1, torch.tensor(experts, device=scores.device), value)


def _steered(logits: torch.Tensor, plan: LayerPlan, ablate: bool = True) -> torch.Tensor:
    """The logits plus the plan's bias, with ablated experts at −inf."""
    if plan.bias is not None:
        logits = logits + torch.tensor(plan.bias, dtype=logits.dtype, device=logits.device)
    return _fill(logits, plan.ablate) if ablate else logits


def _forced(plan: LayerPlan, like: torch.Tensor) -> torch.Tensor | None:
    """int[tokens, f]: the experts put into each token's selection (a policy's, else the forced
    ones), or None."""
    if plan.token_force is not None:
        return plan.token_force
    if not plan.force:
        return None
    return torch.tensor(plan.force, device=like.device).expand(like.shape[0], -1)


def _without_forced(choice: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    forced = _forced(plan, choice)
    return choice if forced is None else choice.scatter(1, forced, NEG_INF)


def _pick(choice: torch.Tensor, plan: LayerPlan, *, sorted: bool = True) -> torch.Tensor:
    """ids [tokens, k]: the forced experts, then the best k − f of `choice` among the others."""
    forced = _forced(plan, choice)
    rest = torch.topk(_without_forced(choice, plan), plan.k - (0 if forced is None else forced.shape[1]),
                      dim=-1, sorted=sorted).indices
    return rest if forced is None else torch.cat([forced, rest], dim=-1)


def _softmax_top_k(*, always_normalise: bool, cast: bool):
    """Mixtral (softmax in float32, picks always renormalised, float32 weights); Qwen2/3-MoE and
    OLMoE (renormalised if norm_topk_prob, weights in the logits' dtype); Jamba (never)."""

    def route(site, logits, plan, dtype):
        probs = torch.softmax(_steered(logits, plan).float(), dim=-1)
        ids = _pick(probs, plan)
        top = probs.gather(1, ids)
        if always_normalise or getattr(site.module, "norm_topk_prob", False):
            top = top / top.sum(dim=-1, keepdim=True)
        return (top.to(dtype) if cast else top), ids

    return route


def _hunyuan(site, logits, plan, dtype):
    """HunYuan-MoE-V1: as Mixtral (softmax in float32, picks always renormalised), with the
    weights in the logits' dtype."""
    weights, ids = _softmax_top_k(always_normalise=True, cast=False)(site, logits, plan, dtype)
    return weights.to(logits.dtype), ids


def _deepseek_v2(site, logits, plan, dtype):
    """Softmax in float32; greedy top-k or, for group_limited_greedy, top-k within the topk_group
    groups of highest max score (others scored 0); weights × routed_scaling_factor."""
    router = site.module
    scores = _steered(logits, plan).softmax(dim=-1, dtype=torch.float32)
    choice = scores
    if router.topk_method == "group_limited_greedy":
        group_scores = scores.view(-1, router.num_group, router.num_experts // router.num_group).max(dim=-1).values
        choice = scores.masked_fill(~_group_mask(group_scores, router), 0.0)
    ids = _pick(choice, plan, sorted=False)
    return scores.gather(1, ids) * router.routed_scaling_factor, ids


def _sigmoid_grouped(site, logits, plan, dtype):
    """DeepSeek-V3 and GLM-4.5: sigmoid scores; choice = scores + e_score_correction_bias within
    the topk_group groups of best top-2 sum; weights = the unbiased scores of the picks,
    normalised if norm_topk_prob, × routed_scaling_factor. Ablated and forced experts leave the
    pool before the groups are scored."""
    router = site.module
    scores = _steered(logits, plan, ablate=False).sigmoid()
    choice = _without_forced(_fill(scores + router.e_score_correction_bias, plan.ablate), plan)
    group_scores = choice.view(-1, router.num_group, router.num_experts // router.num_group).topk(2, dim=-1)[0].sum(-1)
    choice = choice.masked_fill(~_group_mask(group_scores, router), NEG_INF)
    ids = _pick(choice, plan, sorted=False)
    weights = scores.gather(1, ids)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.routed_scaling_factor, ids


def _group_mask(group_scores: torch.Tensor, router) -> torch.Tensor:
    """bool[tokens, experts]: the experts of each token's topk_group best groups."""
    chosen = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(group_scores).scatter_(1, chosen, 1)
    size = router.num_experts // router.num_group
    return mask.unsqueeze(-1).expand(-1, router.num_group, size).reshape(group_scores.shape[0], -1).bool()


def _logit_top_k(site, logits, plan, dtype):
    """GPT-OSS (logits with the router's bias) and GraniteMoE (float32 logits): top-k of the
    logits, softmax over the k picks only."""
    steered = _steered(logits, plan)
    ids = _pick(steered, plan)
    top = steered.gather(1, ids)
    return torch.softmax(top, dim=-1, dtype=top.dtype).to(dtype), ids


def _dbrx(site, logits, plan, dtype):
    """DbrxFFN.route_tokens_to_experts: softmax in the logits' dtype, top-k, weights divided by
    their p-norm (moe_normalize_expert_weights) when set."""
    probs = torch.softmax(_steered(logits, plan), dim=1, dtype=logits.dtype)
    ids = _pick(probs, plan)
    top = probs.gather(1, ids)
    p = site.block.moe_normalize_expert_weights
    return (top if p is None else top / torch.norm(top, p=p, dim=-1, keepdim=True)), ids


def _phimoe(site, logits, plan, dtype):
    """PhiMoE's own sparsemixer on the steered logits (it always picks two experts)."""
    router = site.module
    sparsemixer = sys.modules[type(router).__module__].sparsemixer
    return sparsemixer(_steered(logits, plan), jitter_eps=router.router_jitter_noise, training=router.training,
                       top_k=router.top_k)


def _llama4(site, logits, plan, dtype):
    """Top-k of the logits; each pick weighted by the sigmoid of its logit (the MoE block scales
    the expert's input by it; every other expert gets weight 0)."""
    steered = _steered(logits, plan)
    ids = _pick(steered, plan)
    return torch.sigmoid(steered.gather(1, ids).float()).to(steered.dtype), ids


def _switch(site, logits, plan, dtype):
    """Top-1 of the softmax (computed in router_dtype); weight = the chosen expert's probability."""
    router = site.module
    probs = torch.softmax(_steered(logits, plan), dim=-1, dtype=router.dtype).to(router.input_dtype)
    forced = _forced(plan, probs)
    if forced is not None:
        ids = forced[:, :1]
    else:
        ids = probs.argmax(dim=-1, keepdim=True)
    return probs.gather(1, ids), ids


@dataclass(frozen=True)
class Reroute:
    """How moeviz re-runs one router class's selection.

    route:  (site, logits [tokens, experts], plan, router input dtype) -> (weights, ids) [tokens, k]
    output: where the selection goes: "tuple" = the router returns (logits, weights, ids);
            "llama4" = (scores scattered over [tokens, experts], logits); "switch" = (one-hot
            dispatch, chosen probability, logits); "experts" = the router returns logits only and
            the experts module receives (hidden, ids, weights).
    fixed_k: the router's k, for a router whose module and block do not say it.
    no_k: why k cannot change, "" when it can.
    no_force: why the router cannot take a forced expert, "" when it can.
    own_capacity: the router drops tokens over its own expert_capacity.
    """

    route: Callable
    output: str = "tuple"
    fixed_k: int | None = None
    no_k: str = ""
    no_force: str = ""
    own_capacity: bool = False


SOFTMAX_NORMALISED = Reroute(_softmax_top_k(always_normalise=True, cast=False))
SOFTMAX_CAST = Reroute(_softmax_top_k(always_normalise=False, cast=True))

REROUTES: dict[str, Reroute] = {
    "MixtralTopKRouter": SOFTMAX_NORMALISED,
    "Qwen2MoeTopKRouter": SOFTMAX_CAST,
    "Qwen3MoeTopKRouter": SOFTMAX_CAST,
    "OlmoeTopKRouter": SOFTMAX_CAST,
    "JambaTopKRouter": SOFTMAX_CAST,
    "HunYuanMoEV1Gate": Reroute(_hunyuan),
    "DeepseekV2TopkRouter": Reroute(_deepseek_v2),
    "DeepseekV3TopkRouter": Reroute(_sigmoid_grouped),
    "Glm4MoeTopkRouter": Reroute(_sigmoid_grouped),
    "GptOssTopKRouter": Reroute(_logit_top_k),
    "GraniteMoeTopKRouter": Reroute(_logit_top_k),
    "DbrxRouter": Reroute(_dbrx, output="experts"),
    "PhimoeTopKRouter": Reroute(
        _phimoe, no_k="its sparsemixer always picks exactly two experts, one after the other", no_force=(
            "its sparsemixer picks the best expert, then the best of the rest, each weighted by a softmax over the "
            "experts close to that one; a forced expert has no weight in that scheme")),
    "Llama4Router": Reroute(_llama4, output="llama4", no_k=(
        "moeviz reads Llama 4's selection as the top router.top_k of the scores it scatters over the experts, so "
        "a trace with another k would be wrong")),
    "SwitchTransformersTop1Router": Reroute(
        _switch, output="switch", fixed_k=1, own_capacity=True,
        no_k="its experts take a one-hot top-1 dispatch and its weight is the chosen expert's probability"),
}
GROUPED = ("DeepseekV3TopkRouter", "Glm4MoeTopkRouter")


# -- checking an intervention against a model ------------------------------------------------


def plan(model, intervention: Intervention) -> dict[str, tuple[RouterSite, LayerPlan, Reroute]]:
    """{router name: (site, plan, reroute)} for the MoE layers the intervention changes.
    Raises ValueError (InterventionRefused for what the family cannot do) before any forward."""
    sites = {site.layer_id: site for site in find_routers(model)}
    encoder_layers = layer_counts(model.config)[0]
    per_layer = _per_layer(intervention, list(sites))
    unknown = sorted(set(per_layer) - set(sites))
    if unknown:
        raise ValueError(
            f"Layer {', '.join(map(str, unknown))} has no MoE router: this model's MoE layers are "
            f"{', '.join(map(str, sites))} (numbered as in the trace, dense layers counted)."
        )
    if not per_layer:
        return {}
    # A trace holds one number of slots for all layers: when k differs between layers, every
    # layer is re-routed and the narrower ones fill their extra slots with weight 0.
    ks = {n: _width(model, site, per_layer.get(n, {})) for n, site in sites.items()}
    slots = max(ks.values())
    if len(set(ks.values())) > 1:
        per_layer = {n: per_layer.get(n, {}) for n in sites}
    return {
        sites[n].name: (sites[n], _layer_plan(model, sites[n], options, encoder_layers, slots), _reroute(model, sites[n]))
        for n, options in sorted(per_layer.items())
    }


def _own_k(model, site: RouterSite) -> int:
    return _reroute(model, site).fixed_k or _attribute(site, "top_k")


def _width(model, site: RouterSite, options: dict) -> int:
    """How many slots a token's selection takes at this layer: expert choice can give a token
    every expert, hash one."""
    policy = options.get("policy")
    if policy is not None and policy.name == "expert choice":
        return _attribute(site, "num_experts")
    if policy is not None and policy.name == "hash":
        return 1
    return int(options.get("top_k", _own_k(model, site)))


def _per_layer(intervention: Intervention, layer_ids: list[int]) -> dict[int, dict]:
    """{layer: {option: value}} with the every-layer options spread over all MoE layers."""
    per_layer: dict[int, dict] = {}
    for name in ("ablate", "force", "bias", "top_k", "capacity_factor", "policy"):
        value = getattr(intervention, name)
        if value is None:
            continue
        if isinstance(value, RoutingPolicy) or not isinstance(value, Mapping):
            value = dict.fromkeys(layer_ids, value)
        for layer, option in value.items():
            per_layer.setdefault(int(layer), {})[name] = option
    return per_layer


def _reroute(model, site: RouterSite) -> Reroute:
    name = type(site.module).__name__
    if name not in REROUTES:
        raise InterventionRefused(
            f"moeviz cannot re-run the routing of {name} ({model.config.model_type}): it does not know how this "
            f"router scores and selects experts. Interventions work on {', '.join(sorted(REROUTES))}."
        )
    return REROUTES[name]


def _family(model, site: RouterSite) -> str:
    return f"{model.config.model_type} ({type(site.module).__name__})"


def _layer_plan(model, site: RouterSite, options: dict, encoder_layers: int, slots: int) -> LayerPlan:
    reroute = _reroute(model, site)
    label = layer_label(site.layer_id, encoder_layers)
    num_experts = _attribute(site, "num_experts")
    own_k = _own_k(model, site)
    k = int(options.get("top_k", own_k))
    where = f"At {label} of {_family(model, site)}"
    if not 1 <= k <= num_experts:
        raise ValueError(f"{where}, top_k must lie between 1 and the {num_experts} experts; got {k}.")
    if k != own_k and reroute.no_k:
        raise InterventionRefused(f"{where}, k cannot change from {own_k}: {reroute.no_k}.")
    if type(site.module).__name__ in GROUPED:
        router = site.module
        reachable = router.topk_group * (num_experts // router.num_group)
        if k > reachable:
            raise InterventionRefused(
                f"{where}, top_k can be at most {reachable}: the router picks from its best {router.topk_group} "
                f"groups of {num_experts // router.num_group} experts; got {k}.")
    ablate = _experts(options.get("ablate", ()), num_experts, where, "ablate")
    force = _experts(options.get("force", ()), num_experts, where, "force")
    if force and reroute.no_force:
        raise InterventionRefused(f"{where}, experts cannot be forced: {reroute.no_force}.")
    if len(force) > k:
        raise ValueError(f"{where}, {len(force)} experts are forced but a token takes only k = {k}.")
    if set(force) & set(ablate):
        raise ValueError(f"{where}, expert {min(set(force) & set(ablate))} is both forced and ablated.")
    if num_experts - len(ablate) < k:
        raise ValueError(f"{where}, {len(ablate)} of {num_experts} experts are ablated, leaving fewer than the "
                         f"k = {k} each token needs.")
    capacity_factor = options.get("capacity_factor")
    if capacity_factor is not None and not (math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"{where}, capacity_factor must be a number > 0 (1.0 = the balanced share); got {capacity_factor}.")
    policy = options.get("policy")
    if policy is not None:
        k, policy = _policy_plan(model, site, options, k, where)
    return LayerPlan(label=label, k=k, num_experts=num_experts, slots=slots, ablate=ablate, force=force,
                     bias=_bias(options.get("bias"), num_experts, where), capacity_factor=capacity_factor,
                     policy=policy)


def _policy_plan(model, site: RouterSite, options: dict, k: int, where: str) -> tuple[int, RoutingPolicy]:
    """(the layer's k, the policy with its defaults filled in), or why the family cannot do it."""
    policy, reroute = options["policy"], _reroute(model, site)
    if not isinstance(policy, RoutingPolicy):
        raise ValueError(f"{where}, a policy must be a RoutingPolicy; got {policy!r}.")
    if options.get("force"):
        raise ValueError(f"{where}, {policy.name} picks every token's experts itself: it cannot take forced experts.")
    if policy.name == "expert choice":
        if options.get("capacity_factor") is not None:
            raise ValueError(f"{where}, expert choice gives every expert its own capacity C = ⌈c·T/E⌉: "
                             "set its experts per token c instead of a capacity factor.")
        if reroute.no_k or reroute.output in ("switch", "llama4"):
            why = reroute.no_k or "its experts take exactly one expert per token"
            raise InterventionRefused(f"{where}, expert choice cannot run: it gives tokens any number of experts, "
                                      f"and {why}.")
        if "top_k" in options:
            raise ValueError(f"{where}, expert choice has no k: tokens get as many experts as choose them "
                             "(set its experts per token c).")
        num_experts = _attribute(site, "num_experts")
        c = policy.experts_per_token or _own_k(model, site)
        if c > num_experts:
            raise ValueError(f"{where}, expert choice's c = {c:g} experts per token exceeds the {num_experts} experts.")
        return num_experts, replace(policy, experts_per_token=c)
    if reroute.no_force:
        raise InterventionRefused(f"{where}, {policy.name} cannot run: it fixes each token's experts and "
                                  f"{reroute.no_force}.")
    if policy.name == "bias balancing":
        return k, policy
    own_k = _own_k(model, site)
    if own_k != 1 and reroute.no_k:
        raise InterventionRefused(f"{where}, hash routing cannot run: it gives each token one expert, and "
                                  f"{reroute.no_k}.")
    if getattr(model.config, "is_encoder_decoder", False):
        raise InterventionRefused(f"{where}, hash routing cannot run: moeviz reads token ids for decoder-only "
                                  "models, and this one is an encoder-decoder.")
    extra = [name for name in ("ablate", "bias", "top_k") if options.get(name) not in (None, (), [], {})]
    if extra:
        raise ValueError(f"{where}, hash routing gives each token one expert by its id alone: it does not "
                         f"combine with {' or '.join(extra)}.")
    return 1, policy


def _attribute(site: RouterSite, name: str) -> int:
    for module in (site.module, site.block, getattr(site.block, "experts", None)):
        if getattr(module, name, None) is not None:
            return int(getattr(module, name))
    raise InterventionRefused(f"The router at {site.name} does not say its {name}.")


def _experts(experts, num_experts: int, where: str, what: str) -> tuple[int, ...]:
    experts = tuple(int(e) for e in experts)
    bad = [e for e in experts if not 0 <= e < num_experts]
    if bad:
        raise ValueError(f"{where}, cannot {what} expert {bad[0]}: experts are numbered 0 to {num_experts - 1}.")
    if len(set(experts)) != len(experts):
        raise ValueError(f"{where}, an expert is listed twice to {what}: {list(experts)}.")
    return experts


def _bias(values, num_experts: int, where: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    if isinstance(values, Mapping):
        bias = [0.0] * num_experts
        for expert in _experts(values, num_experts, where, "bias"):
            bias[expert] = float(values[expert])
    else:
        bias = [float(v) for v in values]
        if len(bias) != num_experts:
            raise ValueError(f"{where}, a bias needs one value per expert ({num_experts}); got {len(bias)}.")
    if not all(math.isfinite(b) for b in bias):
        raise ValueError(f"{where}, a bias must be finite; to remove an expert, ablate it.")
    return tuple(bias)


# -- hooks -------------------------------------------------------------------------------------


@dataclass
class _Call:
    """One call's state: what its hooks hand each other, and the model's output logits."""

    router_logits: dict = field(default_factory=dict)
    output_logits: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None  # the forward pass's token ids, flattened (hash routing)


_active_call: ContextVar[_Call | None] = ContextVar("moeviz_intervention", default=None)


@contextmanager
def intervening(model, intervention: Intervention) -> Iterator[_Call]:
    """Run `model` with `intervention` inside the block, in this thread only. Yields the call's
    state, whose `output_logits` holds the last forward pass's logits [batch, positions, vocab].
    The intervention is checked before any hook is installed."""
    plans = plan(model, intervention)
    call = _Call()
    handles = []
    try:
        handles.append(model.register_forward_hook(_output_recorder(call)))
        handles.append(model.register_forward_pre_hook(_input_recorder(call), with_kwargs=True))
        for site, layer_plan, reroute in plans.values():
            handles.append(site.module.register_forward_hook(_router_hook(site, layer_plan, reroute, call), prepend=True))
            if reroute.output == "experts":
                handles.append(site.block.get_submodule("experts").register_forward_pre_hook(
                    _experts_hook(site, layer_plan, reroute, call), prepend=True))
        token = _active_call.set(call)
        try:
            yield call
        finally:
            _active_call.reset(token)
    finally:
        for handle in handles:
            handle.remove()


def _output_recorder(call: _Call):
    def hook(module, args, output):
        if _active_call.get() is call:
            call.output_logits = output.logits.detach()

    return hook


def _input_recorder(call: _Call):
    def hook(module, args, kwargs):
        if _active_call.get() is call:
            ids = kwargs.get("input_ids", args[0] if args else None)
            call.input_ids = None if ids is None else ids.reshape(-1)

    return hook


def _router_hook(site: RouterSite, plan: LayerPlan, reroute: Reroute, call: _Call):
    def hook(module, args, output):
        if _active_call.get() is not call:
            return None  # another call's forward pass on the same shared model
        if reroute.output == "experts":
            call.router_logits[site.name] = output
            return None
        logits = output[{"tuple": 0, "llama4": 1, "switch": 2}[reroute.output]]
        weights, ids, kept = _select(site, plan, reroute, logits, args[0].dtype, call)
        if reroute.output == "tuple":
            return (output[0], _drop(weights, kept), ids, *output[3:])
        if reroute.output == "llama4":
            scores = torch.zeros_like(output[0]).scatter_(1, ids, _drop(weights, kept))
            return scores, output[1]
        dispatch = torch.nn.functional.one_hot(ids[:, 0], plan.num_experts) * kept
        return dispatch.reshape(output[0].shape), weights.reshape(output[1].shape), output[2]

    return hook


def _experts_hook(site: RouterSite, plan: LayerPlan, reroute: Reroute, call: _Call):
    def hook(module, args):
        if _active_call.get() is not call:
            return None
        logits = call.router_logits.pop(site.name)
        weights, ids, kept = _select(site, plan, reroute, logits, args[0].dtype, call)
        return (args[0], ids, _drop(weights, kept), *args[3:])

    return hook


def _select(site, plan: LayerPlan, reroute: Reroute, logits: torch.Tensor, dtype, call: _Call):
    """(weights, ids, kept): the family's selection under the plan; kept bool[tokens, k] is
    False where an expert over capacity turns the token away (None: no capacity)."""
    flat = logits.reshape(-1, logits.shape[-1])
    if plan.policy is None:
        weights, ids = reroute.route(site, flat, plan, dtype)
    else:
        weights, ids = _policy_route(site, plan, reroute, flat, dtype, call)
    expert_choice = plan.policy is not None and plan.policy.name == "expert choice"  # lists all, weight 0 if not chosen
    if plan.ablate and not expert_choice and torch.isin(ids, torch.tensor(plan.ablate, device=ids.device)).any():
        raise ValueError(
            f"At {plan.label}, the router could not fill its {plan.k} slots without an ablated expert: its groups "
            "left too few others. Ablate fewer experts there."
        )
    capacity = None
    if plan.capacity_factor is not None:
        capacity = expert_capacity(flat.shape[0], plan.num_experts, plan.k, plan.capacity_factor)
    elif reroute.own_capacity:
        capacity = site.module.expert_capacity
    kept = None if capacity is None else _within_capacity(ids, weights, capacity, plan.num_experts)
    padded_kept = None if kept is None else _padded(kept, ids, plan)[0]
    return (*_padded(weights, ids, plan), padded_kept)


def _policy_route(site, plan: LayerPlan, reroute: Reroute, logits: torch.Tensor, dtype, call: _Call):
    """(weights, ids) [tokens, k] as the plan's policy routes this forward pass's tokens."""
    policy = plan.policy
    if policy.name == "hash":
        if call.input_ids is None or call.input_ids.numel() != logits.shape[0]:
            raise InterventionRefused(f"At {plan.label}, hash routing needs the token id of every token the router "
                                      "sees, and this forward pass did not pass them as input_ids.")
        chosen = policies.hash_routing(call.input_ids.cpu().numpy(), plan.num_experts, policy.hash_method).expert_ids
        return reroute.route(site, logits, replace(plan, token_force=_on(chosen, logits).long()), dtype)
    scores = _scores(site, logits, plan)
    allowed = np.array([e for e in range(plan.num_experts) if e not in plan.ablate])
    if policy.name == "bias balancing":
        chosen = policies.bias_balancing(scores[:, allowed], plan.k, policy.update_speed, policy.chunk_size).expert_ids
        return reroute.route(site, logits, replace(plan, token_force=_on(allowed[chosen], logits).long()), dtype)
    tokens = scores.shape[0]
    capacity = min(tokens, expert_capacity(tokens, plan.num_experts, policy.experts_per_token, 1.0, min_capacity=1))
    picked = policies.expert_choice(scores[:, allowed], capacity)
    # Every expert in every slot: the ones that chose the token first, by weight, then the others at weight 0.
    dense = np.zeros((tokens, plan.num_experts), dtype=np.float32)
    rows, slots = np.nonzero(picked.expert_ids >= 0)
    dense[rows, allowed[picked.expert_ids[rows, slots]]] = picked.weights[rows, slots]
    chosen = np.zeros(dense.shape, dtype=bool)
    chosen[rows, allowed[picked.expert_ids[rows, slots]]] = True
    ids = np.argsort(np.where(chosen, -dense, np.inf), axis=1, kind="stable")
    own_dtype = reroute.route(site, logits[:1], replace(plan, k=1, force=(), policy=None), dtype)[0].dtype
    return _on(np.take_along_axis(dense, ids, axis=1), logits).to(own_dtype), _on(ids, logits).long()


def _scores(site, logits: torch.Tensor, plan: LayerPlan) -> np.ndarray:
    """float64[tokens, experts]: the family's scores after the plan's bias, as the trace shows
    them (softmax, or sigmoid for DeepSeek-V3 / GLM-4.5 / Llama 4)."""
    steered = _steered(logits, plan, ablate=False).double()
    sigmoid = type(site.module).__name__ in (*GROUPED, "Llama4Router")
    return (steered.sigmoid() if sigmoid else steered.softmax(dim=-1)).cpu().numpy()


def _on(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values)).to(like.device)


def _padded(values: torch.Tensor, ids: torch.Tensor, plan: LayerPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) widened to `plan.slots`: the extra slots hold the lowest-numbered experts not
    selected, with value 0 (False for a mask), so they add nothing to the token's output."""
    extra = plan.slots - ids.shape[1]
    if extra == 0:
        return values, ids
    free = torch.ones(ids.shape[0], plan.num_experts, device=ids.device).scatter_(1, ids, 0)
    lowest_first = free * torch.arange(free.shape[1], 0, -1, device=ids.device)
    filler = torch.topk(lowest_first, extra, dim=-1).indices
    return torch.cat([values, values.new_zeros(values.shape[0], extra)], 1), torch.cat([ids, filler], 1)


def _within_capacity(ids: torch.Tensor, weights: torch.Tensor, capacity: int, num_experts: int) -> torch.Tensor:
    """bool[tokens, k]: the assignments each expert keeps when it takes `capacity` of them, by
    the Routing lab's rule (each token's picks ranked by weight, first choices queueing first)."""
    rank = torch.argsort(-weights.float(), dim=-1, stable=True)
    ranked = policies.Assignment(
        policy="forward", num_experts=num_experts,
        expert_ids=ids.gather(1, rank).cpu().numpy().astype(np.int32),
        weights=weights.gather(1, rank).float().cpu().numpy(),
        dropped=np.zeros(tuple(ids.shape), dtype=bool),
    )
    kept_ranked = torch.from_numpy(~policies.limit_capacity(ranked, capacity).dropped).to(ids.device)
    return torch.empty_like(kept_ranked).scatter_(1, rank, kept_ranked)


def _drop(weights: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    return weights if kept is None else weights.masked_fill(~kept, 0)


# -- one text, before and after -----------------------------------------------------------------


@dataclass(frozen=True)
class Predictions:
    """What the model predicts after each position but the last, T − 1 of them.

    logprobs:     float32[T − 1]      log-probability of the actual next token
    top_tokens:   list[list[str]]     the likeliest next tokens after each position, best first
    top_logprobs: float32[T − 1, n]   their log-probabilities
    """

    logprobs: np.ndarray
    top_tokens: list[list[str]]
    top_logprobs: np.ndarray


@dataclass(frozen=True)
class InterventionResult:
    """One text run twice: as the model routes it, and with `intervention`. Both traces hold the
    same tokens; `changed` is the routing the intervened model really used."""

    intervention: Intervention
    baseline: RoutingTrace
    changed: RoutingTrace
    baseline_predictions: Predictions
    changed_predictions: Predictions
    baseline_continuation: str = ""
    changed_continuation: str = ""

    @property
    def baseline_logprobs(self) -> np.ndarray:
        """float32[T − 1]: log-probability of each actual next token, as the model routes."""
        return self.baseline_predictions.logprobs

    @property
    def changed_logprobs(self) -> np.ndarray:
        """float32[T − 1]: the same, with the intervention."""
        return self.changed_predictions.logprobs


def run_intervention(
    model, tokenizer, text: str, intervention: Intervention, *, model_id: str = "",
    max_tokens: int = DEFAULT_MAX_TOKENS, continuation_tokens: int = 0,
) -> InterventionResult:
    """`text` through `model` without and with `intervention`. With `continuation_tokens`, the
    model also continues the text greedily, both ways (decoder-only models)."""
    plan(model, intervention)  # refuse before running anything
    baseline, baseline_predictions = traced_predictions(model, tokenizer, text, Intervention(), model_id=model_id,
                                                        max_tokens=max_tokens)
    changed, changed_predictions = traced_predictions(model, tokenizer, text, intervention, model_id=model_id,
                                                      max_tokens=max_tokens)
    continuations = ("", "")
    if continuation_tokens:
        ids = tokenize(tokenizer, text, max_tokens).ids
        continuations = tuple(greedy_continuation(model, tokenizer, ids, how, continuation_tokens)
                              for how in (Intervention(), intervention))
    return InterventionResult(intervention, baseline, changed, baseline_predictions, changed_predictions, *continuations)


def traced_predictions(model, tokenizer, text: str, intervention: Intervention = Intervention(), *, model_id: str = "",
                       max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[RoutingTrace, Predictions]:
    """The routing of `text` through `model` with `intervention` (none by default), and what the
    model predicts after each of its tokens."""
    with intervening(model, intervention) as call:
        trace = trace_text(model, tokenizer, text, model_id=model_id, max_tokens=max_tokens, all_logits=True)
    logits = call.output_logits[0]
    # A decoder-only model predicts token t + 1 at position t; an encoder-decoder one (its decoder
    # reads the start token, then the text) at decoder position t + 1.
    offset = 1 if getattr(model.config, "is_encoder_decoder", False) else 0
    return trace, _predictions(tokenizer, logits[offset:offset + trace.num_tokens - 1], trace.token_ids[1:])


def _predictions(tokenizer, logits: torch.Tensor, next_ids: list[int]) -> Predictions:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    actual = logprobs.gather(1, torch.tensor(next_ids, dtype=torch.long, device=logprobs.device).reshape(-1, 1))[:, 0]
    top = torch.topk(logprobs, min(TOP_PREDICTIONS, logprobs.shape[-1]), dim=-1)
    top_ids = top.indices.cpu().tolist()
    return Predictions(
        logprobs=actual.cpu().numpy().astype(np.float32),
        top_tokens=[token_strings(tokenizer, ids) for ids in top_ids],
        top_logprobs=top.values.cpu().numpy().astype(np.float32),
    )


def greedy_continuation(model, tokenizer, ids: list[int], intervention: Intervention, new_tokens: int) -> str:
    """The text a decoder-only model writes after `ids`, always taking its likeliest token. Each
    step re-reads the whole sequence (no KV cache), so that a capacity counts all its tokens."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("Greedy continuation is for decoder-only models; this one is an encoder-decoder.")
    device = next(model.parameters()).device
    ids = list(ids)
    written = []
    eos = model.config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) - {None}
    with intervening(model, intervention) as call, torch.inference_mode():
        for _ in range(new_tokens):
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            token = int(call.output_logits[0, -1].argmax())
            if token in stop:
                break
            ids.append(token)
            written.append(token)
    return tokenizer.decode(written)
