"""What a loaded model's weights are: how they are stored (16-bit, or 4-bit and how), what they
weigh in memory, and how many there are. Reads a model; changes nothing."""

from __future__ import annotations

import math
import sys

import torch
from torch import nn


def storage_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy now: parameters, buffers and 4-bit quantization state
    (absmax, nested absmax, code books), each tensor counted once."""
    tensors = [*model.parameters(), *model.buffers()]
    for state in _quant_states(model):
        nested = state.state2
        tensors += [state.absmax, state.code, state.offset]
        tensors += [nested.absmax, nested.code] if nested is not None else []
    seen = {(t.device, t.data_ptr()): t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)}
    return sum(seen.values())


def parameter_count(model: nn.Module) -> int:
    """Weights as the model defines them, 4-bit or not (a packed byte holds two)."""
    shapes = {id(state.packed): state.shape for state in _packed_states(model)}
    return sum(math.prod(shapes[id(p)]) if id(p) in shapes else p.numel() for p in model.parameters())


def quantization_of(model: nn.Module) -> str:
    """"nf4" (or "fp4") when a model's fused experts are stored in 4-bit; "nf4-linear-only" when
    only its nn.Linear layers are, as with the plain transformers recipe; else "none"."""
    states = list(_packed_states(model))
    if not states:
        return "none"
    quant_type = states[0].quant_type
    if any(state.parametrized for state in states):
        return quant_type
    return f"{quant_type}-linear-only"


class _PackedState:
    """A 4-bit tensor of a model: its packed storage, quantization state, and how it is held."""

    def __init__(self, packed: torch.Tensor, state, parametrized: bool):
        self.packed, self.state, self.parametrized = packed, state, parametrized
        self.shape, self.quant_type = tuple(state.shape), state.quant_type


def _packed_states(model: nn.Module):
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # nothing can be quantized by a library that was never imported
        return
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.quant_state is not None:
            yield _PackedState(module.weight, module.weight.quant_state, parametrized=False)
        for plist in getattr(module, "parametrizations", {}).values():
            for parametrization in plist:
                if isinstance(parametrization, Bnb4bitParametrization):
                    yield _PackedState(plist.original, parametrization.quant_state, parametrized=True)


def _quant_states(model: nn.Module) -> list:
    return list({id(s.state): s.state for s in _packed_states(model)}.values())
