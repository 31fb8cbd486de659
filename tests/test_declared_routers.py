"""Every model type transformers declares a router for, built tiny and traced: moeviz either
captures it exactly, with scores consistent with the weights the experts received (or says
its scoring is unknown), or refuses it in one line naming the model type.

The list is generated from transformers itself: every model class whose
`_can_record_outputs` has "router_logits" (the declaration moeviz reads), by its config's
model_type, by the auto mappings that name such a class, and by the configs that hold a
declared config as a sub-config (a multimodal model around a MoE text model). Each is built
from its default config with every size shrunk generically (`tiny_config`), and checked as
tests/test_families.py checks the 14 hand-configured families: forward pre-hooks on each
module the model calls `experts` see what it received in the very forward pass moeviz traces.

Measured with transformers 5.24 (SUMMARY_COUNTS, asserted by `test_summary` when every type
runs; `pytest -s` prints the table): 106 model types declared; 73 built and checked exact, of
which 1 (zaya) has scoring "unknown" and 2 (phimoe, hunyuan_v1_moe) a scoring read from
ROUTER_LAYOUTS that their weights cannot show; 8 refused with a one-line message naming the
model type (vision encoders without a router, JetMoE, Doge, NLLB-MoE, ...); 25 could not be
built tiny on the CPU by the generic shrinking (default configs that do not build, MLA/mrope
sizes the generic rules break, scipy missing, audio/vision inputs), each with its reason.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers import PretrainedConfig
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from moeviz.model.capture import ROUTER_LAYOUTS, NoRoutersError, RouterLayout, trace_text
from moeviz.trace import UnknownScoringError, expert_scores

TEXT = "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b. What is 12 + 7?"
VOCAB = 400  # the tokenizer fixture's


# -- which model types declare routers ------------------------------------------------------


def _declares_routers(cls) -> bool:
    return isinstance(cls, type) and "router_logits" in (getattr(cls, "_can_record_outputs", None) or {})


def declared_model_types() -> dict[str, list[type]]:
    """{model_type: the transformers classes declared for it}. Reading only the modeling files
    that mention both names keeps this to a few seconds; the import then decides."""
    declared: dict[str, list[type]] = {}
    configs: list[type] = []
    models_dir = Path(transformers.__file__).parent / "models"
    for path in sorted(models_dir.glob("*/modeling_*.py")):
        source = path.read_text(encoding="utf-8")
        if "_can_record_outputs" not in source or "router_logits" not in source:
            continue
        package = f"transformers.models.{path.parent.name}"
        module = importlib.import_module(f"{package}.{path.stem}")
        for cls in vars(module).values():
            if _declares_routers(cls) and cls.__module__ == module.__name__:
                model_type = getattr(getattr(cls, "config_class", None), "model_type", None)
                if model_type:
                    declared.setdefault(model_type, []).append(cls)
        for config_path in path.parent.glob("configuration_*.py"):
            config_module = importlib.import_module(f"{package}.{config_path.stem}")
            configs += [c for c in vars(config_module).values()
                        if isinstance(c, type) and issubclass(c, PretrainedConfig) and c.__module__ == config_module.__name__]
    names = {cls.__name__ for classes in declared.values() for cls in classes}
    for mapping in _auto_mappings():
        for model_type, class_names in mapping.items():
            for name in class_names if isinstance(class_names, (list, tuple)) else [class_names]:
                if name in names and model_type not in declared:
                    declared[model_type] = [getattr(transformers, name)]
    for config in configs:  # multimodal wrappers around a declared text model
        subs = {getattr(sub, "model_type", None) for sub in (getattr(config, "sub_configs", None) or {}).values()}
        if config.model_type and config.model_type not in declared and subs & set(declared):
            declared[config.model_type] = []
    return dict(sorted(declared.items()))


def _auto_mappings() -> list[dict]:
    return [getattr(modeling_auto, name) for name in dir(modeling_auto)
            if name.startswith("MODEL_") and name.endswith("_MAPPING_NAMES")]


DECLARED = declared_model_types()


def model_class(model_type: str):
    """The class to build: its causal LM or seq2seq LM, else its base model, else the class
    declaring the routers."""
    for mapping in ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
                    "MODEL_MAPPING_NAMES"):
        name = getattr(modeling_auto, mapping).get(model_type)
        if isinstance(name, (list, tuple)):
            name = name[0]
        if name and hasattr(transformers, name):
            cls = getattr(transformers, name)
            if getattr(getattr(cls, "config_class", None), "model_type", model_type) == model_type:
                return cls
    concrete = [cls for cls in DECLARED[model_type] if not cls.__name__.endswith("PreTrainedModel")]
    return concrete[0] if concrete else None


# -- tiny configs ---------------------------------------------------------------------------

LAYERS = 3
# (attribute name pattern, new value from the old): sizes first matched wins.
SHRINK = [
    (r"vocab_size$", lambda v: VOCAB),
    (r"^(num_hidden_layers|num_layers|n_layers|num_decoder_layers|encoder_layers|decoder_layers)$",
     lambda v: min(v, LAYERS)),
    (r"^(first_k_dense_replace|first_k_dense|num_dense_layers)$", lambda v: min(v, 1)),
    (r"(^|_)hidden_size$|^(d_model|n_embd|dim)$", lambda v: 64),
    (r"(intermediate|ffn_hidden|^d_ff$|ffn_dim|expert_dim)", lambda v: 32),
    (r"^(num_experts|n_routed_experts|num_local_experts|moe_num_experts)$", lambda v: 8),
    (r"^(num_experts_per_tok|top_k|moe_top_k|top_k_experts|num_experts_per_token)$", lambda v: min(v, 2)),
    (r"^n_group$|^num_expert_group$", lambda v: min(v, 2)),
    (r"^topk_group$", lambda v: 1),
    (r"sparse_step$", lambda v: min(v, 2)),
    (r"shared_experts$", lambda v: min(v, 1)),
    (r"^(num_attention_heads|n_heads|n_head|num_heads|encoder_attention_heads|decoder_attention_heads)$",
     lambda v: 4),
    (r"(key_value_heads|kv_heads)$", lambda v: min(v, 2)),
    (r"lora_rank$", lambda v: 16),
    (r"head_dim$", lambda v: 16),
    (r"(_num_heads|_n_heads|num_.*_heads)$", lambda v: min(v, 2)),
    (r"(state_size|d_state|_rank$|chunk_size|conv_kernel|d_conv)", lambda v: min(v, 8)),
    (r"(max_position_embeddings|max_seq_len|n_positions)$", lambda v: min(v, 512)),
]


def tiny_config(config_class: type, last_layers: bool = False) -> PretrainedConfig:
    """`config_class`'s defaults with every size above shrunk, recursively in sub-configs;
    per-layer lists and patterns cut to the new layer count (their first layers, or their
    last: where the first are dense, or a model needs full attention last); token ids kept
    inside VOCAB."""
    return config_class(**_shrunk(config_class().to_dict(), last_layers))


# Sizes some default configs leave None although their model needs them.
UNSET = {"num_experts_per_tok": 2, "head_dim": 16, "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 32}
MOE_SWITCHES = ("enable_moe_block", "is_moe", "use_moe")  # off by default in some configs (Gemma 4, Doge)


def _shrunk(values: dict, last_layers: bool) -> dict:
    layers = next((values[n] for n in ("num_hidden_layers", "num_layers", "n_layers") if isinstance(values.get(n), int)), None)
    out = {}
    for name, value in values.items():
        if value is None and name in UNSET:
            out[name] = UNSET[name]
        elif name in MOE_SWITCHES:
            out[name] = True
        elif isinstance(value, dict) and value and all(str(key).isdigit() for key in value):
            out[name] = {key: v for key, v in value.items() if int(key) < LAYERS}  # per-layer settings
        elif isinstance(value, dict):
            out[name] = _shrunk(value, last_layers)
        elif name.endswith("key_value_heads") and value == values.get("num_attention_heads"):
            out[name] = 4  # a model that needs as many key/value heads as query heads
        elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
            rule = next((f for pattern, f in SHRINK if re.search(pattern, name)), None)
            out[name] = rule(value) if rule else value
            if name.endswith("token_id") and value >= VOCAB:
                out[name] = 1
        elif isinstance(value, (list, str)) and layers and layers > LAYERS and len(value) == layers:
            out[name] = value[-LAYERS:] if last_layers else value[:LAYERS]  # per-layer types, "M-M*E" patterns
        elif isinstance(value, list) and name.endswith(("token_id", "layers")) and all(isinstance(v, int) for v in value):
            out[name] = [v for v in value if v < (VOCAB if name.endswith("token_id") else LAYERS)] or value[:0]
        else:
            out[name] = value
    return out


def build(model_type: str):
    """A tiny model of `model_type` with random routers, or the reason it cannot be built."""
    cls = model_class(model_type)
    if cls is None:
        return None, "no model class to build"
    config_class = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else cls.config_class
    model = None
    for last_layers in (False, True):  # the first layers, else the last (MoE where the first are dense)
        try:
            torch.manual_seed(0)
            model = cls(tiny_config(config_class, last_layers)).eval()
        except Exception as error:  # noqa: BLE001 - any failure to build tiny is recorded, with its reason
            reason = f"{type(error).__name__}: {str(error)[:160]}"
            continue
        reason = "" if _has_routers(model) else "its tiny config has no MoE layer"
        reason = reason or _plain_forward_fails(model)
        if not reason:
            break
    if model is None:
        return None, reason
    with torch.no_grad():  # larger router weights, so that routing is far from uniform and ties are rare
        for name, parameter in model.named_parameters():
            if re.search(r"(\.gate|\.router|\.classifier|\.proj)\.weight$|\.gate\.layer\.weight$", name) and parameter.dim() == 2:
                parameter.normal_(0, 1.0)
    return model, ""


# -- what the experts received --------------------------------------------------------------


def traced_with_received(model, tokenizer):
    """moeviz's trace, and {experts module name: (args it was last called with, its MoE
    block's input)}."""
    received, handles, block_inputs = {}, [], {}

    def watch(name, experts, block):
        handles.append(block.register_forward_pre_hook(
            lambda m, args, kwargs: block_inputs.__setitem__(name, (args or tuple(kwargs.values()))[0].clone()),
            with_kwargs=True))
        handles.append(experts.register_forward_pre_hook(lambda m, args: received.__setitem__(
            name, ([a.clone() if isinstance(a, torch.Tensor) else a for a in args], block_inputs.get(name)))))

    for name, module in model.named_modules():
        if name.endswith(".experts"):
            watch(name, module, model.get_submodule(name.rpartition(".")[0]))
    try:
        return trace_text(model, tokenizer, TEXT), received
    finally:
        for handle in handles:
            handle.remove()


def _layer_number(name: str) -> int:
    return int(re.search(r"\.(\d+)\.", f".{name}.").group(1))


def check_exact(trace, received, encoder_decoder: bool) -> None:
    """Per MoE layer, the experts received exactly the trace's (expert, weight) pairs; the
    layer numbers are the experts modules' own."""
    def layer_id(name):
        number = _layer_number(name)
        return number + trace.encoder_layers if encoder_decoder and not name.startswith("encoder.") else number

    by_layer = {layer_id(name): args for name, args in received.items()}
    assert sorted(by_layer) == trace.layer_ids
    for position, layer in enumerate(trace.layer_ids):
        args, block_in = by_layer[layer]
        expected = torch.zeros(trace.num_tokens, trace.num_experts).scatter(
            1, torch.from_numpy(trace.topk_ids[position].astype(np.int64)), torch.from_numpy(trace.topk_weights[position]))
        if len(args) == 1:
            # Llama 4: the experts get every token once per expert, scaled by its weight (0 for
            # the experts not picked): [experts * tokens, hidden].
            hidden = block_in.reshape(-1, block_in.shape[-1])
            assert torch.equal(args[0], hidden.repeat(trace.num_experts, 1) * expected.T.reshape(-1, 1)), f"layer {layer}"
            continue
        _, ids, weights = args[:3]
        if ids.dim() == 3:  # Switch: one-hot dispatch [T, 1, E], router_probs [T, 1]
            got = ids[:, 0, :].float() * weights.float()
        else:
            got = torch.zeros(ids.shape[0], trace.num_experts).scatter(1, ids.long(), weights.float())
        if encoder_decoder and layer >= trace.encoder_layers:
            got = got[1:]  # the decoder start token, which moeviz drops so positions line up
        assert torch.equal(got, expected), f"layer {layer}"


def score_spread(trace) -> float:
    """The largest relative spread, within a token, of weight / shown score over the token's
    weighted picks (0 where weights are the scores up to the token's normalisation); for
    top-1, across the tokens of a layer."""
    spread = 0.0
    for logits, ids, weights in zip(trace.router_logits, trace.topk_ids, trace.topk_weights):
        scores = np.take_along_axis(expert_scores(logits, trace.scoring), ids.astype(np.int64), -1)
        used = weights > 1e-6 * weights.max(-1, keepdims=True)
        ratio = np.where(used, weights / np.where(used, scores, 1.0), np.nan)
        rows = ratio[used.sum(-1) >= 2] if trace.top_k > 1 else ratio[used][None]
        if rows.size:
            spread = max(spread, float(np.nanmax(np.nanmax(rows, -1) / np.nanmin(rows, -1)) - 1))
    return spread


# -- the test -------------------------------------------------------------------------------

OUTCOMES: dict[str, tuple[str, str]] = {}  # model_type -> (outcome, detail)
# Measured with transformers 5.24; `test_summary` asserts them when every type has run.
SUMMARY_COUNTS = {"declared": 106, "exact": 73, "unknown scoring": 1, "refused": 8, "not built": 25}


def _has_routers(model) -> bool:
    declared = tuple(getattr(r, "target_class", r) for m in model.modules()
                     for r in _as_list((getattr(type(m), "_can_record_outputs", None) or {}).get("router_logits")))
    return any(isinstance(m, declared) for m in model.modules())


def _as_list(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _plain_forward_fails(model) -> str:
    """"" when the model runs a forward pass without moeviz; else why not."""
    ids = torch.arange(3, 23).reshape(1, -1)
    inputs = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=False)
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {str(error)[:160]}"
    return ""


@pytest.mark.parametrize("model_type", list(DECLARED))
def test_declared_router_is_captured_exactly_or_refused(model_type, tokenizer):
    model, reason = build(model_type)
    if model is None:
        OUTCOMES[model_type] = ("not built", reason)
        pytest.skip(f"{model_type} cannot be built tiny from its config: {reason}")
    try:
        trace, received = traced_with_received(model, tokenizer)
    except NoRoutersError as error:  # also UnsupportedRouterError
        message = str(error)
        assert "\n" not in message and model.config.model_type in message
        OUTCOMES[model_type] = ("refused", message)
        return
    except Exception:
        broken = _plain_forward_fails(model)
        if broken:
            OUTCOMES[model_type] = ("not built", f"its tiny forward fails without moeviz: {broken}")
            pytest.skip(f"{model_type}: {broken}")
        raise
    check_exact(trace, received, model.config.is_encoder_decoder)
    if trace.scoring == "unknown":
        with pytest.raises(UnknownScoringError):
            trace.router_probs
        OUTCOMES[model_type] = ("unknown scoring", trace.router_class)
        return
    spread = score_spread(trace)
    if spread > 2e-2:  # only a scoring read from the router's code in ROUTER_LAYOUTS, which weights cannot show
        assert ROUTER_LAYOUTS.get(trace.router_class, RouterLayout()).scoring == trace.scoring, (
            f"{model_type}: scores ({trace.scoring}) not proportional to weights: {spread}")
        OUTCOMES[model_type] = ("exact", f"{trace.scoring} from ROUTER_LAYOUTS (weights cannot show it)")
        return
    OUTCOMES[model_type] = ("exact", f"{trace.scoring}, spread {spread:.1e}")


def test_summary():
    """The counts in the module docstring, when every declared type has run in this session."""
    if set(OUTCOMES) != set(DECLARED):
        pytest.skip("only some declared model types ran")
    counts = {"declared": len(DECLARED)}
    for outcome, _ in OUTCOMES.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    counts["exact"] = counts.get("exact", 0) + counts.get("unknown scoring", 0)
    lines = [f"{model_type:32} {outcome:16} {detail}" for model_type, (outcome, detail) in sorted(OUTCOMES.items())]
    print("\n".join(lines))
    assert counts == SUMMARY_COUNTS, "\n".join(lines)


# -- a trace whose scoring is unknown, end to end -------------------------------------------


def _unknown_trace():
    from factories import make_trace

    logits = np.random.default_rng(0).normal(size=(1, 6, 4)).astype(np.float32)
    topk = np.argsort(-logits, axis=-1)[..., :2]
    return make_trace(topk, logits, scoring="unknown")


def test_unknown_scoring_shows_raw_logits_and_computes_nothing_from_a_guess():
    from moeviz.analysis import metrics
    from moeviz.cli import summary_table
    from moeviz.views import charts

    trace = _unknown_trace()
    reloaded = type(trace).from_bytes(trace.to_bytes())
    assert reloaded.scoring == "unknown" and not reloaded.has_scores
    figure = charts.probability_heatmap(trace, 0)
    np.testing.assert_array_equal(figure.data[0].z, trace.router_logits[0].T)
    assert figure.data[0].name == "raw router logit (scoring unknown)"
    for metric in (metrics.router_entropy, metrics.balance_loss):
        with pytest.raises(UnknownScoringError, match="shows the raw logits"):
            metric(trace)
    table = summary_table(trace)
    assert "Scoring unknown" in table and "unknown router" in table


def test_unknown_scoring_on_the_pages_is_a_visible_note_not_a_guess():
    from streamlit.testing.v1 import AppTest

    trace = _unknown_trace()
    app = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=300)
    app.run()
    app.radio(key="analyse_text_source").set_value("Trace file").run()
    app.get("file_uploader")[0].set_value(("unknown.safetensors", trace.to_bytes(), "application/octet-stream"))
    app.run()
    assert not app.exception
    assert any("Shown: the raw router logits" in w.value for w in app.warning)
    assert any("balance loss and router entropy needs router scores" in i.value for i in app.info)
    assert not [m for m in app.metric if "entropy" in m.label]
