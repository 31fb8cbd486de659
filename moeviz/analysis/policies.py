"""Routing policies replayed on captured router scores: what other routers would have done.

Each policy is a pure function of one layer's router scores (`layer_scores`: float[tokens,
experts], the model's own scoring function applied to its router logits) and, for hash
routing, the token ids. It returns an `Assignment`. Only the routing decision is replayed:
the model's outputs, and the hidden states later layers see, stay those of its own routing.

Sources: Switch Transformers (Fedus et al. 2021, arXiv:2101.03961), GShard (Lepikhin et al.
2020, arXiv:2006.16668), Mixtral of Experts (Jiang et al. 2024, arXiv:2401.04088), V-MoE's
batch prioritized routing (Riquelme et al. 2021, arXiv:2106.05974), expert choice (Zhou et
al. 2022, arXiv:2202.09368), hash layers (Roller et al. 2021, arXiv:2106.04426),
auxiliary-loss-free balancing (Wang et al. 2024, arXiv:2408.15664; DeepSeek-V3 report,
arXiv:2412.19437, Sec. 2.1.2), and the coefficient of variation of load as an imbalance
measure (Shazeer et al. 2017, arXiv:1701.06538).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import ArrayLike

from moeviz.analysis.metrics import MIN_CAPACITY, expert_capacity, places_in_queue
from moeviz.trace import RoutingTrace

HASH_METHODS = ("modulo", "random")


@dataclass(frozen=True, eq=False)
class Assignment:
    """Which experts one routing policy gives each token of one layer.

    expert_ids: int32[tokens, slots]    experts the policy selected, -1 in empty slots
    weights:    float32[tokens, slots]  mixing weights as applied: 0 in empty and dropped slots
    dropped:    bool[tokens, slots]     selected, but turned away by an expert already full

    A token's selected experts are ordered by the policy's preference, highest first; a
    dropped slot keeps its place. Expert choice gives tokens different numbers of experts, so
    slots can stay empty.
    `capacity` is C for policies that cap each expert; `bias` the final per-expert bias of
    bias balancing.
    """

    policy: str
    num_experts: int
    expert_ids: np.ndarray
    weights: np.ndarray
    dropped: np.ndarray
    params: dict = field(default_factory=dict)
    capacity: int | None = None
    bias: np.ndarray | None = None

    def __post_init__(self):
        shape = self.expert_ids.shape
        if len(shape) != 2 or self.weights.shape != shape or self.dropped.shape != shape:
            raise ValueError(
                f"expert_ids, weights and dropped must share one shape [tokens, slots]; got "
                f"{shape}, {self.weights.shape} and {self.dropped.shape}"
            )
        if self.expert_ids.size and not (-1 <= self.expert_ids.min() and self.expert_ids.max() < self.num_experts):
            raise ValueError(f"expert_ids must lie in [0, {self.num_experts}) or be -1 for an empty slot")
        empty = self.expert_ids < 0
        if (self.weights[empty] != 0).any() or self.dropped[empty].any():
            raise ValueError("an empty slot (expert -1) must have weight 0 and cannot be dropped")

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def routed(self) -> np.ndarray:
        """bool[tokens, slots]: the slots whose expert really processes the token."""
        return (self.expert_ids >= 0) & ~self.dropped

    @property
    def label(self) -> str:
        """The policy and its parameters, as the page names it."""
        if not self.params:
            return self.policy
        return f"{self.policy} ({', '.join(f'{k} = {v}' for k, v in self.params.items())})"


# -- from a trace ------------------------------------------------------------------------


def layer_scores(trace: RoutingTrace, layer_id: int) -> np.ndarray:
    """float[tokens, experts]: the router scores of decoder layer `layer_id`, with the model's
    own scoring function (softmax probabilities, or sigmoid scores for DeepSeek-V3-like
    routers), which every policy here selects from."""
    return trace.router_probs[trace.layer_index(layer_id)].astype(np.float64)


def model_routing(trace: RoutingTrace, layer_id: int) -> Assignment:
    """The routing the model really used at `layer_id`, as captured: nothing dropped."""
    index = trace.layer_index(layer_id)
    ids = trace.topk_ids[index].astype(np.int32)
    return Assignment(
        policy=f"model (top-{trace.top_k})",
        num_experts=trace.num_experts,
        expert_ids=ids,
        weights=trace.topk_weights[index].astype(np.float32),
        dropped=np.zeros(ids.shape, dtype=bool),
    )


# -- token choice --------------------------------------------------------------------------


def top_k(scores: ArrayLike, k: int) -> Assignment:
    """Each token takes its k highest-scoring experts (ties: the lower expert id).

    Weights, as the sources define them:
      k = 1: the gate score itself, y = p_i(x) · E_i(x) (Switch Transformers, eq. 2), so the
             weight keeps the router's confidence;
      k > 1: the k scores renormalised to sum 1, g_i = s_i / sum_{j in top-k} s_j. For softmax
             scores this is Mixtral's softmax over the top-k logits (Mixtral, eq. 2) and
             GShard's g1 / (g1 + g2); for sigmoid scores DeepSeek-V3's eq. 13 (without its
             constant routed scaling factor).
    With the model's own k on a softmax top-k model (Mixtral, Qwen-MoE, OLMoE) this selects
    exactly the experts the model used.
    """
    scores = _checked_scores(scores)
    k = _checked_k(k, scores.shape[1])
    ids = _top_k_ids(scores, k)
    return Assignment(
        policy=f"top-{k}",
        params={"k": k},
        num_experts=scores.shape[1],
        expert_ids=ids,
        weights=_gate_weights(np.take_along_axis(scores, ids, axis=1), normalise=k > 1),
        dropped=np.zeros(ids.shape, dtype=bool),
    )


def top_k_capacity(
    scores: ArrayLike, k: int, capacity_factor: float, order: str = "token", min_capacity: int = MIN_CAPACITY
) -> Assignment:
    """`top_k`, then every expert takes at most C = max(⌈α · k · T / E⌉, min_capacity) tokens
    (`metrics.expert_capacity`, as DeepSpeed sizes it) and drops the rest.

    Assignments queue all first choices before any second choice (GShard, Algorithm 1; V-MoE's
    dispatcher), and within a choice:
      order = "token": in token order, as GShard and Switch do;
      order = "score": by the token's highest router score, highest first — V-MoE's batch
                       prioritized routing (Riquelme et al. 2021, Sec. 4).
    A dropped assignment gets weight 0 (the token skips that expert through the residual,
    Switch Sec. 2.2); the token's other weights are not renormalised (GShard, Algorithm 1).
    """
    if order not in ("token", "score"):
        raise ValueError(f"order must be 'token' or 'score' (batch prioritized routing), got {order!r}")
    scores = _checked_scores(scores)
    tokens, num_experts = scores.shape
    k = _checked_k(k, num_experts)
    capacity = expert_capacity(tokens, num_experts, k, capacity_factor, min_capacity)
    priority = batch_priority(scores) if order == "score" else None
    return replace(
        limit_capacity(top_k(scores, k), capacity, priority),
        policy=f"top-{k} with capacity",
        params={"α": capacity_factor, "order": order},
    )


def batch_priority(scores: ArrayLike) -> np.ndarray:
    """float[tokens]: V-MoE's priority of each token, its highest router score."""
    return _checked_scores(scores).max(axis=1)


def limit_capacity(assignment: Assignment, capacity: int, priority: ArrayLike | None = None) -> Assignment:
    """`assignment` with each expert keeping only its first `capacity` assignments.

    Queue order: slot 0 (first choices) of all tokens, then slot 1, ...; within a slot, tokens
    by descending `priority` float[tokens] (ties in token order), or in token order when
    `priority` is None. Assignments already dropped stay dropped and hold no place.
    """
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0 tokens per expert, got {capacity}")
    tokens = assignment.num_tokens
    if priority is None:
        queue = np.arange(tokens)
    else:
        priority = np.asarray(priority, dtype=np.float64)
        if priority.shape != (tokens,):
            raise ValueError(f"priority must be float[tokens] = ({tokens},), got shape {priority.shape}")
        queue = np.argsort(-priority, kind="stable")
    ids = assignment.expert_ids[queue].T  # [slots, tokens in queue order]: first choices first
    waiting = (ids >= 0) & ~assignment.dropped[queue].T
    over = np.zeros(ids.shape, dtype=bool)
    over[waiting] = places_in_queue(ids[waiting], assignment.num_experts) >= capacity
    dropped = np.empty_like(assignment.dropped)
    dropped[queue] = over.T
    dropped |= assignment.dropped
    weights = np.where(dropped, 0, assignment.weights).astype(np.float32)
    return replace(assignment, weights=weights, dropped=dropped, capacity=capacity)


def capacity_sweep(
    assignment: Assignment, capacity_factors: ArrayLike, priority: ArrayLike | None = None,
    min_capacity: int = MIN_CAPACITY,
) -> np.ndarray:
    """float[factors]: `dropped_token_share` of `assignment` (e.g. the model's own routing)
    limited to C = max(⌈α · k · T / E⌉, min_capacity) (`metrics.expert_capacity`) at each
    capacity factor α, k = its slots per token."""
    return np.array([
        dropped_token_share(limit_capacity(assignment, sweep_capacity(assignment, alpha, min_capacity), priority))
        for alpha in np.asarray(capacity_factors, dtype=np.float64)
    ])


def sweep_capacity(assignment: Assignment, capacity_factor: float, min_capacity: int = MIN_CAPACITY) -> int:
    """The capacity C that `capacity_sweep` gives `assignment` at capacity factor α."""
    tokens, slots = assignment.expert_ids.shape
    return expert_capacity(tokens, assignment.num_experts, slots, float(capacity_factor), min_capacity)


# -- expert choice -----------------------------------------------------------------------


def expert_choice(scores: ArrayLike, capacity: int) -> Assignment:
    """Each expert takes the C tokens that score it highest (ties: the earlier token).

    Zhou et al. 2022, eq. 1: G, I = TopK(S^T, k = C) with S the token-to-expert scores; the
    paper sets C = T · c / E for a capacity factor c (experts per token on average). Every
    expert gets exactly C tokens, so load is perfectly balanced, while a token may get
    several experts or none. Weights are the token's scores for its experts (G), not
    renormalised.
    """
    scores = _checked_scores(scores)
    tokens, num_experts = scores.shape
    if not 1 <= capacity <= tokens:
        raise ValueError(
            f"capacity C must be between 1 and the {tokens} tokens (each expert picks C distinct "
            f"tokens), got {capacity}"
        )
    picked = np.argsort(-scores, axis=0, kind="stable")[:capacity]  # [C, experts] token ids
    chosen = np.zeros(scores.shape, dtype=bool)
    chosen[picked, np.arange(num_experts)] = True
    slots = max(int(chosen.sum(axis=1).max()), 1)
    # Each token's experts by descending weight; unchosen experts sort last.
    order = np.argsort(np.where(chosen, -scores, np.inf), axis=1, kind="stable")[:, :slots]
    taken = np.take_along_axis(chosen, order, axis=1)
    return Assignment(
        policy="expert choice",
        params={"C": capacity},
        num_experts=num_experts,
        expert_ids=np.where(taken, order, -1).astype(np.int32),
        weights=np.where(taken, np.take_along_axis(scores, order, axis=1), 0).astype(np.float32),
        dropped=np.zeros(order.shape, dtype=bool),
        capacity=capacity,
    )


# -- hash routing ------------------------------------------------------------------------


def hash_routing(token_ids: ArrayLike, num_experts: int, method: str = "modulo") -> Assignment:
    """One expert per token from its token id alone; the router scores play no part.

    Hash layers (Roller et al. 2021): the layer's output is FFN_{hash(x)}(h), with no gate, so
    the weight is 1.
      method = "modulo": expert = token id mod E;
      method = "random": a fixed random hash, SplitMix64(token id) mod E (Steele et al. 2014),
                         standing in for the paper's random lookup table over the vocabulary.
    """
    if method not in HASH_METHODS:
        raise ValueError(f"method must be one of {HASH_METHODS}, got {method!r}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be at least 1, got {num_experts}")
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or (ids.size and (ids.dtype.kind not in "iu" or ids.min() < 0)):
        raise ValueError("token_ids must be a flat list of non-negative integer ids, one per token")
    ids = ids.astype(np.uint64)
    hashed = _splitmix64(ids) if method == "random" else ids
    experts = (hashed % np.uint64(num_experts)).astype(np.int32)[:, None]
    return Assignment(
        policy="hash",
        params={"hash": "token id mod E" if method == "modulo" else "random"},
        num_experts=num_experts,
        expert_ids=experts,
        weights=np.ones(experts.shape, dtype=np.float32),
        dropped=np.zeros(experts.shape, dtype=bool),
    )


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's output function: a fixed bijection of uint64 that mixes every bit."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


# -- auxiliary-loss-free balancing ---------------------------------------------------------


def bias_balancing(scores: ArrayLike, k: int, update_speed: float, chunk_size: int) -> Assignment:
    """DeepSeek-V3's auxiliary-loss-free balancing replayed over the tokens in order.

    Tokens are taken in chunks of `chunk_size` (one chunk stands for a training batch). In each
    chunk a token selects the top-k of s_i + b_i, the per-expert bias b starting at 0; after
    the chunk, b_i ← b_i + γ · sign(mean_j c_j − c_i), with c_i the chunk's assignments to
    expert i: overloaded experts lose γ, underloaded ones gain γ (Wang et al. 2024, Alg. 1;
    DeepSeek-V3 Sec. 2.1.2; γ = `update_speed`, 0.001 in DeepSeek-V3's pre-training).
    The bias only selects: weights are the selected raw scores normalised to sum 1,
    g_i = s_i / sum_j s_j (DeepSeek-V3, eq. 13). DeepSeek-V3's group-limited selection and
    its own learnt bias are not replayed; the final bias is in `Assignment.bias`.
    """
    scores = _checked_scores(scores)
    tokens, num_experts = scores.shape
    k = _checked_k(k, num_experts)
    if not update_speed > 0:
        raise ValueError(f"update_speed γ must be > 0 (DeepSeek-V3 used 0.001), got {update_speed}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1 token, got {chunk_size}")
    bias = np.zeros(num_experts)
    ids = np.empty((tokens, k), dtype=np.int32)
    for start in range(0, tokens, chunk_size):
        chunk = slice(start, start + chunk_size)
        ids[chunk] = _top_k_ids(scores[chunk] + bias, k)
        counts = np.bincount(ids[chunk].ravel(), minlength=num_experts)
        bias += update_speed * np.sign(counts.mean() - counts)
    # Slots by descending raw score: the bias ranks candidates, the scores weigh them.
    selected = np.take_along_axis(scores, ids, axis=1)
    by_score = np.argsort(-selected, axis=1, kind="stable")
    ids = np.take_along_axis(ids, by_score, axis=1)
    return Assignment(
        policy=f"top-{k} with bias balancing",
        params={"γ": update_speed, "chunk": chunk_size},
        num_experts=num_experts,
        expert_ids=ids,
        weights=_gate_weights(np.take_along_axis(selected, by_score, axis=1), normalise=True),
        dropped=np.zeros(ids.shape, dtype=bool),
        bias=bias,
    )


# -- comparing assignments ---------------------------------------------------------------


def expert_load(assignment: Assignment) -> np.ndarray:
    """float[experts]: share of tokens each expert processes (dropped assignments excluded);
    for a top-k routing without drops the same as `metrics.expert_load`, summing to k."""
    return _expert_counts(assignment, assignment.routed) / _token_count(assignment)


def dropped_load(assignment: Assignment) -> np.ndarray:
    """float[experts]: share of tokens each expert turned away because it was full."""
    return _expert_counts(assignment, assignment.dropped) / _token_count(assignment)


def load_cv(load: ArrayLike) -> float:
    """Coefficient of variation of load float[experts]: population std / mean (0 = perfectly
    balanced; Shazeer et al. 2017 penalise its square). NaN when no expert has any load."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean()
    return float(load.std() / mean) if mean > 0 else float("nan")


def balance_loss(assignment: Assignment, scores: ArrayLike) -> float:
    """The Switch/GShard auxiliary loss E · sum_i f_i · P_i for this assignment, unscaled.

    f_i = share of tokens that selected expert i, dropped ones included (Switch eq. 5 counts
    router decisions before capacity, as GShard's c_e in Algorithm 1);
    P_i = mean router score of expert i, scores normalised per token (as `metrics.balance_loss`,
    which this equals for the model's own routing).
    """
    scores = _checked_scores(scores)
    if scores.shape != (assignment.num_tokens, assignment.num_experts):
        raise ValueError(
            f"scores has shape {scores.shape}, expected [tokens, experts] = "
            f"{(assignment.num_tokens, assignment.num_experts)}"
        )
    fraction = _expert_counts(assignment, assignment.expert_ids >= 0) / _token_count(assignment)
    mean_prob = (scores / scores.sum(axis=1, keepdims=True)).mean(axis=0)
    return float(assignment.num_experts * (fraction * mean_prob).sum())


def dropped_token_share(assignment: Assignment) -> float:
    """Share of tokens with at least one assignment dropped."""
    return float(assignment.dropped.any(axis=1).sum() / _token_count(assignment))


def unrouted_token_share(assignment: Assignment) -> float:
    """Share of tokens that no expert processes (all dropped, or chosen by no expert)."""
    return float((~assignment.routed.any(axis=1)).sum() / _token_count(assignment))


def experts_per_token(assignment: Assignment) -> np.ndarray:
    """int[slots + 1]: tokens processed by 0, 1, ..., slots experts."""
    per_token = assignment.routed.sum(axis=1)
    return np.bincount(per_token, minlength=assignment.expert_ids.shape[1] + 1)


def agreement(assignment: Assignment, reference: Assignment) -> float:
    """Share of the reference's (token, expert) pairs that `assignment` also routes (dropped
    pairs do not count): 1 when every expert the reference used still gets its tokens."""
    if (assignment.num_tokens, assignment.num_experts) != (reference.num_tokens, reference.num_experts):
        raise ValueError(
            f"the assignments cover different routings: {assignment.num_tokens} tokens × "
            f"{assignment.num_experts} experts and {reference.num_tokens} × {reference.num_experts}"
        )
    ours, theirs = _pairs(assignment), _pairs(reference)
    total = theirs.sum()
    if total == 0:
        raise ValueError("the reference routes no (token, expert) pair, so agreement with it is undefined")
    return float((ours & theirs).sum() / total)


# -- helpers -----------------------------------------------------------------------------


def _checked_scores(scores: ArrayLike) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"scores must be float[tokens, experts] with at least one of each, got shape {scores.shape}")
    if not np.isfinite(scores).all() or (scores < 0).any():
        raise ValueError("scores must be finite router probabilities or sigmoid scores (>= 0), not logits")
    return scores


def _checked_k(k: int, num_experts: int) -> int:
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be between 1 and the {num_experts} experts, got {k}")
    return int(k)


def _top_k_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """int32[tokens, k]: the k highest scores of each row, highest first; ties to the lower id."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int32)


def _gate_weights(selected: np.ndarray, normalise: bool) -> np.ndarray:
    if normalise:
        selected = selected / selected.sum(axis=1, keepdims=True)
    return selected.astype(np.float32)


def _expert_counts(assignment: Assignment, mask: np.ndarray) -> np.ndarray:
    return np.bincount(assignment.expert_ids[mask], minlength=assignment.num_experts)


def _pairs(assignment: Assignment) -> np.ndarray:
    """bool[tokens, experts]: the (token, expert) pairs the assignment routes."""
    pairs = np.zeros((assignment.num_tokens, assignment.num_experts), dtype=bool)
    tokens, _ = np.nonzero(assignment.routed)
    pairs[tokens, assignment.expert_ids[assignment.routed]] = True
    return pairs


def _token_count(assignment: Assignment) -> int:
    if assignment.num_tokens == 0:
        raise ValueError("this assignment has no tokens; trace a longer text")
    return assignment.num_tokens
