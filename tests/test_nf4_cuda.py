"""The 4-bit properties of tests/test_nf4_runtime.py, tests/test_forward_costs.py and
tests/test_quant.py, on a GPU. Skipped without CUDA; `benchmarks/gpu_check.py` runs them
(`pytest -m cuda`). Written on a machine without a GPU: not yet run on one."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import _random_model, tiny_mixtral_config
from test_nf4_runtime import LiveExpertTensors, run_whole_layers
from test_quant import MIXTRAL
from transformers import MixtralConfig, MixtralForCausalLM

from moeviz.model import nf4_experts, quantize, weights
from moeviz.model.capture import recording_routers, trace_text

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
bnb = pytest.importorskip("bitsandbytes")

INPUT_IDS = torch.tensor([[1, 5, 9, 33, 200, 7, 8, 100, 42, 399]])


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("nf4-cuda-mixtral")
    _random_model(MixtralForCausalLM, MixtralConfig(**MIXTRAL)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _devices_of_4bit_state(model) -> set[str]:
    devices = set()
    for module in model.modules():
        for state in nf4_experts._nf4_states(module).values():
            devices |= {t.device.type for t in (state.absmax, state.code, state.offset, state.state2.absmax)}
        if isinstance(module, bnb.nn.Linear4bit):
            devices |= {module.weight.device.type, module.weight.quant_state.absmax.device.type}
    return devices


def test_streamed_nf4_load_puts_weights_and_state_on_the_gpu_and_weighs_what_was_planned(mixtral_dir):
    model = quantize.load_nf4(mixtral_dir, device="cuda", dtype=torch.bfloat16)
    assert _devices_of_4bit_state(model) == {"cuda"}
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    with torch.device("meta"):
        meta = MixtralForCausalLM(MixtralConfig(**MIXTRAL))
    plan = quantize.quantization_plan(meta)
    assert weights.storage_bytes(model) == quantize.planned_bytes(meta, plan, torch.bfloat16, double_quant=True)
    cpu = quantize.load_nf4(mixtral_dir, device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        a, b = model(INPUT_IDS.cuda()).logits.float().cpu(), cpu(INPUT_IDS).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_hit_experts_forward_matches_the_whole_layer_path_on_the_gpu(mixtral_dir):
    """On the GPU the grouped kernel may sum in another order for a different number of groups:
    compared within bf16 rounding, and the routing exactly."""
    model = quantize.load_nf4(mixtral_dir, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 400, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode():
        hit = [model(ids[:1, :n]).logits.float() for n in (1, 3, 64)]
        run_whole_layers(model)
        whole = [model(ids[:1, :n]).logits.float() for n in (1, 3, 64)]
    for a, b in zip(hit, whole):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_four_threads_on_one_gpu_model_hold_one_layer_of_experts(monkeypatch, mixtral_dir, tokenizer):
    model = quantize.load_nf4(mixtral_dir, device="cuda", dtype=torch.bfloat16)
    texts = ["The quick brown fox", "def add(a, b):\n    return a + b", "What is 12 + 7?", "Der schnelle Fuchs"]
    alone = [trace_text(model, tokenizer, text) for text in texts]
    live = LiveExpertTensors(monkeypatch)
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, trace_text(model, tokenizer, texts[i])))
               for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert 1 <= live.peak <= 2
    for i, trace in results.items():
        np.testing.assert_array_equal(trace.topk_ids, alone[i].topk_ids)


def test_routing_recorded_on_the_gpu_stays_there_until_the_recording_ends(mixtral_dir):
    model = quantize.load_nf4(mixtral_dir, device="cuda", dtype=torch.bfloat16)
    with recording_routers(model) as collector, torch.inference_mode():
        model(INPUT_IDS.cuda(), logits_to_keep=1)
        inside = {t.device.type for parts in collector.values() for calls in parts.values() for t in calls}
    after = {t.device.type for parts in collector.values() for calls in parts.values() for t in calls}
    assert inside == {"cuda"} and after == {"cpu"}


def test_a_4bit_model_moved_to_the_gpu_and_back_takes_its_state_along(mixtral_dir):
    model = quantize.load_nf4(mixtral_dir, device="cpu", dtype=torch.bfloat16)
    with torch.inference_mode():
        before = model(INPUT_IDS).logits.float()
        model.to("cuda")
        assert _devices_of_4bit_state(model) == {"cuda"}
        on_gpu = model(INPUT_IDS.cuda()).logits.float().cpu()
        model.to("cpu")
        assert _devices_of_4bit_state(model) == {"cpu"}
    assert (on_gpu.argmax(-1) == before.argmax(-1)).float().mean() >= 0.9


def test_quantize_model_keeps_each_weight_on_its_own_device():
    """A model spread over devices (as device_map="auto" leaves it): quantize_model quantizes
    each weight where it is, not on the first parameter's device."""
    model = _random_model(MixtralForCausalLM, tiny_mixtral_config()).to(torch.bfloat16)
    model.model.layers[1:].to("cuda")
    quantize.quantize_model(model)
    assert model.model.layers[0].mlp.experts.parametrizations.gate_up_proj.original.device.type == "cpu"
    assert model.model.layers[2].mlp.experts.parametrizations.gate_up_proj.original.device.type == "cuda"
    assert model.model.layers[2].mlp.experts.parametrizations.gate_up_proj[0].quant_state.absmax.device.type == "cuda"
