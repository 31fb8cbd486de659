"""Running a model whose experts are stored in NF4: dequantize only the experts a forward pass
uses, hold one layer's dequantized experts at a time per model, and keep the quantization state
with the weights when the model moves.

Which path runs when (transformers 5.24):
- Experts classes decorated with `@use_experts_implementation` (Mixtral, Qwen2/3-MoE, OLMoE,
  DeepSeek-V2/V3, GPT-OSS, GraniteMoE, PhiMoE, Jamba, ... all but a few) run
  `nf4_experts_forward`, registered as the model's experts implementation "moeviz_nf4": it
  dequantizes the experts hit by the step's `top_k_index`, expert by expert from their own
  blocks of the packed storage, and hands them to transformers' `grouped_mm` forward as if they
  were the whole layer. A decoded token dequantizes k experts per layer, not E; a long prefill
  that hits every expert dequantizes all of them, once. No fused NF4 grouped kernel is used: none
  ships with bitsandbytes 0.50.2.
- Other experts classes (Llama 4's bmm over the whole tensors, LongCat-Flash, Step3) keep their
  own forward: each access to a fused tensor dequantizes it whole, through the parametrization.
- A 4-bit `nn.Embedding` looks up only the rows of its ids (`nf4_embedding_forward`); a tied
  lm_head needs the whole table and dequantizes it whole.
- bitsandbytes' `Linear4bit`s (attention, untied lm_heads) dequantize inside bitsandbytes, or on
  a CPU with AVX512-BF16 multiply by the 4-bit weights in its packed kernel, which moeviz calls
  directly, without the Python layers around it (`packed_linear_forward`).
- Everything above dequantizes through `_dequantize_blocks`: on the CPU bitsandbytes' native
  kernel called as its CPU backend calls it, elsewhere `bitsandbytes.functional.dequantize_4bit`.
  A decoded token of a small model makes dozens of such calls, and bitsandbytes' Python layers
  (custom-op dispatch, checks) cost about as much as its kernels there.

Memory under concurrent sessions: bitsandbytes' own `replace_parameter_4bit` switches on
PyTorch's parametrization cache around each experts module, and that cache is process-global
(`torch.nn.utils.parametrize._cache`), so two threads in two layers kept each other's layers
alive. moeviz registers the parametrization without that cache (nothing here reads a fused
tensor twice in one forward) and serialises the forward of every 4-bit experts module of a model
on one lock held by the model: a layer's dequantized experts exist only inside that forward, so
at most one layer's are alive per model, whatever the number of threads. Attention, routers and
the rest of the forward pass still run in parallel.
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
from functools import cache, partial

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward

EXPERTS_IMPLEMENTATION = "moeviz_nf4"


def _bnb():
    return sys.modules["bitsandbytes"]  # imported by moeviz.model.quantize before any of this runs


@cache
def nf4_parametrization() -> type:
    """bitsandbytes' `Bnb4bitParametrization`, dequantizing through a flat view of the tensor
    (see `dequantize_whole`), and whose quantization state follows the packed weights when the
    model moves (`model.to("cuda")`): bitsandbytes keeps it as a plain attribute, which
    `Module.to` leaves behind. A dtype change is refused: the dtype the weights dequantize to
    was fixed when they were quantized. (A class made on first use: bitsandbytes is imported
    only when 4-bit is asked for.)"""

    class NF4Parametrization(_bnb().nn.parametrize.Bnb4bitParametrization):
        @torch.no_grad()
        def forward(self, packed: torch.Tensor) -> torch.Tensor:
            return dequantize_whole(packed, self.quant_state)

        def _apply(self, fn, recurse=True):
            state = self.quant_state
            probe = fn(torch.empty(0, dtype=state.dtype, device=state.absmax.device))
            if probe.dtype != state.dtype:
                raise TypeError(
                    f"This model's weights are stored in 4-bit and dequantize to {state.dtype}; it cannot be cast "
                    f"to {probe.dtype}. Load it again with the compute dtype you want (load_model(..., dtype=...))."
                )
            if probe.device != state.absmax.device:
                state.to(probe.device)
            return super()._apply(fn, recurse)

    return NF4Parametrization


def parametrize_nf4(module: nn.Module, name: str, state) -> None:
    """Make `module.<name>` (already the packed uint8 parameter) dequantize from NF4 on access,
    as bitsandbytes' `replace_parameter_4bit_prequantized` does, minus its process-global cache
    (see the module docstring); `state_dict()` still holds the packed weight and its state."""
    parametrize.register_parametrization(module, name, nf4_parametrization()(state), unsafe=True)
    module.register_state_dict_post_hook(partial(_bnb().nn.parametrize._parametrized_state_dict_post_hook, param_name=name))


# -- the experts forward ---------------------------------------------------------------------------


def nf4_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """An experts module's forward that dequantizes only the experts in `top_k_index`.

    hidden_states: [tokens, hidden]; top_k_index, top_k_weights: [tokens, k]. The hit experts'
    weights are stacked as a layer of `len(hit)` experts and the ids renumbered into it, so
    transformers' grouped_mm forward computes exactly what it computes on the whole layer.
    On a GPU, finding which experts were hit (`torch.unique`) costs one synchronisation per layer.
    """
    hit, renumbered = torch.unique(top_k_index, return_inverse=True)
    weights = {}
    for name, plist in self.parametrizations.items():
        weights[name] = dequantize_rows(plist.original, plist[0].quant_state, hit)
    for name, param in self.named_parameters(recurse=False):  # biases [experts, ...]; routers are elsewhere
        if param.shape[:1] == (self.num_experts,):
            weights[name] = param[hit]
    return grouped_mm_experts_forward(_HitExperts(self, weights, hit.numel()), hidden_states,
                                      renumbered.to(top_k_index.dtype), top_k_weights)


class _HitExperts:
    """An experts module seen through the experts one step hit: their weights, their count,
    and everything else (activation, gate function, flags) from the module itself."""

    def __init__(self, experts: nn.Module, weights: dict[str, torch.Tensor], num_experts: int):
        self._experts = experts
        self.__dict__.update(weights)
        self.num_experts = num_experts

    def __getattr__(self, name):
        return getattr(self._experts, name)


def dequantize_rows(packed: torch.Tensor, state, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (int64 [n]) along the first dimension of a 4-bit tensor [R, ...] (experts of a
    fused tensor, rows of an embedding), dequantized: [n, ...] in the state's dtype, bitwise equal
    to the same rows of the whole tensor dequantized.

    A row is a contiguous run of the flat tensor. When its size is a multiple of the 64-weight
    block (Mixtral-8x7B's experts: 2 x 14,336 x 4,096; embeddings 64k wide) the rows' packed
    bytes and absmax (8-bit itself, in runs of 256, with double quantization) are gathered and
    dequantized in one call; otherwise each row is read from the blocks that touch it."""
    _follow(packed, state)
    per_row = math.prod(state.shape[1:])
    if per_row % state.blocksize:
        runs = [_dequantize_range(packed, state, r * per_row, (r + 1) * per_row) for r in rows.tolist()]
        return torch.stack(runs).view(len(runs), *state.shape[1:])
    picked = packed.view(-1, per_row // 2).index_select(0, rows)
    values = _dequantize_blocks(picked, _absmax_of_rows(state, rows, per_row // state.blocksize), state)
    return values.view(rows.numel(), *state.shape[1:])


def dequantize_whole(packed: torch.Tensor, state) -> torch.Tensor:
    """A whole 4-bit tensor, dequantized as the flat run of weights it was quantized as.

    Not `bitsandbytes.functional.dequantize_4bit(packed, state)`: in bitsandbytes 0.50.2 its CPU
    kernel gets the blocks wrong when the last dimension is an odd multiple of 32 (32, 96, ...:
    errors 2-4x NF4's; tests/test_nf4_runtime.py), and blocks are runs of the flat tensor anyway."""
    _follow(packed, state)
    return _dequantize_range(packed, state, 0, math.prod(state.shape)).view(state.shape)


def _follow(packed: torch.Tensor, state) -> None:
    """Bring the state to the packed weights' device: accelerate places tensors, not their state."""
    if state.absmax.device != packed.device:
        state.to(packed.device)


def _dequantize_range(packed: torch.Tensor, state, start: int, stop: int) -> torch.Tensor:
    """Weights [start, stop) of a flattened 4-bit tensor, float in the state's dtype."""
    block = state.blocksize
    first, last = start // block, -(-stop // block)
    lo, hi = first * block, min(last * block, math.prod(state.shape))
    values = _dequantize_blocks(packed.view(-1)[lo // 2 : (hi + 1) // 2], _absmax_range(state, first, last), state,
                                numel=hi - lo)
    return values.reshape(-1)[start - lo : stop - lo]


def _dequantize_blocks(packed: torch.Tensor, absmax: torch.Tensor, state, numel: int | None = None) -> torch.Tensor:
    """`numel` weights (all of `packed` by default) from consecutive blocks with float32 `absmax`,
    the last block possibly partial: every dequantization moeviz does comes here (the bytes
    benchmarks/nf4_decode.py counts). Whole NF4 blocks on the CPU go to bitsandbytes' CPU kernel
    as its CPU backend calls it (`backends/cpu/ops.py`, `dequantize_4bit`), one block a row,
    without `functional.dequantize_4bit` and the custom-op dispatch above it, which cost about as
    much as the kernel on an expert of the bundled model; one block a row is also the kernel's
    fastest shape (~25% over one flat row) and never the odd multiples of 32 it gets wrong
    (`dequantize_whole`). Anything else goes through `functional.dequantize_4bit`."""
    functional = _bnb().functional
    numel = packed.numel() * 2 if numel is None else numel
    block = state.blocksize
    kernel = _cpu_nf4_kernel(packed, state) if numel % block == 0 else None
    if kernel is not None:
        packed = packed.contiguous()
        out = torch.empty(numel // block, block, dtype=state.dtype, device=packed.device)
        kernel(functional.get_ptr(packed), functional.get_ptr(absmax), functional.get_ptr(out), ctypes.c_longlong(block),
               ctypes.c_longlong(numel // block), ctypes.c_longlong(block))
        return out
    part = functional.QuantState(absmax=absmax, shape=(numel,), dtype=state.dtype, blocksize=block, code=state.code,
                                 quant_type=state.quant_type)
    return functional.dequantize_4bit(packed.reshape(-1, 1), part)


_CPU_NF4_KERNELS = {torch.float32: "cdequantize_blockwise_cpu_nf4_fp32", torch.bfloat16: "cdequantize_blockwise_cpu_nf4_bf16",
                    torch.float16: "cdequantize_blockwise_cpu_nf4_fp16"}


def _cpu_nf4_kernel(packed: torch.Tensor, state):
    """bitsandbytes' CPU kernel that dequantizes NF4 to the state's dtype, or None where it does
    not apply (another device or quantization type, no such kernel)."""
    if packed.device.type != "cpu" or state.quant_type != "nf4" or state.dtype not in _CPU_NF4_KERNELS:
        return None
    return _native_function(_CPU_NF4_KERNELS[state.dtype])


@cache
def _native_function(name: str):
    """A function of bitsandbytes' native library, or None: no native library loaded (bitsandbytes
    then runs its PyTorch fallbacks), or a build without it. (bitsandbytes' own wrapper answers
    every name, with a function that raises when called.)"""
    cextension = _bnb().cextension
    if isinstance(cextension.lib, cextension.ErrorHandlerMockBNBNativeLibrary):
        return None
    return getattr(cextension.lib._lib, name, None)


def _absmax_range(state, first: int, last: int) -> torch.Tensor:
    """float32 absmax of blocks [first, last). With double quantization, bitsandbytes'
    `dequantize_blockwise` runs on the whole runs of 256 that hold them, as it does on the whole
    tensor's, plus the offset: the same numbers."""
    if not state.nested:
        return state.absmax[first:last].float()
    run = state.state2.blocksize
    runs = slice(first // run, -(-last // run))
    values = _dequantize_absmax(state, state.absmax[runs.start * run : runs.stop * run], state.state2.absmax[runs])
    return values[first - runs.start * run : last - runs.start * run]


def _absmax_of_rows(state, rows: torch.Tensor, blocks: int) -> torch.Tensor:
    """float32 absmax of rows `rows` of `blocks` blocks each, concatenated. With double
    quantization and rows of whole runs of 256 blocks (experts of real models: Mixtral-8x7B's
    hold 3,584 runs), gathered by row and dequantized by bitsandbytes as in `_absmax_range`;
    otherwise entry by entry, as `dequantize_blockwise` computes each: code[q] x the nested absmax
    of its run, plus the offset."""
    if not state.nested:
        return state.absmax.view(-1, blocks).index_select(0, rows).reshape(-1).float()
    nested = state.state2
    if blocks % nested.blocksize == 0:
        codes = state.absmax.view(-1, blocks).index_select(0, rows).reshape(-1)
        scales = nested.absmax.view(-1, blocks // nested.blocksize).index_select(0, rows).reshape(-1)
        return _dequantize_absmax(state, codes, scales)
    block_ids = (rows[:, None] * blocks + torch.arange(blocks, device=rows.device)).reshape(-1)
    values = nested.code[state.absmax[block_ids].long()] * nested.absmax[block_ids // nested.blocksize]
    return (values + state.offset).float()


def _dequantize_absmax(state, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Doubly quantized absmax `codes` (uint8, whole runs but perhaps the last) with their runs'
    float32 `scales`, dequantized: float32. On the CPU in bitsandbytes' native kernel called as
    its CPU backend calls it (see `_dequantize_blocks` for why), else `dequantize_blockwise`."""
    functional = _bnb().functional
    nested = state.state2
    kernel = _native_function("cdequantize_blockwise_cpu_fp32") if codes.device.type == "cpu" else None
    if kernel is None:
        values = functional.dequantize_blockwise(codes, absmax=scales, code=nested.code, blocksize=nested.blocksize)
    else:
        codes = codes.contiguous()
        values = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
        kernel(functional.get_ptr(nested.code), functional.get_ptr(codes), functional.get_ptr(scales),
               functional.get_ptr(values), ctypes.c_longlong(nested.blocksize), ctypes.c_longlong(codes.numel()))
    return values + state.offset


def nf4_embedding_forward(module: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
    """An NF4 embedding's forward that dequantizes only the rows of the ids it looks up (one for
    a decoded token) instead of the whole table."""
    plist = module.parametrizations.weight
    rows, inverse = torch.unique(input_ids, return_inverse=True)
    weight = dequantize_rows(plist.original, plist[0].quant_state, rows)
    return nn.functional.embedding(inverse, weight, None, module.max_norm, module.norm_type, module.scale_grad_by_freq,
                                   module.sparse)


def packed_linear_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A `Linear4bit`'s forward that runs bitsandbytes' AVX512-BF16 CPU kernel on the weight it
    has packed for it, called as bitsandbytes' CPU backend calls it (`backends/cpu/ops.py`,
    `gemv_4bit`; any number of rows) without the layers above it (`Linear4bit.forward`,
    `matmul_4bit`, `functional.gemv_4bit`, the custom-op dispatch): the same numbers, without
    Python that costs more than the kernel itself on small projections such as the bundled
    model's (192 wide, 20 a token). Any other case (not packed yet: bitsandbytes packs on the
    first call; training; gradients; another device) runs `Linear4bit.forward`."""
    state = module.weight.quant_state
    if (not getattr(state, "packing_format_for_cpu", False) or module.training or x.device.type != "cpu"
            or (torch.is_grad_enabled() and x.requires_grad)):
        return type(module).forward(module, x)
    kernel = _native_function("gemv_4bit_inference_cpu_nf4_bf16")
    if kernel is None:
        return type(module).forward(module, x)
    functional = _bnb().functional
    rows = x.to(torch.bfloat16).reshape(-1, x.shape[-1]).contiguous()  # packed: the compute dtype is bf16
    out = torch.empty(rows.shape[0], state.shape[0], dtype=torch.bfloat16, device=rows.device)
    kernel(
        ctypes.c_int64(rows.shape[0]), ctypes.c_int64(state.shape[0]), ctypes.c_int64(rows.shape[1]),
        functional.get_ptr(rows), functional.get_ptr(module.weight.data), functional.get_ptr(state.absmax),
        functional.get_ptr(out), ctypes.c_int64(state.blocksize), ctypes.c_int64(rows.stride(0)),
        ctypes.c_int64(out.stride(0)))
    if module.bias is not None:
        out += module.bias.to(torch.bfloat16)
    return out.view(*x.shape[:-1], state.shape[0]).to(x.dtype)


# -- one layer at a time per model -----------------------------------------------------------------


class ExpertsLock:
    """The lock a 4-bit model's experts forwards take, one at a time (module docstring).

    Taken in a forward pre-hook and given back in a forward hook that always runs, also when the
    forward raised; a thread gives back only what it took (a pre-hook before ours may have
    raised first)."""

    def __init__(self):
        self._lock = threading.RLock()
        self._held = threading.local()

    def take(self, module, args):
        self._lock.acquire()
        self._held.depth = getattr(self._held, "depth", 0) + 1

    def give_back(self, module, args, output):
        if getattr(self._held, "depth", 0):
            self._held.depth -= 1
            self._lock.release()


def prepare_nf4_model(model: nn.Module) -> None:
    """Set up a model whose fused experts were just parametrized to NF4: one `ExpertsLock` (as
    `model.nf4_experts_lock`) around every 4-bit experts module, the hit-experts forward where
    its experts classes dispatch through transformers' experts interface, the row lookup on 4-bit
    embeddings, and the direct packed kernel on `Linear4bit`s that bitsandbytes may pack."""
    if hasattr(model, "nf4_experts_lock"):
        return
    lock = model.nf4_experts_lock = ExpertsLock()
    experts = [module for module in model.modules() if _has_4bit_experts(module)]
    for module in experts:
        module.register_forward_pre_hook(lock.take, prepend=True)
        module.register_forward_hook(lock.give_back, always_call=True)
    if any(hasattr(module, "has_gate") and hasattr(module, "is_transposed") for module in experts):
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)  # set by @use_experts_implementation
    linear4bit = _bnb().nn.Linear4bit
    for module in model.modules():
        # Only nn.Embedding's own forward is replaced: subclasses (scaled embeddings) keep theirs.
        if type(module).forward is nn.Embedding.forward and "weight" in _nf4_states(module):
            module.forward = partial(nf4_embedding_forward, module)
        elif type(module) is linear4bit and module.support_avx512bf16_for_cpu:
            module.forward = partial(packed_linear_forward, module)


def _has_4bit_experts(module: nn.Module) -> bool:
    """Whether a module holds fused expert tensors (3 or more dimensions) stored in 4-bit."""
    return any(len(state.shape) >= 3 for state in _nf4_states(module).values())


def _nf4_states(module: nn.Module) -> dict:
    """{tensor name: quantization state} of a module's 4-bit parametrized tensors."""
    return {name: plist[0].quant_state for name, plist in getattr(module, "parametrizations", {}).items()
            if hasattr(plist[0], "quant_state")}


def uses_hit_experts(model: nn.Module) -> bool:
    """Whether `model` runs `nf4_experts_forward` (else its experts classes' own forward)."""
    return getattr(model.config, "_experts_implementation", None) == EXPERTS_IMPLEMENTATION


ExpertsInterface.register(EXPERTS_IMPLEMENTATION, nf4_experts_forward)
