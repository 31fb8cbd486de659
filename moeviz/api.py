"""The notebook API: one call from a model (or its path) and a text to a RoutingTrace.

    >>> import moeviz
    >>> trace = moeviz.trace_text("assets/model", "def f(x): return x + 1")
    >>> moeviz.charts.expert_load_chart(moeviz.metrics.expert_load(trace)[0], 2 / 8)
"""

from __future__ import annotations

from pathlib import Path

from moeviz.model import capture, generation
from moeviz.model.loading import LoadedModel, load_model
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


def _as_loaded(model, tokenizer, load_options: dict) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(model, **load_options)
    if tokenizer is None:
        raise ValueError("Pass the model's tokenizer too: moeviz.trace_text(model, text, tokenizer=tokenizer)")
    device = str(next(model.parameters()).device)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=getattr(model.config, "_name_or_path", ""), device=device)
