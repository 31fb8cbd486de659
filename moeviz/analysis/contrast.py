"""Contrast finder: the experts one set of texts selects more often than another (torch-free).

SteerMoE (Fayyaz et al., 2025, arXiv:2509.09660, §2) finds behaviour-linked experts this way. For
layer ℓ and expert i it counts the tokens of each set whose top-k holds i, A_ℓi of N tokens, and
takes the risk difference of the two activation rates,

    Δ_ℓi = A¹_ℓi / N¹ − A²_ℓi / N²,

ranking experts by |Δ| over all (layer, expert) pairs; steering then activates the top experts of
one sign (at most k per layer) and deactivates those of the other (`calc_risk_diff` in the
custom_steering notebook and `steer_moe` in src/utils.py of adobe-research/SteerMoE, read in its
fork JACKPURCELL/SteerMoE).

Here a set's tokens are the counted tokens (special ones left out unless asked) of all its texts,
pooled; an expert is selected when it is among the token's recorded top-k ids, what the model used
(SteerMoE's notebook re-derives top-k from the router probabilities). The interval is Newcombe's
hybrid score interval (Newcombe 1998, Statistics in Medicine 17:873-890, method 10), built from
Wilson intervals of each rate; unlike Wald's it stays inside [−1, 1] and has width when a rate is
0 or 1, as most are for a rarely chosen expert. It treats tokens as independent draws: adjacent
tokens of one text often share experts (Mixtral paper, Table 5), so it is narrower than it should
be for long runs of similar text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from moeviz.analysis import metrics
from moeviz.trace import RoutingTrace

CONFIDENCE = 0.95


def wilson_interval(successes, trials, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson's score interval for a binomial rate (Wilson 1927), elementwise."""
    successes, trials = np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z / denominator * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return centre - half, centre + half


def newcombe_interval(a, n_a, b, n_b, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Newcombe's hybrid score interval (method 10) for a/n_a − b/n_b, elementwise."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p_a, p_b = np.asarray(a, dtype=np.float64) / n_a, np.asarray(b, dtype=np.float64) / n_b
    low_a, high_a = wilson_interval(a, n_a, z)
    low_b, high_b = wilson_interval(b, n_b, z)
    difference = p_a - p_b
    return (difference - np.sqrt((p_a - low_a) ** 2 + (high_b - p_b) ** 2),
            difference + np.sqrt((high_a - p_a) ** 2 + (p_b - low_b) ** 2))


def selection_counts(traces: Sequence[RoutingTrace], include_special: bool = False) -> tuple[np.ndarray, int]:
    """(int[layers, experts] tokens whose top-k holds each expert, tokens counted) over `traces`."""
    counts, tokens = None, 0
    for trace in traces:
        kept = metrics.counted(trace, include_special)
        selected = np.zeros((len(kept.layer_ids), kept.num_tokens, kept.num_experts), dtype=bool)
        layer, token, _ = np.indices(kept.topk_ids.shape)
        selected[layer, token, kept.topk_ids] = True
        counts = selected.sum(1) if counts is None else counts + selected.sum(1)
        tokens += kept.num_tokens
    return counts, tokens


@dataclass(frozen=True)
class Contrast:
    """How often each expert is selected in set A and in set B, per MoE layer.

    selected_a, selected_b: int[layers, experts], tokens whose top-k holds the expert
    tokens_a, tokens_b:     tokens counted in each set
    """

    layer_ids: list[int]
    layer_labels: list[str]
    top_k: int
    selected_a: np.ndarray
    selected_b: np.ndarray
    tokens_a: int
    tokens_b: int
    confidence: float = CONFIDENCE

    @property
    def num_experts(self) -> int:
        return self.selected_a.shape[1]

    @property
    def rate_a(self) -> np.ndarray:
        return self.selected_a / self.tokens_a

    @property
    def rate_b(self) -> np.ndarray:
        return self.selected_b / self.tokens_b

    @property
    def risk_difference(self) -> np.ndarray:
        """float[layers, experts]: p_A − p_B, positive where A selects the expert more often."""
        return self.rate_a - self.rate_b

    @property
    def interval(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) float[layers, experts]: Newcombe's interval for the risk difference."""
        return newcombe_interval(self.selected_a, self.tokens_a, self.selected_b, self.tokens_b, self.confidence)

    def ranking(self) -> pd.DataFrame:
        """Every (layer, expert), largest |risk difference| first (SteerMoE's order; ties by layer,
        then expert): rank, layer, layer_label, expert, rate_a, rate_b, risk_difference, ci_low,
        ci_high."""
        low, high = self.interval
        layers, experts = np.indices(self.selected_a.shape)
        table = pd.DataFrame({
            "layer": np.asarray(self.layer_ids)[layers.ravel()],
            "layer_label": np.asarray(self.layer_labels, dtype=object)[layers.ravel()],
            "expert": experts.ravel(),
            "rate_a": self.rate_a.ravel(),
            "rate_b": self.rate_b.ravel(),
            "risk_difference": self.risk_difference.ravel(),
            "ci_low": low.ravel(),
            "ci_high": high.ravel(),
        })
        # |A_a·N_b − A_b·N_a| / (N_a·N_b) in integers, so that equal differences tie exactly.
        size = np.abs(self.selected_a.astype(np.int64) * self.tokens_b - self.selected_b.astype(np.int64) * self.tokens_a)
        order = np.lexsort((table["expert"], table["layer"], -size.ravel()))
        table = table.iloc[order].reset_index(drop=True)
        table.insert(0, "rank", np.arange(1, len(table) + 1))
        return table


def contrast(traces_a: Sequence[RoutingTrace], traces_b: Sequence[RoutingTrace], include_special: bool = False,
             confidence: float = CONFIDENCE) -> Contrast:
    """Selection counts of sets A and B, for the risk difference of each expert."""
    if not traces_a or not traces_b:
        raise ValueError("A contrast needs at least one text in set A and one in set B.")
    first = traces_a[0]
    for trace in [*traces_a, *traces_b]:
        if trace.layer_ids != first.layer_ids or trace.num_experts != first.num_experts:
            raise ValueError(
                f"These traces come from models with other layers or experts ({first.layer_ids} and "
                f"{trace.layer_ids}, {first.num_experts} and {trace.num_experts} experts): contrast texts run "
                "through one model.")
    (selected_a, tokens_a), (selected_b, tokens_b) = (selection_counts(s, include_special) for s in (traces_a, traces_b))
    for name, tokens in (("A", tokens_a), ("B", tokens_b)):
        if tokens == 0:
            raise ValueError(f"Set {name} has no tokens to count (special tokens are left out): give it some text.")
    return Contrast(layer_ids=list(first.layer_ids), layer_labels=[first.layer_label(n) for n in first.layer_ids],
                    top_k=first.top_k, selected_a=selected_a, selected_b=selected_b, tokens_a=tokens_a,
                    tokens_b=tokens_b, confidence=confidence)


def top_experts(result: Contrast, count: int, favoured: str = "A", per_layer: int | None = None) -> dict[int, list[int]]:
    """{layer: experts}: the `count` experts that set `favoured` ("A" or "B") selects more often,
    largest |risk difference| first, at most `per_layer` in one layer (SteerMoE activates at most k
    per layer; an ablation must leave k experts). Experts with no difference are never taken."""
    if favoured not in ("A", "B"):
        raise ValueError(f"favoured must be 'A' or 'B'; got {favoured!r}")
    sign = 1 if favoured == "A" else -1
    chosen: dict[int, list[int]] = {}
    taken = 0
    for row in result.ranking().itertuples():
        if taken == count:
            break
        if sign * row.risk_difference <= 0 or (per_layer is not None and len(chosen.get(row.layer, [])) >= per_layer):
            continue
        chosen.setdefault(int(row.layer), []).append(int(row.expert))
        taken += 1
    return {layer: sorted(experts) for layer, experts in sorted(chosen.items())}


@dataclass(frozen=True)
class SetEffect:
    """What an intervention did to the predictions of one set of texts, all its predicted tokens pooled."""

    mean_delta_logprob: float
    perplexity_before: float
    perplexity_after: float
    predicted_tokens: int

    @property
    def delta_perplexity(self) -> float:
        return self.perplexity_after - self.perplexity_before


def set_effect(before: Sequence[np.ndarray], after: Sequence[np.ndarray]) -> SetEffect:
    """Mean Δ log p of each actual next token and perplexity exp(−mean log p), before and after,
    over the texts of one set (float[T − 1] per text), every predicted token weighing the same."""
    before = np.concatenate([np.asarray(b, dtype=np.float64) for b in before]) if before else np.zeros(0)
    after = np.concatenate([np.asarray(a, dtype=np.float64) for a in after]) if after else np.zeros(0)
    if before.shape != after.shape:
        raise ValueError(f"Expected the same predicted tokens before and after; got {before.size} and {after.size}.")
    if before.size == 0:
        raise ValueError("These texts have no predicted tokens: each needs at least two tokens.")
    return SetEffect(mean_delta_logprob=float((after - before).mean()), perplexity_before=math.exp(-before.mean()),
                     perplexity_after=math.exp(-after.mean()), predicted_tokens=int(before.size))
