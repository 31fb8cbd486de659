"""RoutingTrace: the routing of one text through one MoE model, as plain data.

Everything the app shows is a pure function of a trace. A trace holds numpy arrays and
JSON-able fields only, and saves to a single safetensors file (tensors + JSON metadata in the
header): no pickle, so a trace made on a GPU box opens safely on a laptop.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

TRACE_FORMAT = "moeviz-trace"
# Format versions. 1: every file written before issue 13. Its fields grew under that number
# (generated_from, quantization, shared_experts, encoder_layers, engine; ids-only files without
# topk_weights and router_logits), each with a default, so every v1 file reads as v2.
# 2: the same fields, numbered so that an older moeviz says the file is newer than it.
TRACE_VERSION = 2
# How router_logits become router scores: softmax over the experts; sigmoid or sqrt(softplus)
# per expert (DeepSeek-V3, DeepSeek-V4); "probabilities" when the router already returns a
# distribution (Gemma 4); "unknown" when moeviz could not tell (`moeviz.model.capture`): then
# the logits are shown raw and nothing is computed from a guess.
SCORING_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus", "probabilities", "unknown")
_ARRAY_FIELDS = ("topk_ids", "topk_weights", "router_logits")

# What a trace file may claim. Each array the pages allocate is a file's own array (safetensors
# checks its bytes against the file's length), one computed from it, or sized by these caps:
# the largest fixed-size ones (experts x experts co-activation, layers x experts in Compare
# layers) stay at 8 MB however small the file.
MAX_EXPERTS = 1024  # routed experts per layer; transformers 5.24 configs go to 512 (Doge's 16,384 product keys aside)
MAX_TOP_K = 32  # experts per token; transformers 5.24 configs go to 12 below that expert count
MAX_LAYERS = 1024  # layers of the model, dense ones included
MAX_NAME_CHARS = 4096  # model id (it may be a local path), model type, router class, ...
MAX_TOKEN_CHARS = 1024  # one token's text: a vocabulary piece, or \xNN escapes of its bytes
MAX_TOKEN_ID = 2**31 - 1  # vocabularies index tokens with int32
MAX_SPECIAL_IDS = 4096  # special tokens a tokenizer declares (BOS, EOS, PAD, chat markers, ...)
MAX_COUNT = 2**53 - 1  # counts kept as JSON numbers stay exact up to here


class TraceFileError(ValueError):
    """A file that is not a readable moeviz trace."""


class IdsOnlyError(ValueError):
    """A trace without router logits (or weights) asked for something computed from them."""


class UnknownScoringError(ValueError):
    """A trace whose scoring function is unknown asked for router scores."""


IDS_ONLY = (
    "this trace has expert ids only (from a serving engine): router probabilities need router logits"
)


def layer_label(layer_id: int, encoder_layers: int = 0) -> str:
    """How people name a layer: "layer 3" in a decoder-only model; "enc 1" or "dec 3", the
    true number within its stack, in an encoder-decoder model whose first `encoder_layers`
    layer ids are the encoder's."""
    if not encoder_layers:
        return f"layer {layer_id}"
    if layer_id < encoder_layers:
        return f"enc {layer_id}"
    return f"dec {layer_id - encoder_layers}"


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """Routing of one text through one model.

    topk_ids:      int32[layers, tokens, k]    experts the model actually used, by weight
    topk_weights:  float32[layers, tokens, k]  their mixing weights, as the model applied them
    router_logits: float32[layers, tokens, experts]  raw router outputs before scoring

    A serving engine (vLLM, SGLang: `moeviz.runs.engines`) reports expert ids only: its traces
    have `topk_weights` and `router_logits` None (`has_weights`, `has_logits`), `engine`
    names it, and slot 0 is the engine's first slot. Everything counted from ids works;
    what needs router scores raises `IdsOnlyError`.

    `layer_ids` are the true decoder-layer numbers of the MoE layers (dense layers are absent
    from the arrays but counted in `num_layers`). `offsets` are character spans of each token
    in `text`; special tokens have empty spans.

    An encoder-decoder model's layers are numbered in the order the forward pass runs them:
    encoder layers 0 .. encoder_layers - 1, then each decoder layer n as encoder_layers + n,
    so every layer id stays unique; `layer_label` names each with its stack and true number
    ("enc 1", "dec 3") and `layer_stacks` gives the stack of each array row.

    `shared_experts` counts the experts every token uses besides its routed top-k (DeepSeek,
    Qwen2-MoE, Llama 4): they are not routed, so they appear in no array.
    """

    model_id: str
    model_type: str
    num_experts: int
    top_k: int
    scoring: str
    num_layers: int
    layer_ids: list[int]
    text: str
    tokens: list[str]
    token_ids: list[int]
    offsets: list[tuple[int, int]]
    topk_ids: np.ndarray
    topk_weights: np.ndarray | None
    router_logits: np.ndarray | None
    input_token_count: int = -1  # tokens in the whole input before the token limit cut it
    router_class: str = ""
    quantization: str = "none"  # weights as stored: "none", "nf4", "nf4-linear-only" (moeviz.model.quantize)
    generated_from: int = -1  # index of the first generated token; -1 when nothing was generated
    shared_experts: int = 0  # always-active experts per MoE layer, beside the routed ones
    encoder_layers: int = 0  # layers of an encoder stack numbered first; 0 for a decoder-only model
    engine: str = ""  # the serving engine that recorded the ids ("vllm", "sglang"); "" for moeviz's own capture
    special_ids: list[int] = field(default_factory=list)  # ids the tokenizer calls special (BOS, EOS, PAD); [] when unknown
    stop_reason: str = ""  # why generation stopped: "eos", "max_new_tokens", "token_limit", "context"; "" when nothing was generated

    def __post_init__(self):
        if self.input_token_count < 0:
            object.__setattr__(self, "input_token_count", len(self.tokens))
        object.__setattr__(self, "offsets", [tuple(map(int, o)) for o in self.offsets])
        self._validate()

    def _validate(self) -> None:
        layers, tokens, k = len(self.layer_ids), len(self.tokens), self.top_k
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"a trace needs 1 <= top_k <= num_experts, got top_k {k} of {self.num_experts} experts")
        if not layers:
            raise ValueError("a trace needs at least one MoE layer, got no layer ids")
        if self.scoring not in SCORING_FUNCTIONS:
            raise ValueError(f"scoring must be one of {SCORING_FUNCTIONS}, got {self.scoring!r}")
        if len(self.token_ids) != tokens or len(self.offsets) != tokens:
            raise ValueError(
                f"{tokens} tokens but {len(self.token_ids)} token ids and {len(self.offsets)} offsets"
            )
        expected = {
            "topk_ids": (layers, tokens, k),
            "topk_weights": (layers, tokens, k),
            "router_logits": (layers, tokens, self.num_experts),
        }
        for name, shape in expected.items():
            if name != "topk_ids" and getattr(self, name) is None:
                continue  # ids only, from a serving engine
            actual = getattr(self, name).shape
            if actual != shape:
                raise ValueError(f"{name} has shape {actual}, expected [layers, tokens, ...] = {shape}")
        if self.topk_ids.size and not (0 <= self.topk_ids.min() and self.topk_ids.max() < self.num_experts):
            raise ValueError(f"topk_ids must lie in [0, {self.num_experts}), got {self.topk_ids.min()}..{self.topk_ids.max()}")
        if self.shared_experts < 0:
            raise ValueError(f"shared_experts must be 0 or more, got {self.shared_experts}")
        if not 0 <= self.encoder_layers <= self.num_layers:
            raise ValueError(f"encoder_layers must lie in [0, num_layers = {self.num_layers}], got {self.encoder_layers}")

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def truncated(self) -> bool:
        return self.input_token_count > self.num_tokens

    @property
    def generated(self) -> bool:
        return 0 <= self.generated_from < self.num_tokens

    @property
    def special(self) -> np.ndarray:
        """bool[tokens]: the tokens whose id the tokenizer calls special (none when unknown)."""
        return np.isin(np.asarray(self.token_ids, dtype=np.int64), np.asarray(self.special_ids, dtype=np.int64))

    @property
    def has_logits(self) -> bool:
        return self.router_logits is not None

    @property
    def has_weights(self) -> bool:
        return self.topk_weights is not None

    @property
    def has_scores(self) -> bool:
        """Router scores can be computed: logits and weights are here and the scoring is known."""
        return self.has_logits and self.has_weights and self.scoring != "unknown"

    @property
    def router_probs(self) -> np.ndarray:
        """float32[layers, tokens, experts]: router scores with the model's own scoring function.
        Raises IdsOnlyError for a trace without router logits, UnknownScoringError when its
        scoring function is unknown."""
        if self.router_logits is None:
            raise IdsOnlyError(IDS_ONLY)
        return expert_scores(self.router_logits, self.scoring).astype(np.float32)

    @property
    def first_choice(self) -> np.ndarray:
        """int32[layers, tokens]: the highest-weighted expert of each token."""
        return self.topk_ids[..., 0]

    @property
    def layer_stacks(self) -> list[str]:
        """The stack of each MoE layer in the arrays: "encoder" or "decoder"."""
        return ["encoder" if n < self.encoder_layers else "decoder" for n in self.layer_ids]

    def layer_label(self, layer_id: int) -> str:
        """How people name layer `layer_id` (MoE or dense), see `layer_label`."""
        return layer_label(layer_id, self.encoder_layers)

    def layer_index(self, layer_id: int) -> int:
        """Position of layer `layer_id` in the arrays."""
        try:
            return self.layer_ids.index(layer_id)
        except ValueError:
            raise ValueError(
                f"layer {layer_id} has no router in this trace; MoE layers are {self.layer_ids}"
            ) from None

    # -- files ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The trace as one safetensors file: arrays as tensors (absent ones left out),
        everything else as JSON."""
        tensors = {
            name: np.ascontiguousarray(getattr(self, name)) for name in _ARRAY_FIELDS if getattr(self, name) is not None
        }
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _ARRAY_FIELDS}
        header = {"format": TRACE_FORMAT, "version": str(TRACE_VERSION), "fields": json.dumps(meta)}
        return safetensors.numpy.save(tensors, metadata=header)

    @classmethod
    def from_bytes(cls, data: bytes) -> RoutingTrace:
        """The trace in a trace file's bytes. Every field is checked against its bounds, the
        others and the arrays' shapes before an array is loaded; anything this moeviz cannot
        read or show raises TraceFileError saying what is wrong."""
        header = _read_safetensors_header(data)
        metadata = _trace_metadata(header)
        try:
            shapes = _declared_shapes(header)
            meta = json.loads(metadata["fields"])
            _check_fields(meta, shapes)
            tensors = safetensors.numpy.load(data)  # checks the arrays' bytes against the file's length
            _check_dtypes(tensors)
            return cls(**meta, **{name: tensors.get(name) for name in _ARRAY_FIELDS})
        except (KeyError, TypeError, ValueError, RecursionError, safetensors.SafetensorError) as error:
            raise TraceFileError(f"This moeviz trace file is damaged: {error}") from error

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        path = Path(path)
        if not path.is_file():
            raise TraceFileError(f"No trace file at {path}")
        return cls.from_bytes(path.read_bytes())


def expert_scores(logits: np.ndarray, scoring: str) -> np.ndarray:
    """float64[..., experts]: the scores `scoring` (one of SCORING_FUNCTIONS but "unknown")
    gives router logits float[..., experts]."""
    logits = np.asarray(logits, dtype=np.float64)
    if scoring == "softmax":
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x < -709: the score is then 0
        if scoring == "sigmoid":
            return 1.0 / (1.0 + np.exp(-logits))
        if scoring == "sqrtsoftplus":
            return np.sqrt(np.logaddexp(0.0, logits))
    if scoring == "probabilities":
        return logits
    raise UnknownScoringError(
        "moeviz could not tell how this model's router turns its logits into scores (none of softmax, "
        "sigmoid, sqrt-softplus or ready probabilities matches the weights it gave the experts), so it shows "
        "the raw logits and computes no probabilities, entropy or balance loss from a guess."
    )


def _read_safetensors_header(data: bytes) -> dict:
    """The JSON header of a safetensors file: an 8-byte little-endian length, then that many
    bytes of JSON. Read by hand so that a damaged file gets a clear message."""
    if len(data) < 8:
        raise TraceFileError(f"This file is too short to be a moeviz trace ({len(data)} bytes).")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise TraceFileError(
            "This is not a moeviz trace, or it is truncated: its header claims "
            f"{header_len} bytes but the file has {len(data)}."
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep, a 5,000-digit number
        raise TraceFileError("This is not a moeviz trace: its header is not JSON.") from None
    if not isinstance(header, dict):
        raise TraceFileError("This is not a moeviz trace: its header is not a JSON object.")
    return header


def _trace_metadata(header: dict) -> dict:
    """The `__metadata__` of a trace file's header, once its format and version are ones this
    moeviz reads."""
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise TraceFileError("This is not a moeviz trace: its header's __metadata__ is not a JSON object.")
    if metadata.get("format") != TRACE_FORMAT:
        raise TraceFileError(
            "This safetensors file is not a moeviz trace (it may be model weights): "
            "its header has no 'format: moeviz-trace'. Open a file saved by moeviz."
        )
    version = metadata.get("version")
    if not (isinstance(version, str) and re.fullmatch(r"[1-9][0-9]{0,8}", version)):
        raise TraceFileError(
            f"This moeviz trace file is damaged: its format version {_shown(version)} is not a version number."
        )
    if int(version) > TRACE_VERSION:
        raise TraceFileError(
            f"This trace was made by a newer moeviz (format v{version}); this moeviz reads up to "
            f"v{TRACE_VERSION}. Update moeviz to open it."
        )
    if not isinstance(metadata.get("fields"), str):
        raise TraceFileError("This moeviz trace file is damaged: its header has no fields.")
    return metadata


def _shown(value) -> str:
    """A value as JSON, cut short enough for an error message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What each field annotation must be in a file's JSON, and each array's dtype kind.
_JSON_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": _is_int,
    "list[int]": lambda v: isinstance(v, list) and all(map(_is_int, v)),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list[tuple[int, int]]": lambda v: isinstance(v, list)
    and all(isinstance(x, list) and len(x) == 2 and all(map(_is_int, x)) for x in v),
}
_ARRAY_KINDS = {"topk_ids": "iu", "topk_weights": "f", "router_logits": "f"}
_NUMPY_DTYPES = {"F16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL"}
_NAME_FIELDS = ("model_id", "model_type", "scoring", "router_class", "quantization", "engine", "stop_reason")


def _declared_shapes(header: dict) -> dict[str, tuple[int, ...]]:
    """The shape of each array a trace file's header declares: topk_ids, and topk_weights and
    router_logits unless the trace has expert ids only; 3-D, in a dtype numpy reads."""
    declared = {name: info for name, info in header.items() if name != "__metadata__"}
    unknown = [name for name in declared if name not in _ARRAY_FIELDS]
    if unknown:
        raise ValueError(f"it holds arrays a moeviz trace does not have: {_shown(unknown)}")
    if "topk_ids" not in declared:
        raise ValueError("it has no topk_ids array")
    shapes = {}
    for name, info in declared.items():
        dtype, shape = (info.get("dtype"), info.get("shape")) if isinstance(info, dict) else (None, None)
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"{name} has dtype {_shown(dtype)}, which numpy cannot read")
        if not (isinstance(shape, list) and len(shape) == 3 and all(map(_is_int, shape))):
            raise ValueError(f"{name} has shape {_shown(shape)}; expected 3 dimensions [layers, tokens, ...]")
        shapes[name] = tuple(shape)
    return shapes


def _check_fields(meta, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse what the constructor would take but no chart can show. A file is untrusted
    input: a token that is a number, a float expert id, a repeated layer or a lone surrogate
    (which Streamlit cannot send to the browser) would otherwise crash a page later, and a
    size the arrays do not bear out (10^5 experts) would make a page allocate far more than
    the file holds."""
    if not isinstance(meta, dict):
        raise ValueError("its fields are not a JSON object")
    for field in fields(RoutingTrace):
        check = _JSON_CHECKS.get(field.type)
        if field.name in meta and check is not None and not check(meta[field.name]):
            raise ValueError(f"{field.name} must be {field.type}, got {_shown(meta[field.name])}")
    missing = [f.name for f in fields(RoutingTrace)
               if f.default is MISSING and f.default_factory is MISSING and f.name not in _ARRAY_FIELDS and f.name not in meta]
    if missing:
        raise ValueError(f"it has no {', '.join(missing)}")
    _check_sizes(meta, shapes)
    _check_text(meta)


def _check_sizes(meta: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every count in bounds and consistent with the others and with the arrays' shapes."""
    experts, k, layers = meta["num_experts"], meta["top_k"], meta["num_layers"]
    _check_range("num_experts", experts, 1, MAX_EXPERTS)
    _check_range("top_k", k, 1, min(experts, MAX_TOP_K))
    _check_range("num_layers", layers, 1, MAX_LAYERS)
    _check_range("encoder_layers", meta.get("encoder_layers", 0), 0, layers)
    _check_range("shared_experts", meta.get("shared_experts", 0), 0, MAX_EXPERTS)
    layer_ids = meta["layer_ids"]
    if not layer_ids:
        raise ValueError("it has no MoE layers: layer_ids is empty")
    if len(set(layer_ids)) != len(layer_ids) or not all(0 <= n < layers for n in layer_ids):
        raise ValueError(f"layer_ids {_shown(layer_ids)} must be distinct layers in [0, num_layers = {layers})")
    tokens = len(meta["tokens"])
    if not tokens:
        raise ValueError("it holds no tokens")
    if meta.get("input_token_count", -1) != -1:
        _check_range("input_token_count", meta["input_token_count"], tokens, MAX_COUNT)
    _check_range("generated_from", meta.get("generated_from", -1), -1, tokens)
    expected = {
        "topk_ids": (len(layer_ids), tokens, k),
        "topk_weights": (len(layer_ids), tokens, k),
        "router_logits": (len(layer_ids), tokens, experts),
    }
    for name, shape in shapes.items():
        if shape != expected[name]:
            raise ValueError(
                f"{name} has shape {shape}, expected [layers, tokens, ...] = {expected[name]} from its "
                f"{len(layer_ids)} layer ids, {tokens} tokens, top_k {k} and {experts} experts"
            )


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low:,}, {high:,}], got {_shown(value)}")


def _check_text(meta: dict) -> None:
    """Names, tokens, token ids and character spans within bounds; no lone surrogate."""
    for name in _NAME_FIELDS:
        if len(meta.get(name, "")) > MAX_NAME_CHARS:
            raise ValueError(f"{name} has {len(meta[name]):,} characters; at most {MAX_NAME_CHARS:,}")
    long = next((i for i, token in enumerate(meta["tokens"]) if len(token) > MAX_TOKEN_CHARS), None)
    if long is not None:
        raise ValueError(f"token {long} has {len(meta['tokens'][long]):,} characters; a token has at most {MAX_TOKEN_CHARS:,}")
    if len(meta.get("special_ids", [])) > MAX_SPECIAL_IDS:
        raise ValueError(f"special_ids lists {len(meta['special_ids']):,} ids; at most {MAX_SPECIAL_IDS:,}")
    if not all(0 <= n <= MAX_TOKEN_ID for n in [*meta["token_ids"], *meta.get("special_ids", [])]):
        raise ValueError(f"token_ids and special_ids must lie in [0, {MAX_TOKEN_ID:,}], got "
                         f"{_shown(meta['token_ids'])} and {_shown(meta.get('special_ids', []))}")
    length = len(meta["text"])
    outside = next((i for i, (a, b) in enumerate(meta["offsets"]) if not 0 <= a <= b <= length), None)
    if outside is not None:
        raise ValueError(
            f"offset {outside} {_shown(meta['offsets'][outside])} is not a span of the {length:,}-character text"
        )
    try:
        json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(error.object[error.start])
        raise ValueError(f"its text holds U+{code:04X}, half of a UTF-16 surrogate pair, not a character") from None


def _check_dtypes(tensors: dict[str, np.ndarray]) -> None:
    for name, array in tensors.items():
        kinds = _ARRAY_KINDS[name]
        if array.dtype.kind not in kinds or (kinds == "iu" and not np.can_cast(array.dtype, np.int64)):
            raise ValueError(f"{name} has dtype {array.dtype}; expected {'integers' if kinds == 'iu' else 'floats'}")
