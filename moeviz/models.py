"""Find, load and place a MoE model: a local directory or a hub id, CPU or GPU.

The bundled model under assets/model loads through exactly the same path as any hub
checkpoint. `trust_remote_code` stays off unless the caller asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from moeviz.capture import find_routers

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "model"

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model that cannot be loaded, with a message that says why and what to do."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    model_id: str
    device: str

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` is bfloat16 on a GPU and float32 on the CPU (bf16 matmuls are slow on most CPUs)."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"Unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if DTYPES[dtype] is not None:
        return DTYPES[dtype]
    return torch.bfloat16 if device == "cuda" else torch.float32


def load_model(
    source: str | Path = BUNDLED_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal-LM MoE model and its tokenizer from a local directory or a hub id.

    device: "auto" (GPU when there is one), "cpu" or "cuda". On CUDA, accelerate places the
    layers (`device_map="auto"`), spilling to the CPU when the GPU is full.
    """
    source = str(source)
    device = default_device() if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for, but torch sees no GPU; use device 'cpu'")
    _check_source(source)
    options = dict(dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code)
    if device == "cuda":
        options["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, **options)
    except OSError as error:
        raise ModelLoadError(f"Could not load a model from {source!r}: {error}") from error
    except (ValueError, RuntimeError, SafetensorError) as error:
        raise ModelLoadError(f"Could not load the model at {source!r} (is the checkpoint complete and not corrupt?): {error}") from error
    model.eval()
    find_routers(model)  # fail now, clearly, for a dense model
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=_display_name(source), device=device)


def _check_source(source: str) -> None:
    path = Path(source).expanduser()
    looks_local = path.is_absolute() or source.startswith((".", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise ModelLoadError(f"No model directory at {source!r}: give a folder with config.json, or a hub id like 'mistralai/Mixtral-8x7B-v0.1'")
    if looks_local and not (path / "config.json").is_file():
        raise ModelLoadError(f"{source!r} has no config.json: it is not a transformers model directory")


def _display_name(source: str) -> str:
    path = Path(source)
    if path.resolve() == BUNDLED_MODEL:
        return "moeviz bundled Mixtral (assets/model)"
    return path.name if path.is_dir() else source
