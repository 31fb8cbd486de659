"""Hand-built traces for pure-function tests."""

from __future__ import annotations

import numpy as np

from moeviz.trace import RoutingTrace


def make_trace(
    topk_ids,
    router_logits=None,
    topk_weights=None,
    *,
    num_experts: int | None = None,
    layer_ids=None,
    tokens=None,
    scoring: str = "softmax",
    num_layers: int | None = None,
    token_ids=None,
    special_ids=(),
    generated_from: int = -1,
) -> RoutingTrace:
    """A RoutingTrace from small literal arrays.

    topk_ids: int[layers, tokens, k]. Missing logits default to zeros (uniform router);
    missing weights to 1/k each. Tokens default to "t0", "t1", ..., token ids to 0, 1, ...
    """
    topk_ids = np.asarray(topk_ids, dtype=np.int32)
    layers, count, k = topk_ids.shape
    if num_experts is None:
        num_experts = int(topk_ids.max()) + 1 if router_logits is None else np.shape(router_logits)[-1]
    if router_logits is None:
        router_logits = np.zeros((layers, count, num_experts), dtype=np.float32)
    if topk_weights is None:
        topk_weights = np.full((layers, count, k), 1.0 / k, dtype=np.float32)
    tokens = list(tokens) if tokens is not None else [f"t{i}" for i in range(count)]
    layer_ids = list(layer_ids) if layer_ids is not None else list(range(layers))
    text = "".join(tokens)
    starts = np.cumsum([0] + [len(t) for t in tokens])
    return RoutingTrace(
        model_id="hand-built",
        model_type="mixtral",
        num_experts=num_experts,
        top_k=k,
        scoring=scoring,
        num_layers=num_layers if num_layers is not None else max(layer_ids) + 1,
        layer_ids=layer_ids,
        text=text,
        tokens=tokens,
        token_ids=list(token_ids) if token_ids is not None else list(range(count)),
        offsets=[(int(starts[i]), int(starts[i + 1])) for i in range(count)],
        topk_ids=topk_ids,
        topk_weights=np.asarray(topk_weights, dtype=np.float32),
        router_logits=np.asarray(router_logits, dtype=np.float32),
        special_ids=list(special_ids),
        generated_from=generated_from,
    )
