"""Two variants of one model on the same text: 16-bit against 4-bit, or two checkpoints that share
a tokenizer. Where do they route the same way, and how do their predictions differ? (torch-free)

Per MoE layer: first-choice agreement, the share of tokens whose highest-weighted expert is the
same; top-k overlap, the mean over tokens of |top-k of A ∩ top-k of B| / k (the overlap OLMoE's
router saturation, arXiv:2409.02060 Eq. 5, takes between checkpoints). Special tokens are left out
unless asked, as in every moeviz statistic. Per token: Δ log p = log p_B − log p_A of the actual
next token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeviz.analysis import metrics
from moeviz.trace import RoutingTrace


class TokenizationMismatch(ValueError):
    """The two models split the text into different tokens: their routings cannot be paired."""


def check_same_tokens(ids_a: list[int], ids_b: list[int], tokens_a: list[str] | None = None,
                      tokens_b: list[str] | None = None) -> None:
    """Raise TokenizationMismatch, naming the first difference, unless the token ids are equal."""
    if list(ids_a) == list(ids_b):
        return
    at = next((n for n, (a, b) in enumerate(zip(ids_a, ids_b)) if a != b), min(len(ids_a), len(ids_b)))

    def shown(ids, tokens):
        if at >= len(ids):
            return "the end of the text"
        return f"{tokens[at]!r} (id {ids[at]})" if tokens else f"id {ids[at]}"

    raise TokenizationMismatch(
        f"The two models' tokenizers split this text differently ({len(ids_a)} and {len(ids_b)} tokens; at position "
        f"{at}: {shown(ids_a, tokens_a)} against {shown(ids_b, tokens_b)}), so their routings cannot be compared "
        "token by token. Compare variants of one model, or checkpoints that share its tokenizer.")


@dataclass(frozen=True)
class VariantComparison:
    """One text through models A and B.

    a, b:                 their RoutingTraces (the same tokens)
    logprobs_a/_b:        float[T − 1] log-probability of each actual next token
    """

    a: RoutingTrace
    b: RoutingTrace
    logprobs_a: np.ndarray
    logprobs_b: np.ndarray
    include_special: bool = False

    def __post_init__(self):
        check_same_tokens(self.a.token_ids, self.b.token_ids, self.a.tokens, self.b.tokens)
        if self.a.layer_ids != self.b.layer_ids or self.a.num_experts != self.b.num_experts or self.a.top_k != self.b.top_k:
            raise ValueError(
                f"These models route differently: MoE layers {self.a.layer_ids} and {self.b.layer_ids}, "
                f"{self.a.num_experts} and {self.b.num_experts} experts, top-{self.a.top_k} and top-{self.b.top_k}. "
                "Compare variants of one architecture (another precision or checkpoint).")
        expected = (max(self.a.num_tokens - 1, 0),)
        if np.shape(self.logprobs_a) != expected or np.shape(self.logprobs_b) != expected:
            raise ValueError(f"Expected one log-probability per predicted token, {expected[0]}; got "
                             f"{np.shape(self.logprobs_a)} and {np.shape(self.logprobs_b)}.")

    @property
    def counted(self) -> np.ndarray:
        """bool[tokens]: the tokens the statistics count."""
        return metrics.counted_tokens(self.a, self.include_special)

    @property
    def first_choice_differs(self) -> np.ndarray:
        """bool[layers, tokens]: A and B give the token different first-choice experts."""
        return self.a.first_choice != self.b.first_choice

    @property
    def first_choice_agreement(self) -> np.ndarray:
        """float[layers]: share of counted tokens with the same first-choice expert."""
        return 1 - self.first_choice_differs[:, self.counted].mean(-1)

    @property
    def topk_overlap(self) -> np.ndarray:
        """float[layers]: mean over counted tokens of |top-k A ∩ top-k B| / k."""
        a, b = self.a.topk_ids[:, self.counted], self.b.topk_ids[:, self.counted]
        shared = (a[..., :, None] == b[..., None, :]).any(-1).sum(-1)
        return shared.mean(-1) / self.a.top_k

    @property
    def delta_logprobs(self) -> np.ndarray:
        """float[T − 1]: log p_B − log p_A of each actual next token."""
        return np.asarray(self.logprobs_b, dtype=np.float64) - np.asarray(self.logprobs_a, dtype=np.float64)
