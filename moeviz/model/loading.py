"""Find, load and place a MoE model: a local directory or a hub id, CPU or GPU.

The bundled model under assets/model loads through exactly the same path as any hub
checkpoint. `trust_remote_code` stays off unless the caller asks for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

from moeviz.model.capture import find_routers, routing_facts
from moeviz.model.planning import STORAGES, MemoryPlan, format_bytes, plan_memory
from moeviz.model.quantize import QuantizationError, load_nf4
from moeviz.model.weights import parameter_count, quantization_of, storage_bytes
from moeviz.trace import layer_label

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"
BUNDLED_MODEL = ASSETS / "model"  # the default: Mixtral-style, softmax top-2 of 8 experts
BUNDLED_DEEPSEEK = ASSETS / "model-deepseek"  # fine-grained and shared experts, sigmoid, biased selection
BUNDLED_MODELS = {
    "moeviz Mixtral-style (bundled)": BUNDLED_MODEL,
    "moeviz DeepSeek-style (bundled)": BUNDLED_DEEPSEEK,
}

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model that cannot be loaded, with a message that says why and what to do."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    model_id: str
    device: str
    plan: MemoryPlan | None = None  # the estimate "auto" decided on, when it decided

    @property
    def quantization(self) -> str:
        """How the weights are stored: "none", "nf4", ... (weights.quantization_of)."""
        return quantization_of(self.model)

    @property
    def parameter_count(self) -> int:
        return parameter_count(self.model)

    @property
    def footprint_bytes(self) -> int:
        """Memory the weights take, 4-bit quantization state included."""
        return storage_bytes(self.model)


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
    quantization: str = "auto",
    double_quant: bool = True,
    plan: MemoryPlan | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LoadedModel:
    """Load a MoE model and its tokenizer from a local directory or a hub id: a causal LM,
    or an encoder-decoder (Switch Transformers) when its config says `is_encoder_decoder`.

    device: "auto" (GPU when there is one), "cpu" or "cuda". On CUDA, accelerate places the
    layers (`device_map="auto"`), spilling to the CPU when the GPU is full.
    quantization: "auto" (full precision when it fits the device, else 4-bit, decided by
    `estimate_memory` before any weight is read; `plan` is that estimate if the caller made it
    already), "none", or "nf4": experts, attention and embeddings in 4-bit, streamed from
    safetensors layer by layer (moeviz.model.quantize); `dtype` is then the compute dtype, and on
    CUDA the whole model goes to one GPU. double_quant: 8-bit absmax too (~4.13 bits a weight).
    progress(layers done, layers) is called as a 4-bit load streams in each layer.
    """
    source = str(source)
    if quantization not in STORAGES:
        raise ModelLoadError(f"Unknown quantization {quantization!r}; choose one of {list(STORAGES)}")
    device = _device(device)
    _check_source(source)
    if quantization == "auto":
        plan = plan or estimate_memory(source, device=device, dtype=dtype, double_quant=double_quant,
                                       trust_remote_code=trust_remote_code)
        try:
            quantization = plan.resolve(quantization)
        except ValueError as error:
            raise ModelLoadError(str(error)) from error
    options = dict(dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code)
    if device == "cuda":
        options["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        auto_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        if quantization == "nf4":  # load_nf4 refuses incomplete checkpoints itself
            model, loading = load_nf4(source, device=device, dtype=options["dtype"], double_quant=double_quant,
                                      trust_remote_code=trust_remote_code, progress=progress), {"missing_keys": ()}
        else:
            model, loading = auto_class.from_pretrained(source, config=config, output_loading_info=True, **options)
    except QuantizationError as error:
        raise ModelLoadError(str(error)) from error
    except OSError as error:
        raise ModelLoadError(f"Could not load a model from {source!r}: {error}") from error
    except (ValueError, RuntimeError, SafetensorError) as error:
        raise ModelLoadError(f"Could not load the model at {source!r} (is the checkpoint complete and not corrupt?): {error}") from error
    _check_complete(source, loading)
    model.eval()
    find_routers(model)  # fail now, clearly, for a dense model
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=_display_name(source), device=device, plan=plan)


def estimate_memory(
    source: str | Path = BUNDLED_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    double_quant: bool = True,
    trust_remote_code: bool = False,
) -> MemoryPlan:
    """What the model at `source` will weigh in full precision and in 4-bit, against the free
    memory of `device`, and what quantization="auto" picks (moeviz.model.planning). Reads
    config.json and the checkpoint's index only: a hub id downloads no weights."""
    source = str(source)
    device = _device(device)
    torch_dtype = resolve_dtype(dtype, device)
    _check_source(source)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        checkpoint = Path(source).expanduser()
        if not checkpoint.is_dir():  # a hub id: its index files say which format the weights are in
            checkpoint = Path(snapshot_download(source, allow_patterns=["*.index.json"]))
        return plan_memory(config, checkpoint, model_id=_display_name(source), device=device,
                           dtype=torch_dtype, double_quant=double_quant,
                           trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ModelLoadError(f"Could not load a model from {source!r}: {error}") from error
    except (ValueError, KeyError) as error:
        raise ModelLoadError(f"Could not read the model at {source!r} from its config.json: {error}") from error


def _device(device: str) -> str:
    device = default_device() if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for, but torch sees no GPU; use device 'cpu'")
    return device


def _check_complete(source: str, loading: dict) -> None:
    """transformers fills weights missing from a checkpoint with random values and only logs
    it: the routing shown would be a random model's. Refuse instead."""
    missing = sorted(loading["missing_keys"])
    if missing:
        raise ModelLoadError(
            f"The checkpoint at {source!r} lacks {len(missing)} of the model's weights (e.g. {missing[0]}), "
            "which would be random: is model.safetensors complete and from this model?"
        )


def _check_source(source: str) -> None:
    path = Path(source).expanduser()
    looks_local = path.is_absolute() or source.startswith((".", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise ModelLoadError(f"No model directory at {source!r}: give a folder with config.json, or a hub id like 'mistralai/Mixtral-8x7B-v0.1'")
    if looks_local and not (path / "config.json").is_file():
        raise ModelLoadError(f"{source!r} has no config.json: it is not a transformers model directory")


def _display_name(source: str) -> str:
    path = Path(source)
    return bundled_name(source) or (path.name if path.is_dir() else source)


def bundled_name(source: str | Path) -> str | None:
    """The name of a bundled model's folder ("moeviz Mixtral-style (bundled)"), else None."""
    try:
        resolved = Path(source).resolve()
    except (OSError, ValueError):  # a NUL byte, a symlink loop: not a bundled model
        return None
    return next((name for name, folder in BUNDLED_MODELS.items() if resolved == folder), None)


@dataclass(frozen=True)
class ModelSummary:
    """What a loaded MoE model is and how it routes, read from its modules (no forward pass)."""

    model_id: str
    family: str  # config.model_type
    architecture: str  # the transformers model class
    layers: int  # every layer, dense ones and an encoder's included
    moe_layers: list[str]  # "layer 3", or "enc 1" / "dec 3" for an encoder-decoder model
    experts: int  # routed experts per MoE layer
    top_k: int
    scoring: str
    shared_experts: int
    router_class: str
    parameter_count: int
    device: str
    size_bytes: int  # memory the weights take, 4-bit quantization state included
    quantization: str  # "none", "nf4", ... (weights.quantization_of)

    def rows(self) -> dict[str, str]:
        """The facts as a person reads them, in display order."""
        dense = self.layers - len(self.moe_layers)
        return {
            "Model": self.model_id,
            "Family": self.family,
            "Architecture": self.architecture,
            "Layers": f"{self.layers} ({len(self.moe_layers)} MoE, {dense} dense)",
            "MoE layers": ", ".join(self.moe_layers),
            "Routed experts": str(self.experts),
            "Top-k": str(self.top_k),
            "Scoring function": self.scoring,
            "Shared experts": f"{self.shared_experts}, always active" if self.shared_experts else "none",
            "Router class": self.router_class,
            "Parameters": f"{self.parameter_count / 1e6:,.1f} M",
            "Size": format_bytes(self.size_bytes),
            "Quantization": self.quantization,
            "Device": self.device,
        }


def describe_model(loaded: LoadedModel) -> ModelSummary:
    """The summary the Models page shows. Raises NoRoutersError for a dense model."""
    facts = routing_facts(loaded.model)
    return ModelSummary(
        model_id=loaded.model_id,
        family=loaded.model.config.model_type,
        architecture=type(loaded.model).__name__,
        layers=facts.num_layers,
        moe_layers=[layer_label(n, facts.encoder_layers) for n in facts.layer_ids],
        experts=facts.num_experts,
        top_k=facts.top_k,
        scoring=facts.scoring,
        shared_experts=facts.shared_experts,
        router_class=facts.router_class,
        parameter_count=loaded.parameter_count,
        device=loaded.device,
        size_bytes=loaded.footprint_bytes,
        quantization=loaded.quantization,
    )
