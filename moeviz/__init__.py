"""moeviz: see how a Mixture-of-Experts language model routes every token to its experts.

`moeviz.trace_text(model_or_path, text)` returns a `RoutingTrace`; `moeviz.intervene(model_or_path,
text, ablate={layer: [experts]})` re-runs the text with the routing changed;
`moeviz.compare_variants(model_a, model_b, text)` pairs two variants of one model (16-bit and 4-bit,
two checkpoints) token by token; `moeviz.metrics` and
`moeviz.charts` (`moeviz.analysis.metrics`, `moeviz.views.charts`) turn traces into numbers and
Plotly figures.

The package is grouped by floor, and data flows one way, text -> model -> trace -> analysis -> views:
- `moeviz.trace`: the RoutingTrace, the ground floor everything uses;
- `moeviz.model`: what needs torch and a model (loading, 4-bit, capture, generation, tokens);
- `moeviz.analysis`: pure, torch-free functions of traces (metrics, routing policies);
- `moeviz.views`: traces and metrics -> Plotly figures and HTML;
- `moeviz.runs`: corpora on disk and from serving engines;
- `api`, `cli`, `ui`: the doors.
Importing `moeviz.trace`, `moeviz.analysis` or `moeviz.views` does not import torch, so traces
open on machines without it.
"""

from importlib import import_module

_LAZY = {
    "trace_text": "moeviz.api",
    "intervene": "moeviz.api",
    "RoutingPolicy": "moeviz.model.interventions",
    "compare_variants": "moeviz.api",
    "load_model": "moeviz.model.loading",
    "RoutingTrace": "moeviz.trace",
    "Sampling": "moeviz.model.generation",
}
_MODULES = {"metrics": "moeviz.analysis.metrics", "charts": "moeviz.views.charts"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name in _MODULES:
        return import_module(_MODULES[name])
    raise AttributeError(f"module 'moeviz' has no attribute {name!r}")
