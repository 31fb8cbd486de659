"""What an intervention did: pure functions of two routings of the same tokens and of the
log-probabilities the model gave each actual next token (torch-free)."""

from __future__ import annotations

import numpy as np

from moeviz.trace import RoutingTrace


def perplexity(logprobs) -> float:
    """exp(−mean log p) over the predicted tokens: float[T − 1] of log-probabilities → a number."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    if logprobs.size == 0:
        raise ValueError("Perplexity needs at least one predicted token: the text has a single token.")
    return float(np.exp(-logprobs.mean()))


def used_experts(trace: RoutingTrace) -> np.ndarray:
    """bool[layers, tokens, experts]: the experts that really processed each token (selected
    with a weight other than 0; a trace without weights counts every selected id)."""
    used = np.zeros((len(trace.layer_ids), trace.num_tokens, trace.num_experts), dtype=bool)
    active = trace.topk_weights != 0 if trace.has_weights else np.ones(trace.topk_ids.shape, dtype=bool)
    layer, token, _ = np.nonzero(active)
    used[layer, token, trace.topk_ids[active]] = True
    return used


def experts_changed(baseline: RoutingTrace, changed: RoutingTrace) -> np.ndarray:
    """float[layers]: per MoE layer, the share of tokens whose set of experts (those that
    processed them) differs between two routings of the same tokens."""
    _check_same_tokens(baseline, changed)
    return (used_experts(baseline) != used_experts(changed)).any(-1).mean(-1)


def first_choice_agreement(a: RoutingTrace, b: RoutingTrace) -> np.ndarray:
    """float[layers]: per MoE layer, the share of tokens whose first-choice expert is the same."""
    _check_same_tokens(a, b)
    return (a.first_choice == b.first_choice).mean(-1)


def _check_same_tokens(a: RoutingTrace, b: RoutingTrace) -> None:
    if a.token_ids != b.token_ids or a.layer_ids != b.layer_ids or a.num_experts != b.num_experts:
        raise ValueError(
            f"These routings are not of the same tokens, layers and experts ({a.num_tokens} vs {b.num_tokens} "
            f"tokens, layers {a.layer_ids} vs {b.layer_ids}, {a.num_experts} vs {b.num_experts} experts): "
            "compare runs of one text through one model's layers."
        )
