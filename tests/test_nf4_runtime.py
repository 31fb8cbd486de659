"""Running a 4-bit model: only the experts a step uses are dequantized, and exactly as the whole
layer would be; one layer's dequantized experts at a time per model under concurrent threads;
the quantization state moves with the model."""

from __future__ import annotations

import math
import threading
import weakref

import numpy as np
import pytest
import torch
from conftest import _random_model, tiny_mixtral_config, tiny_qwen2_moe_config
from dequantized_bytes import DequantizedBytes
from transformers import MixtralForCausalLM, Qwen2MoeForCausalLM

from moeviz.model import nf4_experts, quantize
from moeviz.model.capture import trace_text
from moeviz.model.generation import Sampling, trace_generation
from moeviz.model.loading import BUNDLED_MODEL

bnb = pytest.importorskip("bitsandbytes")

TEXTS = [
    "The quick brown fox jumps over the lazy dog, and the dog does not mind at all.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "What is 12 + 7? Answer: 19. What is 3 * 4? Answer: 12.",
]


def nf4(model_class, config, *, dtype=torch.float32, double_quant=True):
    return quantize.quantize_model(_random_model(model_class, config).to(dtype), double_quant=double_quant)


def run_whole_layers(model) -> None:
    """Switch a 4-bit model back to dequantizing whole tensors: transformers' grouped_mm on the
    experts, nn.Embedding's own forward on the embedding."""
    model.set_experts_implementation("grouped_mm")
    del model.get_input_embeddings().forward


@pytest.fixture(scope="module")
def bundled_nf4():
    return quantize.load_nf4(BUNDLED_MODEL, dtype=torch.float32)


# -- which experts are dequantized -------------------------------------------------------------


def flat_reference(packed, state) -> torch.Tensor:
    """bitsandbytes' dequantization of the tensor seen as the flat run of weights it quantized."""
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    flat = bnb.functional.QuantState(absmax=absmax, shape=(math.prod(state.shape),), dtype=state.dtype, blocksize=64,
                                     code=state.code, quant_type="nf4")
    return bnb.functional.dequantize_4bit(packed, flat).view(state.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(5, 37, 23), (4, 128, 64), (3, 2, 64 * 300), (6, 96, 32), (3, 4, 64 * 128)])
def test_dequantize_experts_equals_those_rows_of_the_whole_tensor(shape, double_quant, dtype):
    """Experts whose size is not a multiple of the 64-weight block (37 x 23 = 851) share blocks
    with their neighbours; with double quantization their absmax sits in 256-block runs that
    straddle experts (third shape: 300 blocks an expert), or that experts hold whole (last shape:
    512 blocks, two runs, as Mixtral-8x7B's 3,584). On the CPU moeviz calls bitsandbytes' kernel
    itself; the reference goes through `functional.dequantize_4bit`."""
    weights = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    quantize._bitsandbytes(torch.device("cpu"))
    packed, state = quantize._quantize_nf4(weights, double_quant)
    whole = flat_reference(packed, state)
    picked = [shape[0] - 1, 0, 1]
    assert torch.equal(nf4_experts.dequantize_rows(packed, state, torch.tensor(picked)), whole[picked])
    assert torch.equal(nf4_experts.dequantize_whole(packed, state), whole)


def test_whole_nf4_blocks_on_the_cpu_go_to_bitsandbytes_kernel_directly(monkeypatch):
    """Rows and whole tensors made of whole 64-weight blocks skip `functional.dequantize_4bit` and
    `dequantize_blockwise` (their Python costs about as much as the kernels on a bundled-model
    expert), with their numbers."""
    weights = torch.randn(4, 256, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)  # rows of 256 blocks
    quantize._bitsandbytes(torch.device("cpu"))
    packed, state = quantize._quantize_nf4(weights, double_quant=True)
    whole = flat_reference(packed, state)
    for name in ("dequantize_4bit", "dequantize_blockwise"):  # the weights, and the doubly quantized absmax
        monkeypatch.setattr(bnb.functional, name, lambda *_, name=name, **__: pytest.fail(f"functional.{name} ran"))
    assert torch.equal(nf4_experts.dequantize_rows(packed, state, torch.tensor([3, 1])), whole[[3, 1]])
    assert torch.equal(nf4_experts.dequantize_whole(packed, state), whole)
    assert nf4_experts._native_function("no_such_function") is None  # another build: functional.dequantize_4bit


@pytest.mark.parametrize("width", [32, 96])
def test_4bit_tensors_whose_last_dimension_is_an_odd_multiple_of_32_dequantize_right(width):
    """bitsandbytes 0.50.2's CPU kernel, given the tensor's own shape, reads the wrong absmax for
    such widths: its mean error is 2-4x NF4's. moeviz dequantizes the flat run instead; its error
    is NF4's (~0.074 of a unit-variance weight, as for a 64-wide tensor)."""
    weights = torch.randn(6, 96, width, generator=torch.Generator().manual_seed(0))
    quantize._bitsandbytes(torch.device("cpu"))
    packed, state = quantize._quantize_nf4(weights, double_quant=True)
    error = (nf4_experts.dequantize_whole(packed, state) - weights).abs().mean()
    assert 0.06 < error < 0.085, error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "mixtral_64_wide"])
def test_hit_experts_forward_equals_dequantizing_the_whole_layer(family, dtype):
    """The hit experts, stacked and renumbered, go through transformers' own grouped_mm forward,
    and the embedding looks up its dequantized rows: the logits are bitwise those of the same
    4-bit model run on whole dequantized tensors (transformers' default path), for one token, a
    few, and many. 32 wide, rows share blocks; 64 wide, they are gathered in one call."""
    model_class, config = {"mixtral": (MixtralForCausalLM, tiny_mixtral_config()),
                           "qwen2_moe": (Qwen2MoeForCausalLM, tiny_qwen2_moe_config()),
                           "mixtral_64_wide": (MixtralForCausalLM, tiny_mixtral_config())}[family]
    if family == "mixtral_64_wide":
        config.hidden_size, config.intermediate_size = 64, 64
    model = nf4(model_class, config, dtype=dtype)
    assert nf4_experts.uses_hit_experts(model)
    ids = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        hit = [model(ids[:1, :n]).logits for n in (1, 3, 40)] + [model(ids).logits]
        run_whole_layers(model)
        whole = [model(ids[:1, :n]).logits for n in (1, 3, 40)] + [model(ids).logits]
    for a, b in zip(hit, whole):
        assert torch.equal(a, b)


def test_4bit_generation_equals_the_whole_layer_path(tokenizer):
    model = nf4(MixtralForCausalLM, tiny_mixtral_config())
    hit = trace_generation(model, tokenizer, "The quick brown fox", Sampling(max_new_tokens=8))
    run_whole_layers(model)
    whole = trace_generation(model, tokenizer, "The quick brown fox", Sampling(max_new_tokens=8))
    assert hit.token_ids == whole.token_ids
    np.testing.assert_array_equal(hit.topk_ids, whole.topk_ids)
    np.testing.assert_array_equal(hit.router_logits, whole.router_logits)


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="this CPU has no AVX512-BF16: bitsandbytes never packs")
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_packed_linear_forward_equals_bitsandbytes_linear4bit_forward(monkeypatch, family):
    """bf16 4-bit model, 64 wide so that bitsandbytes packs attention for its AVX512-BF16 kernel:
    moeviz's direct call of that kernel gives bitwise the logits of `Linear4bit.forward`, for one
    token and many, with biases (Qwen2-MoE's q/k/v) and without (Mixtral)."""
    model_class, config = {"mixtral": (MixtralForCausalLM, tiny_mixtral_config()),
                           "qwen2_moe": (Qwen2MoeForCausalLM, tiny_qwen2_moe_config())}[family]
    config.hidden_size = 64
    model = nf4(model_class, config, dtype=torch.bfloat16)
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.support_avx512bf16_for_cpu]
    assert linears and all(m.forward.func is nf4_experts.packed_linear_forward for m in linears)
    with torch.inference_mode():
        model(ids)  # bitsandbytes packs each weight on its first forward
        with monkeypatch.context() as patched:
            own_forward = bnb.nn.Linear4bit.forward

            def only_unpacked(module, x):  # the 400-wide lm_head is not packed: its own forward runs
                assert module not in linears, "Linear4bit.forward ran on a packed layer"
                return own_forward(module, x)

            patched.setattr(bnb.nn.Linear4bit, "forward", only_unpacked)
            direct = [model(ids[:1, :1]).logits, model(ids).logits]
        for module in linears:
            del module.forward
        own = [model(ids[:1, :1]).logits, model(ids).logits]
    assert all(m.weight.quant_state.packing_format_for_cpu for m in linears)
    for a, b in zip(direct, own):
        assert torch.equal(a, b)


def test_a_decoded_token_dequantizes_only_the_k_experts_it_uses(bundled_nf4):
    """Bundled model: 5 MoE layers, top-2 of 8 experts, each expert 3 x 256 x 192 weights in
    float32. One decoded token: 5 x 2 experts' bytes, a quarter of the 5 x 8 that the whole-layer
    path dequantizes; outside the experts, one embedding row and the tied lm_head (8,192 x 192),
    which needs the whole table."""
    expert_bytes = 3 * 256 * 192 * 4
    with torch.inference_mode():
        out = bundled_nf4(torch.tensor([[5, 17, 300]]), use_cache=True)
        with DequantizedBytes(bundled_nf4) as counted:
            bundled_nf4(torch.tensor([[42]]), cache=out.cache, use_cache=True)
    assert counted.experts == 5 * 2 * expert_bytes
    assert counted.other == (1 + 8192) * 192 * 4


# -- concurrent sessions -----------------------------------------------------------------------


class LiveExpertTensors:
    """Dequantized fused expert tensors (3 or more dimensions) alive, and the most alive at once."""

    def __init__(self, monkeypatch):
        self.alive = self.peak = 0
        self._lock = threading.Lock()
        for owner, name in ((bnb.functional, "dequantize_4bit"), (nf4_experts, "dequantize_rows")):
            monkeypatch.setattr(owner, name, self._tracking(getattr(owner, name)))

    def _tracking(self, real):
        def tracked(*args, **kwargs):
            out = real(*args, **kwargs)
            if out.ndim >= 3:
                with self._lock:
                    self.alive += 1
                    self.peak = max(self.peak, self.alive)
                weakref.finalize(out, self._freed)
            return out

        return tracked

    def _freed(self):
        with self._lock:
            self.alive -= 1


def test_four_threads_on_one_4bit_model_hold_one_layer_of_experts_and_get_their_own_traces(monkeypatch, bundled_nf4):
    """The issue measured up to 8 cached expert tensors with two threads (PyTorch's parametrization
    cache is process-global). A layer has 2 fused tensors (gate_up_proj, down_proj): never more
    alive at once, with 4 threads each tracing its own text 3 times."""
    tokenizer = _bundled_tokenizer()
    alone = [trace_text(bundled_nf4, tokenizer, text) for text in TEXTS]
    live = LiveExpertTensors(monkeypatch)
    results, errors = {}, []

    def session(i):
        try:
            results[i] = [trace_text(bundled_nf4, tokenizer, TEXTS[i]) for _ in range(3)]
        except Exception as error:  # surfaced below with the thread's number
            errors.append((i, error))

    threads = [threading.Thread(target=session, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert 1 <= live.peak <= 2, live.peak
    for i, traces in results.items():
        for trace in traces:
            np.testing.assert_array_equal(trace.topk_ids, alone[i].topk_ids)
            np.testing.assert_array_equal(trace.router_logits, alone[i].router_logits)


def test_a_forward_that_raises_in_the_experts_gives_the_lock_back(bundled_nf4):
    experts = bundled_nf4.model.layers[2].mlp.experts

    def broken(module, args):
        raise RuntimeError("broken expert")

    handle = experts.register_forward_pre_hook(broken)
    try:
        with pytest.raises(RuntimeError, match="broken expert"), torch.inference_mode():
            bundled_nf4(torch.tensor([[1, 2, 3]]))
    finally:
        handle.remove()
    other = threading.Thread(target=lambda: bundled_nf4(torch.tensor([[1, 2, 3]])))
    other.start()
    other.join(timeout=60)
    assert not other.is_alive(), "another thread waits for the experts lock forever"


def _bundled_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BUNDLED_MODEL)


# -- moving a 4-bit model -------------------------------------------------------------------------


def _quant_state_devices(model) -> set[str]:
    devices = set()
    for module in model.modules():
        for plist in getattr(module, "parametrizations", {}).values():
            state = plist[0].quant_state
            devices |= {str(t.device) for t in (state.absmax, state.code, state.offset, state.state2.absmax)}
        if isinstance(module, bnb.nn.Linear4bit):
            devices.add(str(module.weight.quant_state.absmax.device))
    return devices


def test_moving_a_4bit_model_moves_its_quantization_state():
    """bitsandbytes keeps the parametrization's state as a plain attribute, which Module.to left
    behind. "meta" stands in for a GPU here (tests/test_nf4_cuda.py moves to a real one)."""
    model = nf4(MixtralForCausalLM, tiny_mixtral_config())
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.inference_mode():
        before = model(ids).logits
        assert torch.equal(model.to("cpu")(ids).logits, before)
    experts = model.model.layers[1].mlp.experts  # bitsandbytes' Linear4bit cannot go to "meta"
    experts.to("meta")
    assert _quant_state_devices(experts) == {"meta"}
    assert {p.device.type for p in experts.parameters()} == {"meta"}
    assert _quant_state_devices(model.model.layers[0]) == {"cpu"}


def test_casting_a_4bit_model_to_another_dtype_is_refused_clearly():
    model = nf4(MixtralForCausalLM, tiny_mixtral_config())
    with pytest.raises(TypeError, match=r"stored in 4-bit and dequantize to torch.float32; it cannot be cast to torch.float16"):
        model.to(torch.float16)


def test_a_4bit_tensor_placed_by_accelerate_takes_its_quantization_state_along():
    """accelerate places models tensor by tensor (`set_module_tensor_to_device`, as its
    dispatch hooks do) and never sees the state: the next dequantization brings it over."""
    from accelerate.utils import set_module_tensor_to_device

    experts = nf4(MixtralForCausalLM, tiny_mixtral_config()).model.layers[0].mlp.experts
    set_module_tensor_to_device(experts.parametrizations.gate_up_proj, "original", "meta")
    assert experts.gate_up_proj.device.type == "meta"
    state = experts.parametrizations.gate_up_proj[0].quant_state
    assert {t.device.type for t in (state.absmax, state.code, state.offset, state.state2.absmax)} == {"meta"}
