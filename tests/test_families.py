"""Every major MoE family, captured exactly: for a tiny random model of each, the trace holds
what its experts modules received, at the model's true layer numbers.

"Received" is observed independently of moeviz, with forward pre-hooks on every module the
model calls `experts`, during the very forward pass moeviz captures. Each family's
expectations (MoE layers, scoring, shared experts) are written from its config here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from streamlit.testing.v1 import AppTest

from moeviz.model.capture import (
    ROUTER_LAYOUTS,
    NoRoutersError,
    UnsupportedRouterError,
    decide_scoring,
    find_routers,
    routing_facts,
    trace_text,
)
from moeviz.model.loading import LoadedModel, describe_model, load_model

TEXT = "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b. What is 12 + 7?"
SMALL = dict(vocab_size=400, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@dataclass(frozen=True)
class Family:
    config: type
    model: type
    options: dict
    layers: list[str]  # expected MoE layer labels, true numbers
    scoring: str = "softmax"
    shared_experts: int = 0
    router_class: str = ""


FAMILIES = {
    "mixtral": Family(tf.MixtralConfig, tf.MixtralForCausalLM, dict(
        SMALL, intermediate_size=48, num_hidden_layers=3, num_local_experts=6, num_experts_per_tok=2),
        ["layer 0", "layer 1", "layer 2"], router_class="MixtralTopKRouter"),
    # decoder_sparse_step=2: layers 1 and 3 are MoE; the shared expert is 2 routed experts wide.
    "qwen2_moe": Family(tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, dict(
        SMALL, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=48,
        num_hidden_layers=4, num_experts=8, num_experts_per_tok=3, decoder_sparse_step=2, norm_topk_prob=False),
        ["layer 1", "layer 3"], shared_experts=2, router_class="Qwen2MoeTopKRouter"),
    "qwen3_moe": Family(tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, dict(
        SMALL, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=3, num_experts=8,
        num_experts_per_tok=2, mlp_only_layers=[0], head_dim=8),
        ["layer 1", "layer 2"], router_class="Qwen3MoeTopKRouter"),
    "olmoe": Family(tf.OlmoeConfig, tf.OlmoeForCausalLM, dict(
        SMALL, intermediate_size=48, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, eos_token_id=1),
        ["layer 0", "layer 1"], router_class="OlmoeTopKRouter"),
    # Group-limited greedy: 8 experts in 4 groups, top-3 from the best 2 groups; layer 0 dense.
    "deepseek_v2": Family(tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM, dict(
        SMALL, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, routed_scaling_factor=1.5, q_lora_rank=None, kv_lora_rank=16,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8),
        ["layer 1", "layer 2"], shared_experts=2, router_class="DeepseekV2TopkRouter"),
    "deepseek_v3": Family(tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, dict(
        SMALL, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, n_routed_experts=16,
        num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=8, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        ["layer 1", "layer 2"], scoring="sigmoid", shared_experts=1, router_class="DeepseekV3TopkRouter"),
    "gpt_oss": Family(tf.GptOssConfig, tf.GptOssForCausalLM, dict(
        SMALL, intermediate_size=32, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
        head_dim=8, sliding_window=16),
        ["layer 0", "layer 1"], router_class="GptOssTopKRouter"),
    # rope_theta and clip_qkv: DbrxAttention reads both and the 5.24 config defaults break it;
    # real DBRX checkpoints set them.
    "dbrx": Family(tf.DbrxConfig, tf.DbrxForCausalLM, dict(
        vocab_size=400, d_model=32, n_heads=4, n_layers=2, max_seq_len=256,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=48, moe_num_experts=8, moe_top_k=2)),
        ["layer 0", "layer 1"], router_class="DbrxRouter"),
    # MoE in every other layer (1 and 3), attention in layers 0 and 2, Mamba in 1 and 3.
    "jamba": Family(tf.JambaConfig, tf.JambaForCausalLM, dict(
        SMALL, intermediate_size=48, num_hidden_layers=4, num_experts=8, num_experts_per_tok=2,
        expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=0,
        mamba_d_state=4, mamba_d_conv=2, mamba_expand=2, mamba_dt_rank=4),
        ["layer 1", "layer 3"], router_class="JambaTopKRouter"),
    "granitemoe": Family(tf.GraniteMoeConfig, tf.GraniteMoeForCausalLM, dict(
        SMALL, intermediate_size=48, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2),
        ["layer 0", "layer 1"], router_class="GraniteMoeTopKRouter"),
    "phimoe": Family(tf.PhimoeConfig, tf.PhimoeForCausalLM, dict(
        SMALL, intermediate_size=48, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2),
        ["layer 0", "layer 1"], router_class="PhimoeTopKRouter"),
    # The text model of Llama 4: MoE every other layer, one shared expert, sigmoid top-1.
    "llama4": Family(tf.Llama4TextConfig, tf.Llama4ForCausalLM, dict(
        SMALL, intermediate_size=32, intermediate_size_mlp=48, num_hidden_layers=4, num_local_experts=8,
        num_experts_per_tok=1, interleave_moe_layer_step=2, head_dim=8),
        ["layer 1", "layer 3"], scoring="sigmoid", shared_experts=1, router_class="Llama4Router"),
    "glm4_moe": Family(tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM, dict(
        SMALL, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
        routed_scaling_factor=1.8, head_dim=8),
        ["layer 1", "layer 2"], scoring="sigmoid", shared_experts=1, router_class="Glm4MoeTopkRouter"),
    # Top-1 softmax renormalised over the one pick: every weight is 1, so the weights cannot
    # show the scoring; ROUTER_LAYOUTS states it from HunYuanMoEV1Gate's code.
    "hunyuan_v1_moe": Family(tf.HunYuanMoEV1Config, tf.HunYuanMoEV1ForCausalLM, dict(
        SMALL, intermediate_size=48, num_hidden_layers=2, num_experts=8, moe_topk=1, head_dim=8),
        ["layer 0", "layer 1"], shared_experts=1, router_class="HunYuanMoEV1Gate"),
    # Encoder and decoder of 4 blocks each, blocks 1 and 3 sparse; a capacity of 3 tokens per
    # expert makes the router drop tokens.
    "switch_transformers": Family(tf.SwitchTransformersConfig, tf.SwitchTransformersForConditionalGeneration, dict(
        vocab_size=400, d_model=32, d_kv=8, d_ff=48, num_layers=4, num_decoder_layers=4, num_heads=4,
        num_experts=8, encoder_sparse_step=2, decoder_sparse_step=2, expert_capacity=3),
        ["enc 1", "enc 3", "dec 1", "dec 3"], router_class="SwitchTransformersTop1Router"),
}


def build(name: str, **overrides):
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = family.model(family.config(**{**family.options, **overrides})).eval()
    # Random routers with larger weights, so that routing is far from uniform and ties are rare.
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if re.search(r"(\.gate|\.router(\.layer|\.classifier)?)\.weight$", parameter_name):
                parameter.normal_(0, 1.0)
    return model


def _layer_label(module_name: str, encoder_decoder: bool) -> str:
    number = int(re.search(r"\.(\d+)\.", module_name).group(1))
    if not encoder_decoder:
        return f"layer {number}"
    return f"{'enc' if module_name.startswith('encoder.') else 'dec'} {number}"


def traced_with_experts_inputs(model, tokenizer, text: str = TEXT):
    """moeviz's trace, and what each MoE layer's experts module received in that same forward
    pass: {layer label: (args, MoE block input)}. The first call per layer is kept: when a trace's
    weights cannot show the scoring, moeviz probes one MoE block again after the forward."""
    encoder_decoder = model.config.is_encoder_decoder
    received, handles = {}, []

    def watch(name, experts, block):
        label = _layer_label(name, encoder_decoder)
        state = {}
        handles.append(block.register_forward_pre_hook(lambda m, args: state.__setitem__("block_in", args[0].clone())))

        def first_call(module, args):
            if label not in received:
                received[label] = ([a.clone() for a in args], state["block_in"])

        handles.append(experts.register_forward_pre_hook(first_call))

    for name, module in model.named_modules():
        if name.endswith(".experts"):
            watch(name, module, model.get_submodule(name.rpartition(".")[0]))
    try:
        trace = trace_text(model, tokenizer, text)
    finally:
        for handle in handles:
            handle.remove()
    return trace, received


def applied_weights(args, num_experts: int) -> torch.Tensor:
    """float[tokens, experts]: the weight each expert got for each token, from what the
    experts module received: (hidden, top_k_index [T, k], top_k_weights [T, k]), or Switch's
    (hidden, one-hot dispatch [T, 1, E], router_probs [T, 1])."""
    _, selection, weights = args
    if selection.dim() == 3:
        return selection[:, 0, :].float() * weights.float()
    dense = torch.zeros(selection.shape[0], num_experts)
    return dense.scatter(1, selection.long(), weights.float())


def trace_weights(trace, position: int) -> torch.Tensor:
    """The same float[tokens, experts] matrix from the trace's top-k ids and weights."""
    dense = torch.zeros(trace.num_tokens, trace.num_experts)
    ids = torch.from_numpy(trace.topk_ids[position].astype(np.int64))
    return dense.scatter(1, ids, torch.from_numpy(trace.topk_weights[position]))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_capture_equals_what_the_experts_received(name, tokenizer):
    family = FAMILIES[name]
    model = build(name)
    trace, received = traced_with_experts_inputs(model, tokenizer)

    labels = [trace.layer_label(n) for n in trace.layer_ids]
    assert labels == family.layers == sorted(received, key=family.layers.index)
    assert trace.model_type == model.config.model_type
    assert (trace.scoring, trace.shared_experts, trace.router_class) == (family.scoring, family.shared_experts,
                                                                        family.router_class)
    facts = routing_facts(model)  # what the Models page says, read without a forward pass
    assert (facts.layer_ids, facts.num_experts, facts.top_k) == (trace.layer_ids, trace.num_experts, trace.top_k)
    for position, label in enumerate(labels):
        args, block_in = received[label]
        expected = trace_weights(trace, position)
        if len(args) == 1:
            # Llama 4: the experts get every token once per expert, scaled by its weight
            # (0 for the experts not picked): [experts * tokens, hidden].
            hidden = block_in.reshape(-1, block_in.shape[-1])
            assert torch.equal(args[0], hidden.repeat(trace.num_experts, 1) * expected.T.reshape(-1, 1))
            continue
        got = applied_weights(args, trace.num_experts)
        if trace.layer_stacks[position] == "decoder" and model.config.is_encoder_decoder:
            got = got[1:]  # the decoder start token, which moeviz drops so positions line up
        assert torch.equal(got, expected), f"{name} {label}"
        if args[1].dim() == 2:  # top-k ids: the same experts for every token
            np.testing.assert_array_equal(np.sort(args[1].numpy(), -1), np.sort(trace.topk_ids[position], -1))
    assert (trace.topk_weights[..., 0] >= trace.topk_weights[..., -1]).all()


def test_every_family_table_entry_is_a_router_of_a_tested_family():
    tested = {family.router_class for family in FAMILIES.values()}
    assert set(ROUTER_LAYOUTS) <= tested


def test_dbrx_experts_hooks_are_removed(tokenizer):
    model = build("dbrx")
    trace_text(model, tokenizer, TEXT)
    assert all(not site.block.experts._forward_pre_hooks and not site.module._forward_hooks
               for site in find_routers(model))


def test_layer_ids_are_true_layer_numbers_with_dense_layers_counted(tokenizer):
    trace = trace_text(build("deepseek_v3"), tokenizer, TEXT)
    assert trace.layer_ids == [1, 2] and trace.num_layers == 3  # first_k_dense_replace=1
    trace = trace_text(build("jamba"), tokenizer, TEXT)
    assert trace.layer_ids == [1, 3] and trace.num_layers == 4


# -- DeepSeek-V3: biased, group-limited selection ---------------------------------------------


def test_deepseek_v3_trace_holds_the_biased_selection_and_unbiased_scores(tokenizer):
    model = build("deepseek_v3")
    # A large correction bias on experts 0-3 (all of group 0) makes the router pick exactly
    # them for every token, whatever their scores: plain top-4 of the scores would not.
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.zero_()
            layer.mlp.gate.e_score_correction_bias[:4] = 10.0
    trace, _ = traced_with_experts_inputs(model, tokenizer)

    assert (np.sort(trace.topk_ids, -1) == [0, 1, 2, 3]).all()
    scores = trace.router_probs  # sigmoid of the logits: no bias in them
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-trace.router_logits.astype(np.float64))), rtol=1e-6)
    plain = np.sort(np.argsort(-scores, -1)[..., :4], -1)
    assert (plain != [0, 1, 2, 3]).any(-1).mean() > 0.5
    # Weights: the unbiased scores of the picks, normalised (norm_topk_prob), times 2.5.
    picked = np.take_along_axis(scores, trace.topk_ids.astype(np.int64), -1)
    np.testing.assert_allclose(trace.topk_weights, 2.5 * picked / picked.sum(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(trace.topk_weights.sum(-1), 2.5, rtol=1e-5)


# -- Switch Transformers: encoder and decoder, top-1 with a capacity --------------------------


def test_switch_trace_lines_up_encoder_and_decoder_tokens(tokenizer):
    model = build("switch_transformers")
    trace = trace_text(model, tokenizer, TEXT)
    assert trace.layer_ids == [1, 3, 5, 7] and trace.encoder_layers == 4 and trace.num_layers == 8
    assert trace.layer_stacks == ["encoder", "encoder", "decoder", "decoder"]
    assert trace.top_k == 1 and trace.num_tokens == len(tokenizer(TEXT)["input_ids"])
    # Over capacity (3 tokens per expert): dropped tokens keep their choice, with weight 0.
    dropped = trace.topk_weights[..., 0] == 0
    assert dropped.any() and not dropped.all()
    assert (np.bincount(trace.topk_ids[0, ~dropped[0], 0], minlength=8) <= 3).all()
    np.testing.assert_array_equal(trace.topk_ids[..., 0], trace.router_logits.argmax(-1))
    reloaded = type(trace).from_bytes(trace.to_bytes())
    assert reloaded.layer_stacks == trace.layer_stacks and reloaded.layer_label(5) == "dec 1"


def test_switch_loads_from_a_local_directory(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build("switch_transformers")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded.model).__name__ == "SwitchTransformersForConditionalGeneration"
    np.testing.assert_array_equal(trace_text(loaded.model, loaded.tokenizer, TEXT).topk_ids,
                                  trace_text(model, tokenizer, TEXT).topk_ids)


# -- what the Models page shows ---------------------------------------------------------------


@pytest.mark.parametrize("name, rows", [
    ("deepseek_v3", {"Family": "deepseek_v3", "Layers": "3 (2 MoE, 1 dense)", "MoE layers": "layer 1, layer 2",
                     "Routed experts": "16", "Top-k": "4", "Scoring function": "sigmoid",
                     "Shared experts": "1, always active", "Router class": "DeepseekV3TopkRouter"}),
    ("switch_transformers", {"Family": "switch_transformers", "Layers": "8 (4 MoE, 4 dense)",
                             "MoE layers": "enc 1, enc 3, dec 1, dec 3", "Routed experts": "8", "Top-k": "1",
                             "Scoring function": "softmax", "Shared experts": "none"}),
    ("dbrx", {"Routed experts": "8", "Top-k": "2", "Router class": "DbrxRouter"}),
    ("llama4", {"Family": "llama4_text", "Top-k": "1", "Shared experts": "1, always active"}),
])
def test_describe_model(name, rows, tokenizer):
    model = build(name)
    summary = describe_model(LoadedModel(model=model, tokenizer=tokenizer, model_id="tiny", device="cpu"))
    assert summary.parameter_count == sum(p.numel() for p in model.parameters())
    shown = summary.rows()
    assert {key: shown[key] for key in rows} == rows
    assert shown["Architecture"] == type(model).__name__


# -- a dense model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    config = tf.LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    tf.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-qwen2-moe")
    build("qwen2_moe").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_dense_model_is_refused_clearly(tokenizer):
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    for call in (find_routers, lambda m: describe_model(LoadedModel(m, tokenizer, "llama", "cpu"))):
        with pytest.raises(NoRoutersError, match=r"\(llama\) has no MoE routers.*dense model"):
            call(model)


APP = str(Path(__file__).resolve().parent.parent / "app.py")


def test_dense_model_in_the_app_is_an_error_and_the_app_stays_usable(monkeypatch, dense_dir, moe_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MOEVIZ_MODEL", str(dense_dir))
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    assert not app.exception
    assert any("has no MoE routers" in e.value for e in app.sidebar.error)
    app.switch_page("app_pages/models.py").run()
    assert not app.exception and any("No model is loaded" in i.value for i in app.info)

    app.sidebar.text_input(key="model_source").set_value(str(moe_dir)).run()
    assert not app.exception and not app.sidebar.error
    shown = dict(zip(app.table[0].value.index, app.table[0].value.iloc[:, 0]))
    assert shown["Family"] == "qwen2_moe"
    assert shown["Layers"] == "4 (2 MoE, 2 dense)"
    assert shown["Shared experts"] == "2, always active"
    assert shown["Router class"] == "Qwen2MoeTopKRouter"


# -- scoring decided from the weights ----------------------------------------------------------


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


LOGITS = np.array([[[2.0, 0.5, -1.0, 1.0], [0.0, 3.0, 1.0, -2.0]]])  # [layers, tokens, experts]
IDS = np.array([[[0, 3], [1, 2]]])


@pytest.mark.parametrize("weights, declared, expected", [
    # Mixtral: softmax, top-2 renormalised: 1 / (1 + e^(1-2)) = 0.731 for token 0.
    (np.take_along_axis(_softmax(LOGITS), IDS, -1) / np.take_along_axis(_softmax(LOGITS), IDS, -1).sum(-1, keepdims=True),
     None, "softmax"),
    # DeepSeek-V3: sigmoid of the picks, normalised, times routed_scaling_factor 2.5.
    (2.5 * (s := 1 / (1 + np.exp(-np.take_along_axis(LOGITS, IDS, -1)))) / s.sum(-1, keepdims=True), None, "sigmoid"),
    # Weights no scoring function gives (ratios 1 : 1 where the scores differ): unknown, or
    # what the model declares.
    (np.full((1, 2, 2), 0.5), None, "unknown"),
    (np.full((1, 2, 2), 0.5), "softmax", "softmax"),
])
def test_decide_scoring(weights, declared, expected):
    assert decide_scoring(LOGITS, weights, IDS, declared) == expected


def test_decide_scoring_top1_needs_one_factor_across_tokens():
    """Top-1: the weight / score ratio must be one constant per layer (Llama 4: sigmoid, 1)."""
    ids = IDS[..., :1]
    sigmoid = 1 / (1 + np.exp(-np.take_along_axis(LOGITS, ids, -1)))
    assert decide_scoring(LOGITS, sigmoid, ids) == "sigmoid"
    one_token = decide_scoring(LOGITS[:, :1], sigmoid[:, :1], ids[:, :1])
    assert one_token == "unknown"  # a single token fits every function: nothing to tell them apart


def test_gemma4_router_probabilities_are_not_softmaxed_twice(tokenizer):
    """Gemma 4's router returns probabilities at output[0] and keeps k in config.top_k_experts
    (issue 13: a bare TypeError, and with k patched, softmax applied twice)."""
    config = tf.Gemma4TextConfig(**{**SMALL, "num_key_value_heads": 4}, intermediate_size=48, num_hidden_layers=2,
                                 enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=16,
                                 head_dim=8, global_head_dim=8, layer_types=["sliding_attention", "full_attention"],
                                 hidden_size_per_layer_input=0, vocab_size_per_layer_input=400)
    torch.manual_seed(0)
    model = tf.Gemma4ForCausalLM(config).eval()
    trace = trace_text(model, tokenizer, TEXT)
    facts = routing_facts(model)
    assert (trace.scoring, facts.scoring, facts.top_k, facts.num_experts) == ("probabilities", "probabilities", 2, 8)
    probs = trace.router_logits.astype(np.float64)  # what the router returned: a distribution
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(trace.router_probs, trace.router_logits)
    from moeviz.analysis.metrics import router_entropy
    expected = -(probs * np.log2(probs)).sum(-1)
    np.testing.assert_allclose(router_entropy(trace), expected, rtol=1e-5)


@pytest.mark.parametrize("config, model_class", [
    (lambda: tf.MiniMaxM2Config(**SMALL, intermediate_size=48, num_hidden_layers=2, num_local_experts=8,
                                num_experts_per_tok=2, head_dim=8), tf.MiniMaxM2ForCausalLM),
    (lambda: tf.Dots1Config(**SMALL, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
                            n_group=1, topk_group=1, head_dim=8), tf.Dots1ForCausalLM),
])
def test_sigmoid_routers_outside_the_table_are_scored_with_sigmoid(config, model_class, tokenizer):
    """Issue 13: MiniMax-M2 and Dots1 were shown softmax scores; their routers use sigmoid."""
    torch.manual_seed(0)
    model = model_class(config()).eval()
    trace = trace_text(model, tokenizer, TEXT)
    assert trace.router_class not in ROUTER_LAYOUTS and trace.scoring == "sigmoid"
    picked = np.take_along_axis(trace.router_probs, trace.topk_ids.astype(np.int64), -1).astype(np.float64)
    ratio = trace.topk_weights / picked  # 1 / (sum of the picks) if norm_topk_prob, else 1, per token
    np.testing.assert_allclose(ratio[..., 0], ratio[..., 1], rtol=1e-4)
    softmax = np.take_along_axis(_softmax(trace.router_logits.astype(np.float64)), trace.topk_ids.astype(np.int64), -1)
    assert not np.allclose((trace.topk_weights / softmax)[..., 0], (trace.topk_weights / softmax)[..., 1], rtol=1e-2)


def test_no_k_anywhere_is_a_one_line_refusal_naming_the_model_type():
    model = build("mixtral")
    for module in model.modules():
        if hasattr(module, "top_k"):
            module.top_k = None
    model.config.num_experts_per_tok = 0
    with pytest.raises(UnsupportedRouterError, match=r"^moeviz cannot tell how many experts each token uses in this "
                                                     r"mixtral model: [^\n]*top_k_experts[^\n]*$"):
        routing_facts(model)
