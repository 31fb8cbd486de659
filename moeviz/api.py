"""The notebook API: one call from a model (or its path) and a text to a RoutingTrace, or to
the same text re-run with the routing changed.

    >>> import moeviz
    >>> trace = moeviz.trace_text("assets/model", "def f(x): return x + 1")
    >>> moeviz.charts.expert_load_chart(moeviz.metrics.expert_load(trace)[0], 2 / 8)
    >>> result = moeviz.intervene("assets/model", "def f(x): return x + 1", ablate={2: [5]})
    >>> result.changed_logprobs - result.baseline_logprobs
    >>> moeviz.compare_variants("assets/model", moeviz.load_model("assets/model", quantization="nf4"), text)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from moeviz.analysis import variants
from moeviz.model import capture, generation, interventions
from moeviz.model.loading import LoadedModel, load_model
from moeviz.model.tokens import tokenize
from moeviz.trace import RoutingTrace


def trace_text(
    model: str | Path | LoadedModel | object,
    text: str,
    *,
    tokenizer=None,
    max_tokens: int = capture.DEFAULT_MAX_TOKENS,
    sampling: generation.Sampling | None = None,
    **load_options,
) -> RoutingTrace:
    """Routing of `text` through `model`: a local folder or hub id (loaded with
    `load_options`, see `load_model`), a `LoadedModel`, or a transformers model plus its
    `tokenizer`. With `sampling`, the model first generates from `text` as a prompt."""
    loaded = _as_loaded(model, tokenizer, load_options)
    if sampling is not None:
        return generation.trace_generation(
            loaded.model, loaded.tokenizer, text, sampling, model_id=loaded.model_id, max_tokens=max_tokens
        )
    return capture.trace_text(loaded.model, loaded.tokenizer, text, model_id=loaded.model_id, max_tokens=max_tokens)


def intervene(
    model: str | Path | LoadedModel | object,
    text: str,
    ablate: Mapping[int, Sequence[int]] | None = None,
    force: Mapping[int, Sequence[int]] | None = None,
    top_k: int | Mapping[int, int] | None = None,
    bias: Mapping[int, Mapping[int, float] | Sequence[float]] | None = None,
    capacity_factor: float | Mapping[int, float] | None = None,
    policy: interventions.RoutingPolicy | Mapping[int, interventions.RoutingPolicy] | None = None,
    *,
    tokenizer=None,
    max_tokens: int = capture.DEFAULT_MAX_TOKENS,
    continuation_tokens: int = 0,
    **load_options,
) -> interventions.InterventionResult:
    """`text` through `model` as it routes, and again with its routing changed inside the
    forward pass (see `moeviz.model.interventions` for what each option means per family).
    Layers are the model's own numbers, as in `RoutingTrace.layer_ids`:

    ablate:          {layer: [experts]} never selected there
    force:           {layer: [experts]} put into every token's selection there
    top_k:           k everywhere, or {layer: k}
    bias:            {layer: {expert: value}} added to the router logits
    capacity_factor: α everywhere, or {layer: α}: each expert takes at most ⌈α·k·T/E⌉ tokens
    policy:          a `RoutingPolicy` (expert choice, hash or bias balancing) everywhere, or
                     {layer: RoutingPolicy}: the Routing lab's policy decides the selection

    `.baseline` and `.changed` are RoutingTraces of the same tokens; `.baseline_logprobs` and
    `.changed_logprobs` the log-probability of each actual next token, float[T − 1]. With
    `continuation_tokens`, both models also continue the text greedily."""
    loaded = _as_loaded(model, tokenizer, load_options)
    intervention = interventions.Intervention(
        ablate=ablate or {}, force=force or {}, top_k=top_k, bias=bias or {}, capacity_factor=capacity_factor,
        policy=policy,
    )
    return interventions.run_intervention(
        loaded.model, loaded.tokenizer, text, intervention, model_id=loaded.model_id, max_tokens=max_tokens,
        continuation_tokens=continuation_tokens,
    )


def compare_variants(
    model_a: str | Path | LoadedModel,
    model_b: str | Path | LoadedModel,
    text: str,
    *,
    max_tokens: int = capture.DEFAULT_MAX_TOKENS,
    include_special: bool = False,
) -> variants.VariantComparison:
    """`text` through two variants of one model, e.g. 16-bit and 4-bit, or two checkpoints that
    share a tokenizer: local folders or hub ids (loaded with the defaults) or `LoadedModel`s, such as
    `load_model(path, quantization="nf4")`. Refuses (`TokenizationMismatch`) before running either
    model when their tokenizers split the text differently.

    `.first_choice_agreement` and `.topk_overlap` per MoE layer, `.first_choice_differs`
    [layers, tokens], `.delta_logprobs` (B − A) of each actual next token."""
    loaded_a, loaded_b = _as_loaded(model_a, None, {}), _as_loaded(model_b, None, {})
    split_a, split_b = (tokenize(loaded.tokenizer, text, max_tokens) for loaded in (loaded_a, loaded_b))
    variants.check_same_tokens(split_a.ids, split_b.ids, split_a.tokens, split_b.tokens)
    (trace_a, predictions_a), (trace_b, predictions_b) = (
        interventions.traced_predictions(loaded.model, loaded.tokenizer, text, model_id=loaded.model_id,
                                         max_tokens=max_tokens)
        for loaded in (loaded_a, loaded_b))
    return variants.VariantComparison(trace_a, trace_b, predictions_a.logprobs, predictions_b.logprobs,
                                      include_special=include_special)


def _as_loaded(model, tokenizer, load_options: dict) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(model, **load_options)
    if tokenizer is None:
        raise ValueError("Pass the model's tokenizer too: moeviz.trace_text(model, text, tokenizer=tokenizer)")
    device = str(next(model.parameters()).device)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=getattr(model.config, "_name_or_path", ""), device=device)
