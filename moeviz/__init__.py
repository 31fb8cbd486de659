"""moeviz: see how a Mixture-of-Experts language model routes every token to its experts.

`moeviz.trace_text(model_or_path, text)` returns a `RoutingTrace`; `moeviz.metrics` and
`moeviz.charts` turn traces into numbers and Plotly figures. Importing a submodule such as
`moeviz.trace` does not import torch, so traces open on machines without it.
"""

from importlib import import_module

_LAZY = {
    "trace_text": "moeviz.api",
    "load_model": "moeviz.models",
    "RoutingTrace": "moeviz.trace",
    "Sampling": "moeviz.generation",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name in ("charts", "metrics"):
        return import_module(f"moeviz.{name}")
    raise AttributeError(f"module 'moeviz' has no attribute {name!r}")
