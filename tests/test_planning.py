"""The weights storage "auto" picks, decided from shapes before any weight is read: the decision
table, the estimate against what loading really takes, models that cannot be 4-bit, and the
sidebar that shows the estimate."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import _random_model, tiny_mixtral_config
from transformers import DbrxConfig, DbrxForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from moeviz.model.loading import BUNDLED_MODEL, ModelLoadError, estimate_memory, load_model
from moeviz.model.planning import ACTIVATION_SHARE, choose_storage, format_bytes, free_memory, plan_memory

MiB = 2**20
APP = str(Path(__file__).resolve().parent.parent / "app.py")
MIXTRAL_8X7B = MixtralConfig(  # mistralai/Mixtral-8x7B-v0.1's config.json
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
)


@pytest.mark.parametrize("full, nf4, free, headroom, expected", [
    (100, 30, 200, 20, "none"),  # 100 <= 180
    (180, 30, 200, 20, "none"),  # exactly the room left: fits
    (181, 30, 200, 20, "nf4"),   # one byte over in full precision; 30 <= 180
    (181, 180, 200, 20, "nf4"),
    (181, 181, 200, 20, None),   # neither fits
    (181, None, 200, 20, None),  # cannot be 4-bit, and full precision does not fit
    (100, None, 200, 20, "none"),
    (10, 3, 5, 0, "nf4"),
])
def test_choose_storage_table(full, nf4, free, headroom, expected):
    assert choose_storage(full, nf4, free, headroom) == expected


# -- Mixtral-8x7B against the GPUs it is run on ----------------------------------------------------


@pytest.fixture(scope="module")
def mixtral_8x7b():
    """Mixtral-8x7B's plan in bfloat16 on the meta device (no weights): free memory is set per case."""
    return plan_memory(MIXTRAL_8X7B, None, model_id="mistralai/Mixtral-8x7B-v0.1", device="cpu", dtype=torch.bfloat16)


def test_mixtral_8x7b_sizes_from_shapes(mixtral_8x7b):
    """Parameters by hand from the config: per layer, attention 2 x 4096^2 + 2 x 4096 x 1024, experts
    8 x 3 x 4096 x 14336, router 8 x 4096, two norms of 4096: 1,451,270,144; 32 layers, two untied
    32000 x 4096 embeddings and a final norm: 46,702,792,704 (the "46.7B" of the Mixtral paper)."""
    layer = 2 * 4096**2 + 2 * 4096 * 1024 + 8 * 3 * 4096 * 14336 + 8 * 4096 + 2 * 4096
    parameters = 32 * layer + 2 * 32000 * 4096 + 4096
    assert parameters == 46_702_792_704
    rotary = 2 * 64 * 4  # inv_freq and original_inv_freq buffers: 64 float32 each
    assert mixtral_8x7b.full_bytes == 2 * parameters + rotary
    assert mixtral_8x7b.loading_bytes == 2 * 2 * layer  # two layers in bfloat16
    assert format_bytes(mixtral_8x7b.full_bytes) == "86.99 GiB"
    assert format_bytes(mixtral_8x7b.nf4_bytes) == "22.44 GiB"  # benchmarks/RESULTS.md, same computation
    assert format_bytes(mixtral_8x7b.nf4_peak_bytes) == "27.85 GiB"


# Free memory: the total nvidia-smi reports for each card, less 512 MiB for the CUDA context.
@pytest.mark.parametrize("card, total_mib, expected", [
    ("24 GB (RTX 4090)", 24_564, None),     # 21.1 GiB of room: not even the 22.44 GiB of 4-bit weights
    ("48 GB (RTX A6000)", 49_140, "nf4"),   # 42.7 GiB of room >= 27.85 GiB, < 86.99 GiB
    ("80 GB (H100)", 81_559, "nf4"),        # 71.2 GiB of room < 86.99 GiB
    ("141 GB (H200)", 143_771, "none"),     # 126 GiB of room: bfloat16 fits
])
def test_mixtral_8x7b_against_gpu_memory(mixtral_8x7b, card, total_mib, expected):
    plan = replace(mixtral_8x7b, device="cuda:0", free_bytes=(total_mib - 512) * MiB)
    assert plan.headroom_bytes == int(plan.free_bytes * ACTIVATION_SHARE)
    assert plan.auto == expected
    if expected is None:
        with pytest.raises(ValueError) as refused:
            plan.resolve("auto")
        message = str(refused.value)
        for figure in ("86.99 GiB", "22.44 GiB", "27.85 GiB", format_bytes(plan.free_bytes)):
            assert figure in message
        assert message.startswith("mistralai/Mixtral-8x7B-v0.1 does not fit on cuda:0: in full precision (bfloat16)")
        assert message.endswith('choose full precision explicitly (quantization "none") to let the layers that do '
                                "not fit spill to CPU memory (slow).")
    else:
        assert plan.resolve("auto") == expected
    assert (plan.resolve("none"), plan.resolve("nf4")) == ("none", "nf4")  # explicit choices stand


# -- the bundled model on this CPU -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_plan():
    return estimate_memory(BUNDLED_MODEL, device="cpu")


def mem_available() -> int:
    line = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


def test_bundled_model_estimate_is_what_loading_takes_and_auto_keeps_full_precision(bundled_plan):
    full = load_model(BUNDLED_MODEL, device="cpu")
    assert (full.quantization, full.plan.auto) == ("none", "none")
    assert (bundled_plan.device, bundled_plan.dtype) == ("cpu", "float32")
    assert bundled_plan.full_bytes == full.footprint_bytes
    nf4 = load_model(BUNDLED_MODEL, device="cpu", quantization="nf4")
    assert bundled_plan.nf4_bytes == nf4.footprint_bytes
    assert bundled_plan.auto == "none"


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="reads MemAvailable from /proc/meminfo")
def test_free_cpu_memory_is_memavailable():
    before, measured, after = mem_available(), free_memory("cpu"), mem_available()
    assert min(before, after) - 256 * MiB <= measured <= max(before, after) + 256 * MiB


def test_bundled_model_against_small_memories(bundled_plan):
    """30.4 MiB in float32, 4.0 MiB in 4-bit plus two 4.9 MiB layers while loading."""
    assert format_bytes(bundled_plan.full_bytes) == "30.4 MiB" and format_bytes(bundled_plan.nf4_peak_bytes) == "13.8 MiB"
    for free, expected in [(40 * MiB, "none"), (30 * MiB, "nf4"), (16 * MiB, "nf4"), (10 * MiB, None)]:
        assert replace(bundled_plan, free_bytes=free).auto == expected, free


def test_auto_load_that_fits_nowhere_is_refused_with_both_sizes(bundled_plan):
    tiny = replace(bundled_plan, free_bytes=10 * MiB)
    with pytest.raises(ModelLoadError, match=r"does not fit on cpu: in full precision \(float32\) its weights need "
                                             r"30\.4 MiB, in 4-bit \(NF4\) 4\.0 MiB \(13\.8 MiB while loading\); "
                                             r"10\.0 MiB are free"):
        load_model(BUNDLED_MODEL, device="cpu", plan=tiny)


def test_auto_load_picks_4bit_when_only_4bit_fits(bundled_plan):
    calls = []
    loaded = load_model(BUNDLED_MODEL, device="cpu", plan=replace(bundled_plan, free_bytes=30 * MiB),
                        progress=lambda done, total: calls.append((done, total)))
    assert loaded.quantization == "nf4" and loaded.footprint_bytes == bundled_plan.nf4_bytes
    layers = 5 + 1  # the decoder layers, and the tensors outside them first
    assert calls == [(done, layers) for done in range(1, layers + 1)]


# -- models that cannot be 4-bit ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def dbrx_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("dbrx")
    config = DbrxConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=400,
                        ffn_config={"ffn_hidden_size": 96, "moe_num_experts": 4, "moe_top_k": 2},
                        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0})
    DbrxForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_auto_on_a_model_that_cannot_be_4bit_is_full_precision_when_it_fits(dbrx_dir):
    plan = estimate_memory(dbrx_dir, device="cpu")
    assert plan.nf4_bytes is None and re.search(r"cannot quantize this dbrx model to 4-bit: \d+%", plan.nf4_refusal)
    assert plan.auto == "none"
    loaded = load_model(dbrx_dir, device="cpu")
    assert loaded.quantization == "none" and loaded.footprint_bytes == plan.full_bytes


def test_auto_on_a_model_that_cannot_be_4bit_and_does_not_fit_says_why(dbrx_dir, dense_dir):
    for path, reason in [(dbrx_dir, "cannot quantize this dbrx model"), (dense_dir, "4-bit is for MoE models")]:
        plan = estimate_memory(path, device="cpu")
        small = replace(plan, free_bytes=plan.full_bytes)  # all of it, but nothing left for activations
        message = small.does_not_fit()
        assert small.auto is None and f"its weights need {format_bytes(plan.full_bytes)}, and it cannot be stored in 4-bit" in message
        assert reason in message and f"{format_bytes(plan.full_bytes)} are free" in message
        with pytest.raises(ModelLoadError, match="cannot be stored in 4-bit"):
            load_model(path, device="cpu", plan=small)


def test_checkpoint_index_and_config_say_when_4bit_cannot_stream(tmp_path):
    """A pytorch_model.bin checkpoint cannot be streamed (its index says so); a checkpoint
    already quantized loads as stored, whatever the sizes."""
    tiny_mixtral_config().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {}}))
    plan = estimate_memory(tmp_path, device="cpu")
    assert plan.nf4_bytes is None and "pytorch_model.bin" in plan.nf4_refusal
    (tmp_path / "pytorch_model.bin.index.json").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    assert estimate_memory(tmp_path, device="cpu").nf4_bytes is not None

    config = tiny_mixtral_config()
    config.quantization_config = {"quant_method": "gptq", "bits": 4}
    gptq = replace(plan_memory(config, None, model_id="gptq", device="cpu", dtype=torch.float32), free_bytes=1)
    assert (gptq.auto, gptq.resolve("auto"), gptq.nf4_bytes) == ("none", "none", None)
    assert gptq.rows()["Weights storage auto picks"] == "the checkpoint as stored: it is already quantized (gptq)"


# -- the sidebar ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-mixtral")
    _random_model(MixtralForCausalLM, tiny_mixtral_config()).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sidebar_app(monkeypatch, mixtral_dir, **env):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MOEVIZ_MODEL", str(mixtral_dir))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = AppTest.from_file(APP, default_timeout=300)
    app.run()
    assert not app.exception, [e.message for e in app.exception]
    return app


def estimate_caption(app) -> str:
    return next(c.value for c in app.sidebar.caption if c.value.startswith("Weights:"))


def test_sidebar_shows_the_estimate_and_what_auto_picks(monkeypatch, mixtral_dir):
    from moeviz.ui import cached_estimate

    app = sidebar_app(monkeypatch, mixtral_dir)
    assert app.selectbox(key="model_quantization").value.startswith("auto")
    plan = cached_estimate(str(mixtral_dir), "auto", "auto")  # the estimate the sidebar showed and decided on
    fresh = estimate_memory(mixtral_dir)
    assert (plan.full_bytes, plan.nf4_bytes) == (fresh.full_bytes, fresh.nf4_bytes)
    assert estimate_caption(app) == (
        f"Weights: {format_bytes(plan.full_bytes)} in float32, {format_bytes(plan.nf4_bytes)} in 4-bit · "
        f"{format_bytes(plan.free_bytes)} free on cpu · auto picks full precision"
    )
    summary = next(c.value for c in app.sidebar.caption if "of weights" in c.value)
    assert f"{format_bytes(plan.full_bytes)} of weights ·" in summary  # loaded in full precision

    app.selectbox(key="model_quantization").set_value("4-bit (NF4)").run()
    assert estimate_caption(app).endswith("4-bit (NF4) as chosen (auto: full precision)")
    assert any(f"{format_bytes(plan.nf4_bytes)} of weights (nf4)" in c.value for c in app.sidebar.caption)


def test_sidebar_starts_from_the_environment(monkeypatch, mixtral_dir):
    app = sidebar_app(monkeypatch, mixtral_dir, MOEVIZ_QUANTIZATION="nf4", MOEVIZ_DEVICE="cpu", MOEVIZ_DTYPE="float32")
    assert (app.selectbox(key="model_quantization").value, app.selectbox(key="model_device").value,
            app.selectbox(key="model_dtype").value) == ("4-bit (NF4)", "cpu", "float32")
    plan = estimate_memory(mixtral_dir, device="cpu", dtype="float32")
    assert estimate_caption(app).startswith(f"Weights: {format_bytes(plan.full_bytes)} in float32, ")
    assert any(f"{format_bytes(plan.nf4_bytes)} of weights (nf4)" in c.value for c in app.sidebar.caption)


def test_sidebar_reports_an_unknown_environment_value_and_starts_from_auto(monkeypatch, mixtral_dir):
    app = sidebar_app(monkeypatch, mixtral_dir, MOEVIZ_QUANTIZATION="int3")
    assert "$MOEVIZ_QUANTIZATION is 'int3', which is not one of auto, none, nf4" in app.sidebar.warning[0].value
    assert app.selectbox(key="model_quantization").value.startswith("auto")
