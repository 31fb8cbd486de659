"""Routing metrics: pure numpy functions of a RoutingTrace.

Load, router entropy, the auxiliary balance loss, capacity drops, adjacent-token repeat rates,
co-activation, cross-layer transitions and Jensen-Shannon divergence between loads.

Sources: GShard (Lepikhin et al. 2020, arXiv:2006.16668), Switch Transformers (Fedus et al.
2021, arXiv:2101.03961), Mixtral of Experts (Jiang et al. 2024, arXiv:2401.04088, Sec. 5), and
transformers' `load_balancing_loss_func`. Every function assumes, as every top-k router
guarantees, that a token's k experts are distinct. `router_entropy` and `balance_loss` need
router scores, so they raise `IdsOnlyError` for a trace of expert ids only (from a serving
engine) and `UnknownScoringError` for a trace whose scoring is unknown; everything else is
counted from the ids.

Every function counts all the tokens of the trace it is given. Special tokens (BOS, EOS, PAD)
are routed alike in every text, so statistics usually leave them out: pass `counted(trace)`,
and for repeat rates the whole trace with `include_special=False` (see `counted_pairs`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from moeviz.trace import RoutingTrace

# -- which tokens count -------------------------------------------------------------------


def counted_tokens(trace: RoutingTrace, include_special: bool = False) -> np.ndarray:
    """bool[tokens]: the tokens statistics count: all, or all but `trace.special` ones."""
    return np.ones(trace.num_tokens, dtype=bool) if include_special else ~trace.special


def counted(trace: RoutingTrace, include_special: bool = False) -> RoutingTrace:
    """The trace restricted to its `counted_tokens` (the trace itself when all count).

    Not for repeat rates: a special token removed from the middle of a text would make its
    neighbours look adjacent. Use `repeat_rates(trace, include_special)` on the whole trace.
    """
    return restrict(trace, counted_tokens(trace, include_special))


def restrict(trace: RoutingTrace, keep: ArrayLike) -> RoutingTrace:
    """The trace of the tokens `keep` bool[tokens] marks, in order: arrays, tokens, ids and
    offsets cut to them, `text` whole, `generated_from` and `input_token_count` re-counted."""
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (trace.num_tokens,):
        raise ValueError(f"keep has shape {keep.shape}; expected one flag per token ({trace.num_tokens},)")
    if keep.all():
        return trace
    kept = np.flatnonzero(keep)
    generated_from = int(keep[: trace.generated_from].sum()) if trace.generated else -1
    return dataclasses.replace(
        trace,
        tokens=[trace.tokens[i] for i in kept],
        token_ids=[trace.token_ids[i] for i in kept],
        offsets=[trace.offsets[i] for i in kept],
        topk_ids=trace.topk_ids[:, keep],
        topk_weights=None if trace.topk_weights is None else trace.topk_weights[:, keep],
        router_logits=None if trace.router_logits is None else trace.router_logits[:, keep],
        input_token_count=trace.input_token_count - int((~keep).sum()),
        generated_from=generated_from if generated_from < kept.size else -1,
    )


def counted_pairs(trace: RoutingTrace, include_special: bool = False) -> np.ndarray:
    """bool[tokens - 1]: the adjacent pairs (t, t+1) repeat rates count: both tokens counted.

    A pair is never formed across a left-out token: in "a </s> b" neither (a, </s>),
    (</s>, b) nor (a, b) counts, since the model never saw a and b side by side.
    """
    keep = counted_tokens(trace, include_special)
    return keep[:-1] & keep[1:]


# -- load and router scores --------------------------------------------------------------


def expert_load(trace: RoutingTrace, choices: int | None = None) -> np.ndarray:
    """float[layers, experts]: share of tokens that have expert e among their first `choices`
    picks (default: all k).

    load[l, e] = #{t : e in topk_ids[l, t, :choices]} / T, so each row sums to `choices`;
    `uniform_load` is the value every expert would get under perfect balance.
    """
    choices = _checked_choices(trace, choices)
    _require_tokens(trace, 1)
    return load_from_ids(trace.topk_ids[..., :choices], trace.num_experts)


def load_from_ids(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """float[layers, experts]: `expert_load` of topk_ids int[layers, tokens, c] (c >= 1 picks
    per token, e.g. all tokens of a corpus laid end to end): share of tokens with expert e
    among their picks."""
    if topk_ids.shape[1] == 0:
        raise ValueError("need at least 1 token to compute a load, got none")
    return _expert_counts(topk_ids, num_experts) / topk_ids.shape[1]


def uniform_load(trace: RoutingTrace, choices: int | None = None) -> float:
    """The `expert_load` of every expert under perfect balance: choices / E."""
    return _checked_choices(trace, choices) / trace.num_experts


def router_entropy(trace: RoutingTrace) -> np.ndarray:
    """float[layers, tokens]: Shannon entropy in bits of each token's router distribution.

    H = -sum_e p_e log2 p_e (0 log 0 = 0), p = `trace.router_probs` normalised to sum 1 (a no-op
    for softmax; for sigmoid scoring it turns independent scores into a distribution).
    0 for a router certain of one expert, log2(E) for a uniform one.
    """
    probs = _routing_distribution(trace)
    terms = np.log2(probs, out=np.zeros_like(probs), where=probs > 0)
    terms *= probs  # in place: traces reach 60 layers × 2,048 tokens × 256 experts
    return -terms.sum(axis=-1, dtype=np.float64)


def balance_loss(trace: RoutingTrace) -> np.ndarray:
    """float[layers]: the Switch/GShard auxiliary load-balancing loss, per layer, unscaled by α.

    loss = E · sum_i f_i · P_i  (Switch Transformers, eq. 4; GShard, top-2)
      f_i = share of tokens with expert i among their top-k (`expert_load`, so sum_i f_i = k)
      P_i = mean over tokens of the router probability of expert i (`router_probs`; sigmoid
            scores are normalised per token first, as in DeepSeek-V3's sequence-wise loss)
    A perfectly balanced layer (f_i = k/E, P_i = 1/E) scores k, as in transformers'
    `load_balancing_loss_func` (2.0 for a balanced top-2 Mixtral), which pools all layers
    into one number where this gives one per layer. At most E (f_i <= 1 and sum_i P_i = 1),
    reached when all tokens pick the same experts and the router is sure of one of them.
    """
    fraction = expert_load(trace)
    mean_prob = _routing_distribution(trace).mean(axis=1, dtype=np.float64)
    return trace.num_experts * (fraction * mean_prob).sum(axis=-1)


# -- capacity ----------------------------------------------------------------------------


MIN_CAPACITY = 4  # DeepSpeed's default min_capacity (deepspeed.moe.layer.MoE)


def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int = MIN_CAPACITY
) -> int:
    """Assignments one expert may take: C = max(⌈α · k · T / E⌉, min_capacity).

    Sized as DeepSpeed sizes it (deepspeed/moe/sharded_moe.py, `_capacity`, which `top1gating`,
    `top2gating` and `topkgating` call with α · k): the capacity factor α times an expert's
    share of the k·T assignments under perfect balance (GShard Sec. 2.2; Switch Transformers
    eq. 3, k = 1), rounded up, and never below `min_capacity` (4, DeepSpeed's default). The
    papers' C = floor(α · k · T / E) is 0 whenever α·k·T < E: a 20-token text on a 256-expert
    top-8 model would drop every assignment at α = 1.25, where DeepSpeed keeps 4 per expert.
    """
    if capacity_factor <= 0:
        raise ValueError(
            f"capacity_factor must be > 0 (1.0 = exactly the balanced share), got {capacity_factor}"
        )
    if min_capacity < 0:
        raise ValueError(f"min_capacity must be >= 0 assignments per expert, got {min_capacity}")
    balanced = round(capacity_factor * top_k * num_tokens / num_experts, 9)  # 1.1·1·90/3 is 33.00000000000001
    return max(math.ceil(balanced), min_capacity)


def trace_capacity(trace: RoutingTrace, capacity_factor: float, min_capacity: int = MIN_CAPACITY) -> int:
    """`expert_capacity` C of every layer of `trace`: its T tokens, E experts and top-k."""
    return expert_capacity(trace.num_tokens, trace.num_experts, trace.top_k, capacity_factor, min_capacity)


def capacity_drops(trace: RoutingTrace, capacity_factor: float, min_capacity: int = MIN_CAPACITY) -> np.ndarray:
    """int[layers, experts]: assignments each expert drops when it can take only C
    (`expert_capacity`).

    Switch-style dropping keeps the first C assignments an expert receives in token order and
    drops the rest, so whatever the order: dropped_e = max(count_e - C, 0).
    """
    counts = _expert_counts(trace.topk_ids, trace.num_experts)
    return np.maximum(counts - trace_capacity(trace, capacity_factor, min_capacity), 0)


def dropped_token_share(trace: RoutingTrace, capacity_factor: float, min_capacity: int = MIN_CAPACITY) -> np.ndarray:
    """float[layers]: share of tokens with at least one assignment dropped at capacity C
    (`expert_capacity`).

    Assignments are queued choice by choice, as GShard (Algorithm 1) and V-MoE dispatch them:
    every token's first choice in token order t = 0..T-1, then every second choice, and so on;
    an assignment is dropped when its place in its expert's queue is >= C (Switch Transformers,
    Sec. 2.2: overflow tokens skip the expert). For k = 1 this is plain token order.
    """
    _require_tokens(trace, 1)
    capacity = trace_capacity(trace, capacity_factor, min_capacity)
    dropped = _queue_positions(trace.topk_ids, trace.num_experts) >= capacity
    return dropped.any(axis=-1).mean(axis=-1)


# -- adjacent-token repeats (Mixtral paper, Table 5) --------------------------------------


@dataclass(frozen=True, eq=False)
class RepeatRates:
    """How often adjacent tokens t, t+1 reuse an expert, per layer: three float[layers].

    same_first:    first choice of t+1 == first choice of t
    first_in_topk: first choice of t+1 is among the top-k of t
    any_shared:    the top-k sets of t and t+1 share at least one expert
    """

    same_first: np.ndarray
    first_in_topk: np.ndarray
    any_shared: np.ndarray


def repeat_rates(trace: RoutingTrace, include_special: bool = True) -> RepeatRates:
    """Share of the T-1 adjacent token pairs (t, t+1) that repeat an expert, per layer; with
    `include_special=False`, of the `counted_pairs` only (no pair touches a special token).

    Mixtral of Experts, Sec. 5, Table 5: its "first choice" column is `same_first`, its
    "first or second choice" column (chance 46% for top-2 of 8) is `any_shared`.
    """
    _require_tokens(trace, 2)
    return repeat_rates_from_ids(trace.topk_ids, None if include_special else counted_pairs(trace, False))


def repeat_rates_from_ids(topk_ids: np.ndarray, counted: np.ndarray | None = None) -> RepeatRates:
    """`repeat_rates` of topk_ids int[layers, tokens, k], over the adjacent pairs (t, t+1) that
    `counted` bool[tokens - 1] marks (default: all). When several documents are laid end to
    end, counting only pairs within a document keeps boundaries from adding repeats."""
    before, after = topk_ids[:, :-1, :], topk_ids[:, 1:, :]
    if counted is not None:
        counted = np.asarray(counted, dtype=bool)
        if counted.shape != (before.shape[1],):
            raise ValueError(
                f"counted has shape {counted.shape}; expected one flag per adjacent pair ({before.shape[1]},)"
            )
        before, after = before[:, counted], after[:, counted]
    if before.shape[1] == 0:
        raise ValueError("need at least one pair of adjacent tokens to compute repeat rates, got none")
    first_before, first_after = before[..., 0], after[..., 0]
    shared = before[..., :, None] == after[..., None, :]
    return RepeatRates(
        same_first=(first_after == first_before).mean(axis=-1),
        first_in_topk=(before == first_after[..., None]).any(axis=-1).mean(axis=-1),
        any_shared=shared.any(axis=(-2, -1)).mean(axis=-1),
    )


def repeat_chance(trace: RoutingTrace) -> RepeatRates:
    """`repeat_rates` expected if every token drew its k experts uniformly and independently.

    same_first = 1/E;  first_in_topk = k/E;  any_shared = 1 - C(E-k, k) / C(E, k)
    (for Mixtral, E = 8, k = 2: 12.5% and 1 - 15/28 = 46%, the paper's chance levels).
    """
    return repeat_chance_for(trace.num_experts, trace.top_k, len(trace.layer_ids))


def repeat_chance_for(experts: int, k: int, layers: int) -> RepeatRates:
    """`repeat_chance` for `layers` layers of `experts` experts with `k` picks per token."""
    return RepeatRates(
        same_first=np.full(layers, 1 / experts),
        first_in_topk=np.full(layers, k / experts),
        any_shared=np.full(layers, 1 - math.comb(experts - k, k) / math.comb(experts, k)),
    )


def marginal_repeat_chance(trace: RoutingTrace) -> np.ndarray:
    """float[layers]: the `same_first` rate expected if tokens were independent but kept the
    observed first-choice load: sum_e q_e², q = `expert_load(trace, 1)`.

    A same_first rate above it means adjacent tokens agree more than load skew alone explains.
    """
    _require_tokens(trace, 2)
    return (expert_load(trace, 1) ** 2).sum(axis=-1)


# -- expert pairs ------------------------------------------------------------------------


def coactivation(trace: RoutingTrace, layer_index: int) -> np.ndarray:
    """int[experts, experts]: C[i, j] = tokens with both i and j among their top-k (i != j);
    C[i, i] = tokens that selected i. Symmetric.

    `layer_index` is the position in the trace's arrays (`trace.layer_index(layer_id)`).
    """
    _check_layer_index(trace, layer_index, "layer_index")
    ids = trace.topk_ids[layer_index].astype(np.int64)
    pairs = ids[:, :, None] * trace.num_experts + ids[:, None, :]
    return _pair_counts(pairs, trace.num_experts)


def layer_transitions(trace: RoutingTrace, from_index: int, to_index: int) -> np.ndarray:
    """int[experts, experts]: M[a, b] = tokens whose first choice is a at layer position
    `from_index` and b at `to_index`. Sums to T."""
    _check_layer_index(trace, from_index, "from_index")
    _check_layer_index(trace, to_index, "to_index")
    first = trace.first_choice.astype(np.int64)
    return _pair_counts(first[from_index] * trace.num_experts + first[to_index], trace.num_experts)


def transition_concentration(transitions: ArrayLike) -> tuple[float, float]:
    """How much a token's first choice at one layer tells about its first choice at another,
    from a `layer_transitions` matrix M int[experts, experts] (rows: the earlier layer).

    Returns (concentration, floor):
      concentration = sum_a max_b M[a, b] / sum M: the share of tokens that go where most
                      tokens of their earlier expert go; 1 when each earlier expert sends all
                      its tokens to one later expert;
      floor         = max_b sum_a M[a, b] / sum M: the later layer's largest first-choice
                      share, which concentration reaches when the earlier choice tells nothing.
    Expert ids of two layers name unrelated networks, so neither number compares them.
    """
    matrix = np.asarray(transitions, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.sum() <= 0:
        raise ValueError(f"transitions must be a non-empty [experts, experts] count matrix, got shape {matrix.shape}")
    total = matrix.sum()
    return float(matrix.max(axis=1).sum() / total), float(matrix.sum(axis=0).max() / total)


# -- comparing loads ---------------------------------------------------------------------


def js_divergence(p: ArrayLike, q: ArrayLike) -> float:
    """Jensen-Shannon divergence in bits between two non-negative vectors float[n], each
    normalised to sum 1 first: JS = ½ KL(p‖m) + ½ KL(q‖m), m = ½(p + q), with base-2 logs and
    0·log 0 = 0 (Lin 1991). 0 for proportional vectors, 1 for disjoint supports.
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"js_divergence needs two vectors of the same shape, got {p.shape} and {q.shape}")
    p, q = _as_distribution(p, "p"), _as_distribution(q, "q")
    mean = (p + q) / 2
    divergence = (_kl_bits(p, mean) + _kl_bits(q, mean)) / 2
    return float(np.clip(divergence, 0.0, 1.0))  # rounding can step just outside [0, 1]


def load_js_matrix(loads: list[ArrayLike]) -> np.ndarray:
    """float[n, n]: D[i, j] = js_divergence(loads[i], loads[j]) for n loads float[experts].
    Symmetric with a zero diagonal."""
    count = len(loads)
    matrix = np.zeros((count, count))
    for i in range(count):
        for j in range(i + 1, count):
            matrix[i, j] = matrix[j, i] = js_divergence(loads[i], loads[j])
    return matrix


# -- helpers -----------------------------------------------------------------------------


def _expert_counts(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """int[layers, experts]: assignments per expert, from topk_ids int[layers, tokens, c]."""
    layers = topk_ids.shape[0]
    keys = np.arange(layers)[:, None, None] * num_experts + topk_ids
    return np.bincount(keys.ravel(), minlength=layers * num_experts).reshape(layers, num_experts)


def _queue_positions(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """int[layers, tokens, k]: how many assignments the same expert received earlier in the same
    layer, in (slot, token) order: all first choices before any second choice."""
    layers = topk_ids.shape[0]
    by_choice = topk_ids.transpose(0, 2, 1)  # [layers, k, tokens]
    keys = (np.arange(layers)[:, None, None] * num_experts + by_choice).ravel()
    return places_in_queue(keys, layers * num_experts).reshape(by_choice.shape).transpose(0, 2, 1)


def places_in_queue(keys: np.ndarray, num_keys: int) -> np.ndarray:
    """int[n]: for a sequence of queue keys int[n] (e.g. expert ids) in arrival order, how many
    earlier entries have the same key. A stable sort groups each key's entries in order; the
    place within the group is the answer."""
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(keys, minlength=num_keys)
    group_start = np.cumsum(counts) - counts
    places = np.empty(keys.size, dtype=np.int64)
    places[order] = np.arange(keys.size) - group_start[keys[order]]
    return places


def _pair_counts(keys: np.ndarray, num_experts: int) -> np.ndarray:
    """int[experts, experts] histogram of flat pair keys a · E + b."""
    return np.bincount(keys.ravel(), minlength=num_experts**2).reshape(num_experts, num_experts)


def _routing_distribution(trace: RoutingTrace) -> np.ndarray:
    """float32[layers, tokens, experts]: router scores normalised to sum 1 per token."""
    probs = trace.router_probs
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def _as_distribution(vector: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(vector).all() or (vector < 0).any():
        raise ValueError(f"{name} has negative or non-finite entries; pass loads or counts (>= 0)")
    total = vector.sum()
    if total == 0:
        raise ValueError(f"{name} is all zeros, so it cannot be normalised to a distribution")
    return vector / total


def _kl_bits(p: np.ndarray, m: np.ndarray) -> float:
    """KL(p‖m) in bits, skipping p = 0 terms; m > 0 wherever p > 0."""
    support = p > 0
    return float((p[support] * np.log2(p[support] / m[support])).sum())


def _checked_choices(trace: RoutingTrace, choices: int | None) -> int:
    if choices is None:
        return trace.top_k
    if not 1 <= choices <= trace.top_k:
        raise ValueError(
            f"choices must be between 1 and top_k = {trace.top_k} (picks per token), got {choices}"
        )
    return choices


def _check_layer_index(trace: RoutingTrace, index: int, name: str) -> None:
    layers = len(trace.layer_ids)
    if not 0 <= index < layers:
        raise ValueError(
            f"{name} {index} is out of range: this trace has {layers} MoE layers, so use "
            f"0..{layers - 1} (a position in the arrays, not a layer id; "
            "trace.layer_index(layer_id) converts)"
        )


def _require_tokens(trace: RoutingTrace, minimum: int) -> None:
    if trace.num_tokens < minimum:
        noun = "token" if minimum == 1 else "tokens"
        raise ValueError(
            f"need at least {minimum} {noun}, this trace has {trace.num_tokens}; "
            "trace a longer text"
        )
