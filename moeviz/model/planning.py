"""What a model will need in memory, and the weights storage "auto" picks, decided before any
weight is read.

Sizes come from shapes: the model is built from its config.json on the meta device, and
`quantize.planned_bytes` adds up its parameters in the compute dtype (full precision) or as
`load_nf4` will store them (4-bit, quantization state included). A 4-bit load also holds two
decoder layers in the compute dtype while it quantizes them (`quantize._check_fits`). The
checkpoint's index says whether the weights are safetensors, which a 4-bit load streams.

"auto" keeps full precision when the weights fit the device's free memory with a tenth of it
left for activations, the share transformers' `device_map="auto"` keeps on one GPU
(`get_balanced_memory`); else 4-bit when that fits; else it refuses with both sizes and the
free memory. A person's explicit choice is never overridden.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import psutil  # an accelerate dependency
import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig

from moeviz.model.quantize import (
    QUANTIZATIONS,
    QuantizationError,
    largest_layer_bytes,
    planned_bytes,
    quantization_plan,
)

STORAGES = ("auto", *QUANTIZATIONS)
STORAGE_NAMES = {"none": "full precision", "nf4": "4-bit (NF4)"}
ACTIVATION_SHARE = 0.10  # of free memory, kept for activations as device_map="auto" does on one GPU
LOADING_LAYERS = 2  # decoder layers a 4-bit load holds in the compute dtype at once


def choose_storage(full_bytes: int, nf4_bytes: int | None, free_bytes: int, headroom_bytes: int) -> str | None:
    """The weights storage "auto" picks: "none" (full precision) when `full_bytes` fit in
    `free_bytes` with `headroom_bytes` to spare, else "nf4" when `nf4_bytes` (the 4-bit load's
    peak; None for a model that cannot be 4-bit) do, else None: nothing fits."""
    room = free_bytes - headroom_bytes
    if full_bytes <= room:
        return "none"
    if nf4_bytes is not None and nf4_bytes <= room:
        return "nf4"
    return None


@dataclass(frozen=True)
class MemoryPlan:
    """A model's weights in each storage against the free memory of the device it goes to."""

    model_id: str
    device: str  # "cpu", "cuda:0"
    dtype: str  # the full-precision and compute dtype, e.g. "bfloat16"
    full_bytes: int  # every weight in `dtype`
    nf4_bytes: int | None  # as load_nf4 stores them; None when the model cannot be 4-bit
    loading_bytes: int  # the layers a 4-bit load holds in `dtype` on top of nf4_bytes
    free_bytes: int
    nf4_refusal: str = ""  # why nf4_bytes is None
    stored_as: str = ""  # a checkpoint already quantized (e.g. "gptq") loads as it is stored

    @property
    def headroom_bytes(self) -> int:
        return int(self.free_bytes * ACTIVATION_SHARE)

    @property
    def nf4_peak_bytes(self) -> int | None:
        return None if self.nf4_bytes is None else self.nf4_bytes + self.loading_bytes

    @property
    def auto(self) -> str | None:
        """What "auto" picks: "none", "nf4", or None when neither fits."""
        if self.stored_as:
            return "none"
        return choose_storage(self.full_bytes, self.nf4_peak_bytes, self.free_bytes, self.headroom_bytes)

    @property
    def auto_name(self) -> str:
        """What "auto" picks, as a person reads it."""
        if self.stored_as:
            return f"the checkpoint as stored: it is already quantized ({self.stored_as})"
        return STORAGE_NAMES.get(self.auto, "nothing fits")

    def resolve(self, quantization: str) -> str:
        """`quantization` itself, or for "auto" the storage it picks. Raises ValueError, with
        both sizes and the free memory, when "auto" finds that nothing fits."""
        if quantization != "auto":
            return quantization
        if self.auto is None:
            raise ValueError(self.does_not_fit())
        return self.auto

    def does_not_fit(self) -> str:
        four_bit = (f"in 4-bit (NF4) {format_bytes(self.nf4_bytes)} "
                    f"({format_bytes(self.nf4_peak_bytes)} while loading)" if self.nf4_bytes is not None
                    else f"and it cannot be stored in 4-bit ({self.nf4_refusal})")
        advice = ("Use a GPU with more free memory, or choose full precision explicitly (quantization \"none\") "
                  "to let the layers that do not fit spill to CPU memory (slow)." if self.device.startswith("cuda")
                  else "Free some memory, or use a machine with more, or a GPU.")
        return (
            f"{self.model_id} does not fit on {self.device}: in full precision ({self.dtype}) its weights need "
            f"{format_bytes(self.full_bytes)}, {four_bit}; {format_bytes(self.free_bytes)} are free, of which "
            f"{ACTIVATION_SHARE:.0%} stays for activations. {advice}"
        )

    def rows(self) -> dict[str, str]:
        """The estimate as a person reads it, in display order."""
        full = format_bytes(self.full_bytes) + (" if it were not quantized" if self.stored_as else "")
        return {
            f"Full precision ({self.dtype})": full,
            "4-bit (NF4)": (f"{format_bytes(self.nf4_bytes)} ({format_bytes(self.nf4_peak_bytes)} while loading)"
                            if self.nf4_bytes is not None else f"not possible: {self.nf4_refusal}"),
            f"Free memory ({self.device})": f"{format_bytes(self.free_bytes)}, "
                                            f"{ACTIVATION_SHARE:.0%} kept for activations",
            "Weights storage auto picks": self.auto_name,
        }


def format_bytes(size: int) -> str:
    return f"{size / 2**30:,.2f} GiB" if size >= 2**30 else f"{size / 2**20:,.1f} MiB"


def free_memory(device: str) -> int:
    """Bytes free on `device`: the CUDA driver's count for a GPU, MemAvailable for the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return psutil.virtual_memory().available


def plan_memory(config: PretrainedConfig, checkpoint: Path | None, *, model_id: str, device: str, dtype: torch.dtype,
                double_quant: bool = True, trust_remote_code: bool = False) -> MemoryPlan:
    """The MemoryPlan of the model `config` describes, from shapes on the meta device.

    checkpoint: the folder with the checkpoint's files, or with only its index files (a hub
    id), or None when neither is known; device: "cpu" or "cuda" (the current GPU)."""
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    with init_empty_weights(include_buffers=False):
        auto_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    stored_as = _stored_as(config)
    nf4_bytes, refusal = None, f"it is already quantized ({stored_as})" if stored_as else _nf4_refusal(checkpoint)
    if not refusal:
        try:
            nf4_bytes = planned_bytes(model, quantization_plan(model), dtype, double_quant)
        except QuantizationError as error:
            refusal = str(error)
    return MemoryPlan(
        model_id=model_id, device=device, dtype=str(dtype).removeprefix("torch."),
        full_bytes=planned_bytes(model, {}, dtype, double_quant),
        nf4_bytes=nf4_bytes, loading_bytes=LOADING_LAYERS * largest_layer_bytes(model, dtype),
        free_bytes=free_memory(device), nf4_refusal=refusal, stored_as=stored_as,
    )


def _nf4_refusal(checkpoint: Path | None) -> str:
    """Why `load_nf4` could not load this checkpoint, known before reading it; "" if it can."""
    if find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    if checkpoint is None or (checkpoint / "model.safetensors.index.json").is_file():
        return ""
    if (checkpoint / "pytorch_model.bin.index.json").is_file() or (checkpoint / "pytorch_model.bin").is_file():
        return "the checkpoint is pytorch_model.bin, and a 4-bit load streams safetensors"
    return ""


def _stored_as(config: PretrainedConfig) -> str:
    existing = getattr(config, "quantization_config", None)
    if not existing:
        return ""
    method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)
    return str(method or "unknown method")
