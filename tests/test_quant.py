"""4-bit (NF4) loading: every expert weight really is 4-bit, the streamed load of a hub-layout
checkpoint is exact, its peak memory is bounded, routing agrees with 16-bit, bad input is refused."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import _random_model, tiny_mixtral_config
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    DbrxConfig,
    DbrxForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from moeviz.model import quantize, weights
from moeviz.model.capture import trace_text
from moeviz.model.loading import BUNDLED_MODEL, ModelLoadError, load_model
from moeviz.trace import RoutingTrace

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.nn.parametrize import Bnb4bitParametrization  # noqa: E402

# Tiny, but not so tiny that bitsandbytes' fixed ~1 KiB of state per tensor dominates.
MIXTRAL = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512)
QWEN2_MOE = dict(vocab_size=400, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                 shared_expert_intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2, max_position_embeddings=512)
INPUT_IDS = torch.tensor([[1, 5, 9, 33, 200, 7, 8, 100, 42, 399]])


def mixtral_hub_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """v5 Mixtral weights in the layout of the hub's Mixtral checkpoints: per-expert w1 (gate),
    w3 (up) and w2 (down) under `block_sparse_moe`, the router as `block_sparse_moe.gate`."""
    hub = {}
    for name, tensor in state.items():
        prefix = name.rsplit(".mlp.", 1)[0] + ".block_sparse_moe."
        if name.endswith(".mlp.experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                hub[f"{prefix}experts.{e}.w1.weight"], hub[f"{prefix}experts.{e}.w3.weight"] = gate[e], up[e]
        elif name.endswith(".mlp.experts.down_proj"):
            for e in range(tensor.shape[0]):
                hub[f"{prefix}experts.{e}.w2.weight"] = tensor[e]
        elif name.endswith(".mlp.gate.weight"):
            hub[prefix + "gate.weight"] = tensor
        else:
            hub[name] = tensor
    return {name: t.contiguous().clone() for name, t in hub.items()}


def qwen2_moe_hub_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """v5 Qwen2-MoE weights as the hub stores them: per-expert gate_proj, up_proj, down_proj."""
    hub = {}
    for name, tensor in state.items():
        prefix = name.rsplit(".", 1)[0] + "."
        if name.endswith(".mlp.experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                hub[f"{prefix}{e}.gate_proj.weight"], hub[f"{prefix}{e}.up_proj.weight"] = gate[e], up[e]
        elif name.endswith(".mlp.experts.down_proj"):
            for e in range(tensor.shape[0]):
                hub[f"{prefix}{e}.down_proj.weight"] = tensor[e]
        else:
            hub[name] = tensor
    return {name: t.contiguous().clone() for name, t in hub.items()}


FAMILIES = {
    "mixtral": (MixtralForCausalLM, MixtralConfig, MIXTRAL, mixtral_hub_layout),
    "qwen2_moe": (Qwen2MoeForCausalLM, Qwen2MoeConfig, QWEN2_MOE, qwen2_moe_hub_layout),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def hub_checkpoint(request, tmp_path_factory, tokenizer):
    """(directory, original float32 model) of a tiny MoE saved in the hub's per-expert layout."""
    model_class, config_class, sizes, hub_layout = FAMILIES[request.param]
    model = _random_model(model_class, config_class(**sizes))
    path = tmp_path_factory.mktemp(f"hub-{request.param}")
    model.config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_file(hub_layout(model.state_dict()), path / "model.safetensors", metadata={"format": "pt"})
    return path, model


def test_nf4_stores_every_expert_weight_in_4bit_at_under_030_of_16bit(hub_checkpoint):
    path, original = hub_checkpoint
    loaded = load_model(path, quantization="nf4")
    model = loaded.model
    experts = [m for name, m in model.named_modules() if name.endswith("mlp.experts")]
    assert experts and all(set(m.parametrizations) == {"gate_up_proj", "down_proj"} for m in experts)
    for module in experts:
        for name, plist in module.parametrizations.items():
            logical = getattr(original.get_submodule(_name_of(model, module)), name)
            assert plist.original.dtype == torch.uint8
            assert plist.original.numel() == math.ceil(logical.numel() / 2)  # two weights a byte
            assert isinstance(plist[0], Bnb4bitParametrization) and plist[0].quant_state.shape == logical.shape
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = {name for name, m in linears.items() if not isinstance(m, bnb.nn.Linear4bit)}
    assert kept == {name for name in linears if name.endswith("shared_expert_gate")}
    assert all(m.weight.dtype == torch.uint8 for name, m in linears.items() if name not in kept)
    assert model.get_input_embeddings().parametrizations.weight.original.dtype == torch.uint8
    assert all(m.weight.dtype == torch.float32 for name, m in model.named_modules() if name.endswith("mlp.gate"))

    sixteen_bit = 2 * sum(p.numel() for p in original.parameters())
    assert loaded.parameter_count == sum(p.numel() for p in original.parameters())
    assert loaded.footprint_bytes <= 0.30 * sixteen_bit
    # The estimate from shapes alone (what benchmarks/ uses for Mixtral-8x7B) is exact.
    plan = quantize.quantization_plan(original)
    assert quantize.planned_bytes(original, plan, torch.float32, double_quant=True) == loaded.footprint_bytes
    assert weights.quantization_of(model) == "nf4"


def _name_of(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def test_nf4_streamed_hub_layout_equals_quantizing_from_pretrained(hub_checkpoint):
    path, original = hub_checkpoint
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    streamed = quantize.load_nf4(path, dtype=torch.float32)
    with torch.inference_mode():
        assert torch.equal(reference(INPUT_IDS).logits, original(INPUT_IDS).logits)  # the hub layout is right
        quantize.quantize_model(reference)
        # Same weights in, same 4-bit weights out: any layout mistake (w1/w3 swapped, a
        # transposed expert) would change the logits.
        assert torch.equal(streamed(INPUT_IDS).logits, reference(INPUT_IDS).logits)
        assert not torch.equal(streamed(INPUT_IDS).logits, original(INPUT_IDS).logits)


def test_nf4_tied_embedding_is_one_4bit_tensor(tmp_path):
    model = _random_model(MixtralForCausalLM, MixtralConfig(**MIXTRAL, tie_word_embeddings=True))
    model.save_pretrained(tmp_path)
    loaded = quantize.load_nf4(tmp_path, dtype=torch.float32)
    embedding = loaded.model.embed_tokens.parametrizations.weight
    assert loaded.lm_head.parametrizations.weight.original is embedding.original
    assert weights.parameter_count(loaded) == sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        assert torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
        reference = quantize.quantize_model(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32))
        assert torch.equal(loaded(INPUT_IDS).logits, reference(INPUT_IDS).logits)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_chunked_quantization_equals_bitsandbytes_in_one_piece(monkeypatch, double_quant):
    weights = torch.randn(3, 200, 96, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    monkeypatch.setattr(quantize, "QUANTIZE_CHUNK", 64 * 10)  # 90 chunks
    quantize._bitsandbytes(torch.device("cpu"))
    packed, state = quantize._quantize_nf4(weights, double_quant)
    expected, expected_state = bnb.functional.quantize_4bit(weights, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    assert torch.equal(packed, expected)
    assert torch.equal(bnb.functional.dequantize_4bit(packed, state), bnb.functional.dequantize_4bit(expected, expected_state))


def test_nf4_without_double_quant_is_45_bits_a_weight(hub_checkpoint):
    path, original = hub_checkpoint
    plain, double = (quantize.load_nf4(path, dtype=torch.float32, double_quant=dq) for dq in (False, True))
    assert weights.storage_bytes(double) < weights.storage_bytes(plain)
    plan = quantize.quantization_plan(original)
    assert quantize.planned_bytes(original, plan, torch.float32, double_quant=False) == weights.storage_bytes(plain)


def test_plain_transformers_4bit_recipe_leaves_experts_in_16bit(hub_checkpoint):
    """The problem this module solves, kept visible: v5's recipe only swaps nn.Linear."""
    path, original = hub_checkpoint
    plain = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    assert weights.quantization_of(plain) == "nf4-linear-only"
    assert weights.storage_bytes(plain) > 0.6 * 2 * sum(p.numel() for p in original.parameters())


def test_4bit_trace_records_quantization_and_keeps_it_in_the_file(hub_checkpoint, tmp_path):
    path, original = hub_checkpoint
    loaded = load_model(path, quantization="nf4")
    trace = trace_text(loaded.model, loaded.tokenizer, "The quick brown fox", model_id="tiny")
    assert trace.quantization == "nf4"
    assert RoutingTrace.load(trace.save(tmp_path / "t.safetensors")).quantization == "nf4"
    assert trace_text(original, loaded.tokenizer, "The quick brown fox").quantization == "none"


def test_sidebar_offers_4bit_and_shows_the_weights_footprint(monkeypatch, mixtral_dir):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MOEVIZ_MODEL", str(mixtral_dir))
    app = AppTest.from_file(str(BUNDLED_MODEL.parent.parent / "app.py"), default_timeout=300)
    app.run()
    full = load_model(mixtral_dir)
    assert any(f"{full.footprint_bytes / 2**20:,.1f} MiB of weights ·" in c.value for c in app.sidebar.caption)
    app.selectbox(key="model_quantization").set_value("4-bit (NF4)").run()
    assert not app.exception, [e.message for e in app.exception]
    nf4 = load_model(mixtral_dir, quantization="nf4")
    assert any(f"{nf4.footprint_bytes / 2**20:,.1f} MiB of weights (nf4)" in c.value for c in app.sidebar.caption)


# -- routing agreement ---------------------------------------------------------------------------


@pytest.mark.skipif(not (BUNDLED_MODEL / "model.safetensors").is_file(),
                    reason="the bundled model (assets/model) has not been trained yet")
def test_nf4_bundled_model_routes_like_16bit_on_held_out_text():
    samples = sorted((BUNDLED_MODEL.parent / "samples").glob("*.txt"))
    full = load_model(BUNDLED_MODEL, device="cpu")
    nf4 = load_model(BUNDLED_MODEL, device="cpu", quantization="nf4")
    assert nf4.footprint_bytes <= 0.30 * 2 * full.parameter_count
    same, total = 0, 0
    for sample in samples:
        text = sample.read_text(encoding="utf-8")
        a = trace_text(full.model, full.tokenizer, text, max_tokens=256)
        b = trace_text(nf4.model, nf4.tokenizer, text, max_tokens=256)
        same = same + (a.first_choice == b.first_choice).sum(axis=1)
        total += a.num_tokens
    agreement = same / total  # per layer, over all held-out tokens
    assert np.all(agreement >= 0.90), f"first-choice agreement per layer: {np.round(agreement, 3)}"


# -- peak memory while streaming -----------------------------------------------------------------

# Fixed, whatever the model's size: bitsandbytes' CPU scratch for one chunk of weights (~20 MiB), torch ops'
# first-use allocations, and freed blocks glibc keeps in its heap between malloc_trim calls.
PEAK_OVERHEAD = 96 * 2**20
PEAK_CONFIG = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512)


def write_hub_mixtral(path, sizes: dict, layers_per_shard: int = 3) -> int:
    """A random bf16 Mixtral in the hub's layout and shards, written shard by shard; returns its bytes."""
    config = MixtralConfig(**sizes)
    config.save_pretrained(path)
    hidden, inter, experts = config.hidden_size, config.intermediate_size, config.num_local_experts
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    generator = torch.Generator().manual_seed(0)

    def weight(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    shards, weight_map, total = [{"model.embed_tokens.weight": weight(config.vocab_size, hidden)}], {}, 0
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shard = shards[-1]
        shard.update({p + "self_attn.q_proj.weight": weight(hidden, hidden), p + "self_attn.k_proj.weight": weight(kv, hidden),
                      p + "self_attn.v_proj.weight": weight(kv, hidden), p + "self_attn.o_proj.weight": weight(hidden, hidden),
                      p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                      p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                      p + "block_sparse_moe.gate.weight": weight(experts, hidden)})
        for e in range(experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            shard.update({q + "w1.weight": weight(inter, hidden), q + "w2.weight": weight(hidden, inter),
                          q + "w3.weight": weight(inter, hidden)})
        if layer % layers_per_shard == layers_per_shard - 1:
            total += _write_shard(path, shards, weight_map)
            shards.append({})
    shards[-1].update({"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                       "lm_head.weight": weight(config.vocab_size, hidden)})
    total += _write_shard(path, shards, weight_map)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def _write_shard(path, shards: list[dict], weight_map: dict) -> int:
    name = f"model-{len(shards):05d}.safetensors"
    save_file(shards[-1], path / name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shards[-1], name))
    size = sum(t.numel() * t.element_size() for t in shards[-1].values())
    shards[-1].clear()
    return size


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of a big pytest
# process would start with the parent's peak. Writing 5 to clear_refs resets VmHWM to VmRSS.
PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from moeviz.model import quantize, weights
    def status(field):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))
    quantize._bitsandbytes(torch.device("cpu"))  # libraries loaded first: they are not model memory
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = status("VmRSS")
    model = quantize.load_nf4(sys.argv[1], device="cpu", dtype=torch.bfloat16)
    print(json.dumps({"load": status("VmHWM") - before, "nf4": weights.storage_bytes(model)}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS from /proc")
def test_nf4_streaming_load_peak_stays_below_4bit_plus_two_layers(tmp_path):
    sixteen_bit = write_hub_mixtral(tmp_path, PEAK_CONFIG)
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, cwd=BUNDLED_MODEL.parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    with torch.device("meta"):
        layer = quantize.largest_layer_bytes(MixtralForCausalLM(MixtralConfig(**PEAK_CONFIG)), torch.bfloat16)
    bound = measured["nf4"] + 2 * layer + PEAK_OVERHEAD
    assert bound < sixteen_bit  # tight enough to catch a load that holds the 16-bit model
    assert measured["load"] <= bound, {**measured, "layer": layer, "bound": bound, "16-bit": sixteen_bit}


# -- refusals --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("nf4-mixtral")
    _random_model(MixtralForCausalLM, MixtralConfig(**MIXTRAL)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_4bit_without_bitsandbytes_is_a_clear_error(monkeypatch, mixtral_dir):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    with pytest.raises(ModelLoadError, match="4-bit .* needs bitsandbytes"):
        load_model(mixtral_dir, quantization="nf4")


def test_4bit_when_bitsandbytes_cannot_quantize_on_the_device_is_a_clear_error(monkeypatch, mixtral_dir):
    def no_kernel(*args, **kwargs):
        raise RuntimeError("no 4-bit kernel for this device")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", no_kernel)
    with pytest.raises(ModelLoadError, match="cannot quantize to 4-bit on cpu: no 4-bit kernel"):
        load_model(mixtral_dir, quantization="nf4")


def test_4bit_dbrx_whose_experts_are_2d_is_refused_not_left_16bit(tmp_path, tokenizer):
    config = DbrxConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=400,
                        ffn_config={"ffn_hidden_size": 96, "moe_num_experts": 4, "moe_top_k": 2},
                        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0})
    DbrxForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"cannot quantize this dbrx model to 4-bit: \d+% .*experts\.mlp"):
        load_model(tmp_path, quantization="nf4")


def test_4bit_dense_model_is_refused(tmp_path, tokenizer):
    config = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="4-bit is for MoE models.*llama"):
        load_model(tmp_path, quantization="nf4")


def test_4bit_of_an_already_quantized_or_unstreamable_checkpoint_is_refused(mixtral_dir, tmp_path):
    for file in mixtral_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ModelLoadError, match=r"already quantized \(fp8\)"):
        load_model(tmp_path, quantization="nf4")
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(AutoModelForCausalLM.from_pretrained(tmp_path).state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="pytorch_model.bin checkpoint cannot be streamed"):
        load_model(tmp_path, quantization="nf4")


def test_unknown_quantization_is_a_clear_error(mixtral_dir):
    with pytest.raises(ModelLoadError, match="Unknown quantization 'int3'"):
        load_model(mixtral_dir, quantization="int3")


# -- bitsandbytes' AVX512-BF16 CPU kernel ----------------------------------------------------------


def _packing_flags(model) -> dict[str, bool]:
    return {name: m.support_avx512bf16_for_cpu for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("cpu_has_avx512bf16", [False, True])
def test_packed_cpu_kernel_only_for_bf16_compute_and_widths_it_can_pack(monkeypatch, mixtral_dir, cpu_has_avx512bf16):
    """The guard decides from the layer and the compute dtype, the same way on every CPU."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: cpu_has_avx512bf16)
    bf16 = _packing_flags(quantize.load_nf4(mixtral_dir, dtype=torch.bfloat16))
    assert bf16["lm_head"] is False  # 400 outputs: the packing asserts a multiple of 32
    assert {name: flag for name, flag in bf16.items() if name != "lm_head"} == dict.fromkeys(
        [name for name in bf16 if name != "lm_head"], cpu_has_avx512bf16)  # q/k/v/o: 64 or 32 wide
    float32 = _packing_flags(quantize.load_nf4(mixtral_dir, dtype=torch.float32))
    assert not any(float32.values())  # the kernel would compute in bf16: never for float32


@pytest.mark.parametrize("cpu_has_avx512bf16", [False, True])
def test_packed_cpu_kernel_never_for_inputs_narrower_than_a_block(monkeypatch, tmp_path, tokenizer, cpu_has_avx512bf16):
    """A 32-wide hidden size: every input is half a 64-weight block, which the packing cannot
    reshape; the bf16 model runs the portable path, on every CPU."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: cpu_has_avx512bf16)
    _random_model(MixtralForCausalLM, tiny_mixtral_config()).save_pretrained(tmp_path)
    model = quantize.load_nf4(tmp_path, dtype=torch.bfloat16)
    flags = _packing_flags(model)
    assert flags and not any(flags.values())
    with torch.inference_mode():
        assert torch.isfinite(model(INPUT_IDS).logits).all()


def test_float32_4bit_logits_do_not_depend_on_the_cpu(monkeypatch, mixtral_dir):
    """A float32 4-bit model computes the same numbers whether or not the CPU has AVX512-BF16."""
    with torch.inference_mode():
        portable = quantize.load_nf4(mixtral_dir, dtype=torch.float32)(INPUT_IDS).logits
        monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
        claimed = quantize.load_nf4(mixtral_dir, dtype=torch.float32)(INPUT_IDS).logits
    assert torch.equal(portable, claimed)


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="this CPU has no AVX512-BF16: bitsandbytes never packs")
def test_bf16_4bit_model_runs_the_packed_kernel_where_the_cpu_has_it(mixtral_dir, tokenizer):
    """End to end on such a CPU: packed layers and a 400-wide lm_head side by side, against the
    same 4-bit weights run the portable way (compare like with like: both bf16)."""
    packed = quantize.load_nf4(mixtral_dir, dtype=torch.bfloat16)
    portable = quantize.load_nf4(mixtral_dir, dtype=torch.bfloat16)
    for module in portable.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    with torch.inference_mode():
        a, b = packed(INPUT_IDS).logits.float(), portable(INPUT_IDS).logits.float()
    q_proj = packed.model.layers[0].self_attn.q_proj
    assert q_proj.weight.quant_state.packing_format_for_cpu  # the packed kernel really ran
    assert not getattr(packed.lm_head.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.allclose(a, b, atol=0.05, rtol=0.05), (a - b).abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    trace = trace_text(packed, tokenizer, "The quick brown fox")
    assert trace.quantization == "nf4" and trace.num_tokens > 0


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="this CPU has no AVX512-BF16: bitsandbytes never packs")
def test_quantizing_a_model_in_eval_mode_keeps_its_linear4bits_in_eval_mode():
    """`quantize_model` swaps in new Linear4bit modules; built fresh they are in training mode, and
    bitsandbytes then never runs its packed CPU kernel (benchmarks/nf4_decode.py measured the
    portable path, ~5x slower per attention projection, before this)."""
    model = quantize.quantize_model(_random_model(MixtralForCausalLM, MixtralConfig(**MIXTRAL)).to(torch.bfloat16))
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and not any(m.training for m in linears)
    with torch.inference_mode():
        model(INPUT_IDS)
    assert model.model.layers[0].self_attn.q_proj.weight.quant_state.packing_format_for_cpu
