"""A trace as one tidy table, for researchers' own tools (pandas, R, DuckDB, spreadsheets).

One row per token x MoE layer x top-k rank, in that order:
position, token_id, token (the token's text as the trace holds it: raw, not display glyphs;
`\\xNN` for bytes of a partial UTF-8 character), layer (the model's layer number), layer_label,
rank (1 = first choice), expert, weight (its mixing weight), router_prob (the router's score of
that expert with the model's own scoring function). weight and router_prob are empty (NaN)
where the trace does not hold them: a serving engine's trace has expert ids only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moeviz.trace import RoutingTrace

COLUMNS = ["position", "token_id", "token", "layer", "layer_label", "rank", "expert", "weight", "router_prob"]


def token_table(trace: RoutingTrace, full_distribution: bool = False) -> pd.DataFrame:
    """The routing of every token in every MoE layer, one row per (token, layer, rank).

    With `full_distribution`, columns router_prob_0 ... router_prob_{E-1} repeat the whole router
    distribution of the (token, layer) on each of its k rows; it needs router scores.
    """
    layers, tokens, k = trace.topk_ids.shape
    # Index arrays in the table's row order: token-major, then layer, then rank.
    position = np.repeat(np.arange(tokens), layers * k)
    layer_index = np.tile(np.repeat(np.arange(layers), k), tokens)
    rank = np.tile(np.arange(k), tokens * layers)
    experts = trace.topk_ids[layer_index, position, rank].astype(np.int64)
    layer_ids = np.asarray(trace.layer_ids, dtype=np.int64)
    labels = [trace.layer_label(n) for n in trace.layer_ids]
    table = pd.DataFrame({
        "position": position.astype(np.int64),
        "token_id": np.asarray(trace.token_ids, dtype=np.int64)[position],
        "token": np.asarray(trace.tokens, dtype=object)[position],
        "layer": layer_ids[layer_index],
        "layer_label": np.asarray(labels, dtype=object)[layer_index],
        "rank": rank.astype(np.int64) + 1,
        "expert": experts,
        "weight": _weights(trace, layer_index, position, rank),
        "router_prob": np.nan,
    })
    if trace.has_scores:
        probs = trace.router_probs.astype(np.float64)
        table["router_prob"] = probs[layer_index, position, experts]
        if full_distribution:
            distribution = probs[layer_index, position]  # [rows, experts]
            for expert in range(trace.num_experts):
                table[f"router_prob_{expert}"] = distribution[:, expert]
    elif full_distribution:
        raise ValueError(
            "The full router distribution needs router scores, which this trace does not have "
            f"(scoring: {trace.scoring}; router logits {'present' if trace.has_logits else 'absent'}). "
            "Export without it, or trace the text with moeviz itself."
        )
    return table


def _weights(trace: RoutingTrace, layer_index, position, rank) -> np.ndarray:
    if not trace.has_weights:
        return np.full(len(position), np.nan)
    return trace.topk_weights[layer_index, position, rank].astype(np.float64)


def to_csv(table: pd.DataFrame) -> bytes:
    return table.to_csv(index=False).encode("utf-8")


def to_parquet(table: pd.DataFrame) -> bytes:
    return table.to_parquet(index=False, engine="pyarrow")
