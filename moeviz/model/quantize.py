"""4-bit (NF4) MoE models with bitsandbytes: quantize the experts too, stream the load, and
say what the model weighs.

Why this module exists: transformers v5's `BitsAndBytesConfig(load_in_4bit=True)` swaps only
`nn.Linear` modules for bitsandbytes' `Linear4bit`, and v5 stores experts as fused 3-D
parameters (`MixtralExperts.gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`). That recipe
leaves about 96% of Mixtral-8x7B in 16-bit: ~87 GB instead of ~24 GB (DESIGN.md §2,
bitsandbytes issue #1849).

What becomes NF4 (blocks of 64 weights with one absmax each; double quantization stores the
absmax in 8-bit as well, ~4.13 instead of ~4.5 bits a weight):
- every `nn.Linear` weight (attention, dense and shared-expert MLPs, lm_head) -> `Linear4bit`;
- every fused expert parameter, i.e. every floating parameter with 3 or more dimensions
  (`gate_up_proj`, `down_proj`, `up_proj`, ...) -> a `bitsandbytes.nn.parametrize`
  parametrization: stored in 4-bit; a forward pass dequantizes only the experts it uses, one
  layer at a time per model (`moeviz.model.nf4_experts`: at most 2.6 GiB of bf16 for a
  Mixtral-8x7B layer that uses all its experts);
- the token embedding, the same way, and an lm_head tied to it shares its 4-bit storage.
  Embeddings are a large share of small models such as the bundled one, and NF4 moves routing
  very little (tests/test_quant.py measures the agreement).
What stays in `dtype`, which is also the compute dtype: the routers (small, and routing is what
moeviz shows) and `nn.Linear`s named `*gate` such as Qwen2-MoE's `shared_expert_gate`; norms,
biases and convolutions. A model of which more than 5% would stay is refused, never loaded
mostly in 16-bit: DBRX, for one, keeps its experts as 2-D matrices.

Loading streams (`load_nf4`): the model is built on the meta device, then filled one decoder
layer at a time. A layer's tensors are read memory-mapped from the safetensors shards that
hold them, converted to v5's layout by transformers' own conversion table (the hub's Mixtral
`block_sparse_moe.experts.{e}.w1/w2/w3` -> fused `mlp.experts.gate_up_proj`/`down_proj`),
quantized on the target device, and released with their shards before the next one. The
peak is the 4-bit model plus one to two layers in 16-bit, not the 16-bit model
(tests/test_quant.py bounds it by two layers and a fixed 96 MiB; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from contextlib import ExitStack
from copy import deepcopy
from functools import partial
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub import snapshot_download
from safetensors import safe_open
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

from moeviz.model.capture import NoRoutersError, find_routers
from moeviz.model.nf4_experts import parametrize_nf4, prepare_nf4_model

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "nf4")
BLOCKSIZE = 64  # bitsandbytes' default: one absmax per 64 weights
QUANTIZE_CHUNK = 2**20  # weights quantized at a time (a multiple of BLOCKSIZE): ~20 MB of CPU scratch
PACKED_CPU_BLOCK_N = 32  # bitsandbytes' AVX512-BF16 CPU kernel packs rows in blocks of 32
MAX_UNQUANTIZED_SHARE = 0.05  # refuse a model of which a larger share of weights would stay in 16-bit

LINEAR = "Linear4bit"  # plan entries: how a weight is stored in 4-bit
PARAMETRIZED = "parametrized"


class QuantizationError(ValueError):
    """4-bit was asked for and cannot be delivered. moeviz never falls back to 16-bit silently."""


# -- what to quantize ------------------------------------------------------------------------


def quantization_plan(model: nn.Module) -> dict[str, str]:
    """{parameter name: LINEAR or PARAMETRIZED} for every weight that becomes NF4.

    Works on a model on the meta device. Raises QuantizationError for a dense model, and when
    more than 5% of the model's weights would stay in 16-bit.
    """
    try:
        kept_modules = [site.name for site in find_routers(model)]
    except NoRoutersError as error:
        raise QuantizationError(f"4-bit is for MoE models. {error}") from error
    tied = set(_tied_weights(model))
    plan = {}
    for module_name, module in model.named_modules():
        if _is_gate(module_name) or any(module_name == k or module_name.startswith(k + ".") for k in kept_modules):
            continue
        for attr, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{attr}" if module_name else attr
            if name in tied or not param.is_floating_point():
                continue
            if type(module) is nn.Linear and attr == "weight":
                plan[name] = LINEAR
            elif (isinstance(module, nn.Embedding) and attr == "weight") or (param.ndim >= 3 and not isinstance(module, _ConvNd)):
                plan[name] = PARAMETRIZED
    _refuse_mostly_unquantized(model, plan, tied)
    return plan


def _is_gate(module_name: str) -> bool:
    """A router or a gate like Qwen2-MoE's `shared_expert_gate` (but not an MLP's `gate_proj`)."""
    last = module_name.rsplit(".", 1)[-1]
    return last == "gate" or last.endswith("_gate")


def _tied_weights(model: nn.Module) -> dict[str, str]:
    """{tied parameter: the parameter it shares}, e.g. {"lm_head.weight": "model.embed_tokens.weight"}."""
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


def _refuse_mostly_unquantized(model: nn.Module, plan: dict[str, str], tied: set[str]) -> None:
    sizes = {name: p.numel() for name, p in model.named_parameters() if name not in tied}
    kept = {name: size for name, size in sizes.items() if name not in plan}
    share = sum(kept.values()) / max(1, sum(sizes.values()))
    if share > MAX_UNQUANTIZED_SHARE:
        largest = ", ".join(sorted(kept, key=kept.get, reverse=True)[:3])
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise QuantizationError(
            f"moeviz cannot quantize this {model_type} model to 4-bit: {share:.0%} of its weights would "
            f"stay in 16-bit (the largest: {largest}). moeviz quantizes nn.Linear and nn.Embedding "
            "weights and fused expert tensors of 3 or more dimensions, and these are none of those. "
            "Load the model without 4-bit."
        )


# -- bitsandbytes ------------------------------------------------------------------------------


def _bitsandbytes(device: torch.device):
    """bitsandbytes, after checking that it can quantize to NF4 on `device`."""
    try:
        import bitsandbytes
        import bitsandbytes.nn.parametrize  # noqa: F401  (replace_parameter_4bit)
    except ImportError as error:
        raise QuantizationError(
            f"4-bit (NF4) needs bitsandbytes with `bitsandbytes.nn.parametrize` ({error}). "
            "Install it with `pip install -U bitsandbytes`, or load the model without 4-bit."
        ) from error
    try:
        bitsandbytes.functional.quantize_4bit(torch.ones(BLOCKSIZE, device=device), quant_type="nf4")
    except Exception as error:  # each backend fails its own way: missing library, no kernel, ...
        raise QuantizationError(
            f"bitsandbytes {bitsandbytes.__version__} cannot quantize to 4-bit on {device}: {error}. "
            "Install a bitsandbytes build for this device, or load the model without 4-bit."
        ) from error
    return bitsandbytes


def _place(model: nn.Module, name: str, tensor: torch.Tensor, kind: str | None, *, device, dtype, double_quant: bool) -> None:
    """Put one tensor into the model: quantized when `kind` says so, else as it is (a copy)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    ref = module._buffers[attr] if attr in module._buffers else getattr(module, attr)
    if tuple(tensor.shape) != tuple(ref.shape):
        raise QuantizationError(
            f"The checkpoint's {name} has shape {tuple(tensor.shape)}, but the model built from its "
            f"config.json expects {tuple(ref.shape)}: do the weights and config.json belong together?"
        )
    if kind is None:
        value = tensor.to(device=device, dtype=ref.dtype if ref.is_floating_point() else tensor.dtype, copy=True)
        if attr in module._buffers:
            module._buffers[attr] = value
        else:
            setattr(module, attr, nn.Parameter(value, requires_grad=False))
        return
    bnb = sys.modules["bitsandbytes"]
    packed, state = _quantize_nf4(tensor.to(device=device, dtype=dtype), double_quant)
    if kind == LINEAR:
        module = _linear4bit(model, module_name, dtype, double_quant)
        module.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
            compress_statistics=double_quant, quant_type="nf4", bnb_quantized=True, module=module,
        )
        module.quant_state = state
    else:
        setattr(module, attr, nn.Parameter(packed, requires_grad=False))
        parametrize_nf4(module, attr, state)


def _quantize_nf4(tensor: torch.Tensor, double_quant: bool):
    """`bitsandbytes.functional.quantize_4bit(tensor, nf4, blocksize 64)`, with the same result,
    but QUANTIZE_CHUNK weights at a time: bitsandbytes' CPU kernel needs about 20 bytes of
    scratch per weight, 19 GB for one of Mixtral-8x7B's fused expert tensors."""
    functional = sys.modules["bitsandbytes"].functional
    flat = tensor.reshape(-1)
    parts = [functional.quantize_4bit(flat[start : start + QUANTIZE_CHUNK], blocksize=BLOCKSIZE, quant_type="nf4")
             for start in range(0, flat.numel(), QUANTIZE_CHUNK)]
    packed = torch.cat([part for part, _ in parts]) if len(parts) > 1 else parts[0][0]
    absmax = torch.cat([state.absmax for _, state in parts]) if len(parts) > 1 else parts[0][1].absmax
    common = dict(shape=tensor.shape, dtype=tensor.dtype, blocksize=BLOCKSIZE, code=parts[0][1].code, quant_type="nf4")
    if not double_quant:
        return packed, functional.QuantState(absmax=absmax, **common)
    offset = absmax.mean()  # double quantization, as quantize_4bit does it
    nested_absmax, nested = functional.quantize_blockwise(absmax - offset, blocksize=256)
    return packed, functional.QuantState(absmax=nested_absmax, offset=offset, state2=nested, **common)


def _linear4bit(model: nn.Module, module_name: str, dtype: torch.dtype, double_quant: bool) -> nn.Module:
    """The Linear4bit at `module_name`, swapped in (on the meta device, bias kept) the first time."""
    bnb = sys.modules["bitsandbytes"]
    linear = model.get_submodule(module_name)
    if isinstance(linear, bnb.nn.Linear4bit):
        return linear
    with torch.device("meta"):
        new = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=dtype,
            compress_statistics=double_quant, quant_type="nf4",
        )
    if linear.bias is not None:
        new.bias = linear.bias
    new.train(linear.training)  # bitsandbytes' packed CPU kernel runs only in eval mode
    new.support_avx512bf16_for_cpu = new.support_avx512bf16_for_cpu and packed_cpu_kernel_fits(new, dtype)
    model.set_submodule(module_name, new)
    return new


def packed_cpu_kernel_fits(linear: nn.Module, dtype: torch.dtype) -> bool:
    """Whether bitsandbytes may run this Linear4bit with its AVX512-BF16 CPU kernel.

    On a CPU with AVX512-BF16, bitsandbytes 0.50.2 repacks a Linear4bit's weight for that kernel
    on its first forward pass (`nn/modules.py`, when `support_avx512bf16_for_cpu`). The repacking
    asserts `out_features % 32 == 0` (a 49,155-token vocabulary fails) and reshapes the absmax
    to one row per output, so `in_features` must be a whole number of 64-weight blocks (a
    32-wide input fails); the kernel casts the input to bfloat16 whatever the compute dtype. So
    moeviz lets it run only where it is the same computation: bfloat16 compute and shapes it can
    pack. Everywhere else the portable path runs (dequantize, then a matmul in the compute
    dtype), as on CPUs without the feature.
    """
    return (dtype == torch.bfloat16 and linear.out_features % PACKED_CPU_BLOCK_N == 0
            and linear.in_features % BLOCKSIZE == 0)


def _tie(model: nn.Module) -> None:
    """Tie weights again after their source was replaced: an lm_head tied to a 4-bit embedding
    shares its packed storage and quantization state."""
    for target, source in _tied_weights(model).items():
        target_module, _, target_attr = target.rpartition(".")
        source_module, _, source_attr = source.rpartition(".")
        tmod, smod = model.get_submodule(target_module), model.get_submodule(source_module)
        if parametrize.is_parametrized(smod, source_attr):
            plist = smod.parametrizations[source_attr]
            if parametrize.is_parametrized(tmod, target_attr):
                parametrize.remove_parametrizations(tmod, target_attr, leave_parametrized=False)
            setattr(tmod, target_attr, plist.original)
            parametrize.register_parametrization(tmod, target_attr, plist[0], unsafe=True)
        else:
            setattr(tmod, target_attr, getattr(smod, source_attr))


def quantize_model(model: PreTrainedModel, *, double_quant: bool = True) -> PreTrainedModel:
    """Quantize a model that is already in memory, in place, exactly as `load_nf4` does while
    streaming (each weight keeps its dtype as compute dtype). This needs the 16-bit model in
    memory first; for big models use `load_nf4`."""
    plan = quantization_plan(model)
    for device in {model.get_parameter(name).device for name in plan}:
        _bitsandbytes(device)
    for name, kind in plan.items():
        tensor = model.get_parameter(name).data  # each weight stays where it is (device_map="auto" spreads them)
        _place(model, name, tensor, kind, device=tensor.device, dtype=tensor.dtype, double_quant=double_quant)
    _tie(model)
    prepare_nf4_model(model)
    return model


# -- streaming load ----------------------------------------------------------------------------


def load_nf4(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    trust_remote_code: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> PreTrainedModel:
    """Load a MoE model from safetensors with its experts, attention and embeddings in NF4,
    streaming one decoder layer at a time (see the module docstring).

    dtype: the compute dtype, in which the 4-bit weights are dequantized and the routers and
    norms are kept. device: "cpu" or "cuda" (the whole model goes to the current GPU; a model
    that does not fit is refused before loading). progress(done, total) is called after each
    group of tensors is placed: the ones outside the layers, then each decoder layer.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    _bitsandbytes(device)
    directory = _checkpoint_directory(str(source), trust_remote_code)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None):
        existing = config.quantization_config
        method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)
        raise QuantizationError(
            f"This checkpoint is already quantized ({method or 'unknown method'}); load it without "
            "moeviz's 4-bit option."
        )
    files = _weight_files(directory)
    with init_empty_weights(include_buffers=False):
        auto_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    plan = quantization_plan(model)
    if device.type == "cuda":
        _check_fits(model, plan, device, dtype, double_quant)
    reader = _ShardReader()
    layers = _transforms_by_layer(model, files, reader)
    for done, layer in enumerate(layers, 1):
        for target, transform in layer.items():
            try:
                converted = transform.convert(target, model=model, config=model.config)
            finally:
                reader.close()  # a tensor still viewing a shard keeps that mapping alive until placed
            while converted:  # pop: each 16-bit tensor is freed as soon as it is placed
                name, tensor = converted.popitem()
                tensor = tensor[0] if isinstance(tensor, list) else tensor
                _place(model, name, tensor, plan.get(name), device=device, dtype=dtype, double_quant=double_quant)
                del tensor
        _return_freed_memory()
        if progress is not None:
            progress(done, len(layers))
    _tie(model)
    _finish(model, device)
    prepare_nf4_model(model)
    return model.eval()


def _checkpoint_directory(source: str, trust_remote_code: bool) -> Path:
    """A local directory as it is; a hub id through the local cache (or a download)."""
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser()
    patterns = ["*.json", "*.safetensors"] + (["*.py"] if trust_remote_code else [])
    return Path(snapshot_download(source, allow_patterns=patterns))


def _weight_files(directory: Path) -> dict[str, Path]:
    """{tensor name: safetensors file holding it}, from the shard index or the single file."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {key: directory / name for key, name in weight_map.items()}
    elif (directory / "model.safetensors").is_file():
        with safe_open(directory / "model.safetensors", framework="pt") as handle:
            files = dict.fromkeys(handle.keys(), directory / "model.safetensors")
    else:
        raise QuantizationError(
            f"4-bit loading streams safetensors files, and {directory} has neither model.safetensors "
            "nor model.safetensors.index.json (a pytorch_model.bin checkpoint cannot be streamed)."
        )
    missing = sorted({path.name for path in files.values() if not path.is_file()})
    if missing:
        raise QuantizationError(f"The checkpoint in {directory} is incomplete: missing {', '.join(missing)}")
    return files


class _ShardReader:
    """Reads tensors from safetensors shards, opening each shard on first use. After `close()`
    a shard stays mapped only while a tensor read from it is alive, so the pages read for one
    weight leave the process once it is converted and placed."""

    def __init__(self):
        self._stack = ExitStack()
        self._open = {}

    def read(self, path: Path, key: str) -> torch.Tensor:
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(path, framework="pt", device="cpu"))
        return self._open[path].get_tensor(key)

    def close(self) -> None:
        self._open.clear()
        self._stack.close()


def _transforms_by_layer(model: PreTrainedModel, files: dict[str, Path], reader: _ShardReader) -> list[dict]:
    """Checkpoint tensors grouped by decoder layer, as transformers' own renamings and
    converters (e.g. per-expert `w1`/`w3` -> fused `gate_up_proj`) with lazy readers; tensors
    outside the layers (embeddings, final norm, lm_head) come first."""
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    expected = model.state_dict()
    layers: dict[int, dict] = defaultdict(dict)
    for key in sorted(files, key=dot_natural_key):  # natural order: experts 0, 1, ..., 10 stack in order
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if target not in expected and key in expected:
            target, pattern = key, None
        if target not in expected:
            logger.info("Checkpoint tensor %s has no place in the model; skipped", key)
            continue
        layer = layers[_layer_number(target)]
        transform = layer.setdefault(target, deepcopy(by_pattern[pattern]) if pattern else WeightRenaming(key, target))
        transform.add_tensor(target, key, pattern or key, partial(reader.read, files[key], key))
    return [layers[number] for number in sorted(layers)]


def _return_freed_memory() -> None:
    """Give the heap pages of the layer just loaded back to the OS. glibc keeps freed blocks
    under 32 MiB in its heap, where the long-lived 4-bit tensors allocated between them pin
    them: on the CPU the heap would otherwise grow by a fraction of every layer."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to do
        return None


_LIBC = _glibc() if sys.platform.startswith("linux") else None


def _layer_number(name: str) -> int:
    """The decoder layer a parameter belongs to (`model.layers.12.mlp...` -> 12), -1 outside the layers."""
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def _finish(model: nn.Module, device: torch.device) -> None:
    """Check that every weight arrived, and move the buffers built at init (RoPE) to `device`."""
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise QuantizationError(
            f"The checkpoint lacks {len(missing)} weights the model needs, e.g. {', '.join(missing[:3])}: "
            "is it complete, and does config.json belong to it?"
        )
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)


def _check_fits(model: nn.Module, plan: dict[str, str], device: torch.device, dtype: torch.dtype, double_quant: bool) -> None:
    free, _ = torch.cuda.mem_get_info(device)
    need = planned_bytes(model, plan, dtype, double_quant) + 2 * largest_layer_bytes(model, dtype)
    if need > free:
        raise QuantizationError(
            f"In 4-bit this model needs about {need / 2**30:.1f} GiB on {device} (the 4-bit weights plus "
            f"two layers in {dtype} while loading), but only {free / 2**30:.1f} GiB are free. moeviz's 4-bit "
            "loader puts the whole model on one GPU; it does not spill layers to the CPU as device_map='auto' "
            "does for 16-bit models. Free GPU memory, use a larger GPU, or load the model without 4-bit."
        )


# -- what a model weighs -----------------------------------------------------------------------


def nf4_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one NF4 tensor of `numel` weights with its quantization state, as bitsandbytes
    stores it: packed weights, the 16-entry float32 code book, and one absmax per block: float32,
    or with double quantization uint8 plus a float32 per 256 blocks, an offset and the 256-entry
    float32 table (every tensor has its own copy: 1 KiB, which only toy models notice)."""
    blocks = math.ceil(numel / BLOCKSIZE)
    absmax = blocks + 4 * math.ceil(blocks / 256) + 4 + 256 * 4 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + absmax + 16 * 4


def planned_bytes(model: nn.Module, plan: dict[str, str], dtype: torch.dtype, double_quant: bool) -> int:
    """What `model` will weigh once the weights in `plan` are NF4 and the others in `dtype`,
    computed from shapes alone (a model on the meta device will do)."""
    tied = set(_tied_weights(model))
    total = 0
    for name, param in model.named_parameters():
        if name in tied:
            continue
        if name in plan:
            total += nf4_bytes(param.numel(), double_quant)
        else:
            total += param.numel() * (dtype.itemsize if param.is_floating_point() else param.element_size())
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def largest_layer_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the largest decoder layer's weights in `dtype`, for a model not quantized yet
    (e.g. on the meta device: a 4-bit parameter would count its packed bytes as weights)."""
    sizes = defaultdict(int)
    for name, param in model.named_parameters():
        sizes[_layer_number(name)] += param.numel() * dtype.itemsize
    return max((size for layer, size in sizes.items() if layer >= 0), default=0)
