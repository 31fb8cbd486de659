"""The GPU acceptance check of moeviz's 4-bit path, in one command, for whoever has a CUDA card
with 40 GB or more (about 8 minutes):

    .venv/bin/python benchmarks/gpu_check.py                 # Mixtral-8x7B-shaped, 4 layers, on the GPU
    .venv/bin/python benchmarks/gpu_check.py --layers 8 --out /tmp/gpu_check
    .venv/bin/python benchmarks/gpu_check.py --device cpu --layers 1 --small   # the smoke run the test suite does

What it does:
1. writes a Mixtral-8x7B-shaped checkpoint in the hub's layout (per-expert w1/w2/w3, random bf16
   weights, full widths 4,096 / 14,336 and the 32,000-token vocabulary, `--layers` decoder
   layers, one safetensors shard per layer) into a temporary folder;
2. loads it with the streamed NF4 loader (`quantize.load_nf4`) onto the device: the bytes of the
   4-bit model against `quantize.planned_bytes`, the peak memory during the load
   (`torch.cuda.max_memory_allocated`; on the CPU the rise of resident memory) against the bound
   the loader promises (4-bit model + 2 layers in bf16 + a fixed allowance), the load time;
3. loads the same checkpoint in bf16 and measures, bf16 against NF4: prefill tokens/s at 512 and
   2,048 tokens, decode tokens/s (greedy, KV cache, routing recorded); the capture overhead
   (NF4 forward inside `recording_routers` / plain forward, 512 tokens); the share of tokens
   whose first-choice expert is the same in NF4 and bf16, per layer (2,048 random tokens);
4. writes `<out>.json` and `<out>.md`, then on a GPU runs the CUDA-marked tests (`pytest -m cuda`).
It exits with 1 when a bound fails or a CUDA test fails. `--small` swaps the widths for tiny
ones (hidden 128) so that the CPU smoke run takes seconds; it checks the same bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's moeviz, not an installed one

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from moeviz.model import quantize, weights  # noqa: E402
from moeviz.model.capture import find_routers, recording_routers  # noqa: E402

MIXTRAL_8X7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768)
SMALL = dict(MIXTRAL_8X7B, vocab_size=1024, hidden_size=128, intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096)
PREFILL_TOKENS = (512, 2048)
LOAD_ALLOWANCE = 256 * 2**20  # quantization scratch, first-use allocations: fixed, whatever the model's size
BOUNDS = {
    "min_first_choice_agreement": 0.80,  # random weights route on small margins; the bundled model agrees >= 0.97
    # Timed bounds hold on a GPU only: a smoke run on a shared CPU measures noise.
    "max_capture_overhead": 1.10,
    "max_total_seconds": 480,
}


def write_checkpoint(path: Path, sizes: dict) -> int:
    """A random bf16 Mixtral in the hub's layout, one shard per layer; returns its bytes."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_quant import write_hub_mixtral  # the writer tests/test_quant.py's peak test uses

    return write_hub_mixtral(path, sizes, layers_per_shard=1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_nf4_measured(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The NF4 model, and its bytes, the peak memory while loading and the load time."""
    quantize._bitsandbytes(device)  # libraries and kernels loaded first: they are not the model's memory
    before = _peak_reset(device)
    start = time.perf_counter()
    model = quantize.load_nf4(path, device=device, dtype=torch.bfloat16)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = _peak(device) - before
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16)
    plan = quantize.quantization_plan(meta)
    planned = quantize.planned_bytes(meta, plan, torch.bfloat16, double_quant=True)
    layer = quantize.largest_layer_bytes(meta, torch.bfloat16)
    return model, {
        "nf4_bytes": weights.storage_bytes(model), "planned_bytes": planned, "load_peak_bytes": peak,
        "load_peak_bound": planned + 2 * layer + LOAD_ALLOWANCE, "load_seconds": seconds,
    }


def _peak_reset(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as clear_refs:  # VmHWM := VmRSS
        clear_refs.write("5")
    return _status("VmRSS")


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status("VmHWM")


def _status(field: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))


def prefill_tokens_per_s(model, ids: torch.Tensor, rounds: int) -> float:
    times = []
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up
        for _ in range(rounds):
            synchronize(ids.device)
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            synchronize(ids.device)
            times.append(time.perf_counter() - start)
    return ids.numel() / statistics.median(times)


def decode_tokens_per_s(model, prompt: torch.Tensor, steps: int) -> float:
    with recording_routers(model), torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        synchronize(prompt.device)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=out.logits[0, -1].argmax().view(1, 1), cache=out.cache, use_cache=True)
        synchronize(prompt.device)
        return steps / (time.perf_counter() - start)


def capture_overhead(model, ids: torch.Tensor, rounds: int) -> float:
    """Median over rounds of (hooked + hooked) / (plain + plain), timed A B B A."""

    def seconds(hooked: bool) -> float:
        synchronize(ids.device)
        start = time.perf_counter()
        with torch.inference_mode():
            if hooked:
                with recording_routers(model):
                    model(input_ids=ids, use_cache=False, logits_to_keep=1)
            else:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
        synchronize(ids.device)
        return time.perf_counter() - start

    seconds(True)
    ratios = []
    for _ in range(rounds):
        plain = seconds(False)
        hooked = seconds(True) + seconds(True)
        ratios.append(hooked / (plain + seconds(False)))
    return statistics.median(ratios)


def first_choices(model, ids: torch.Tensor) -> torch.Tensor:
    """int64 [layers, tokens]: each token's highest-weight expert, per MoE layer."""
    with recording_routers(model) as collector, torch.inference_mode():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    choices = []
    for site in find_routers(model):
        ids_, weights_ = collector[site.name]["ids"][0], collector[site.name]["weights"][0]
        choices.append(ids_.gather(-1, weights_.argmax(-1, keepdim=True)).squeeze(-1))
    return torch.stack(choices)


def measure(path: Path, device: torch.device, sizes: dict, rounds: int, decode_steps: int) -> dict:
    nf4, result = load_nf4_measured(path, device)
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": device}).eval()
    generator = torch.Generator().manual_seed(0)
    tokens = {n: torch.randint(0, sizes["vocab_size"], (1, n), generator=generator).to(device) for n in PREFILL_TOKENS}
    for name, model in (("bf16", bf16), ("nf4", nf4)):
        for n in PREFILL_TOKENS:
            result[f"prefill_{n}_tokens_per_s_{name}"] = prefill_tokens_per_s(model, tokens[n], rounds)
        result[f"decode_tokens_per_s_{name}"] = decode_tokens_per_s(model, tokens[512][:, :32], decode_steps)
    result["capture_overhead_nf4"] = capture_overhead(nf4, tokens[512], rounds)
    same = (first_choices(nf4, tokens[2048]) == first_choices(bf16, tokens[2048])).float().mean(dim=1)
    result["first_choice_agreement_per_layer"] = [round(float(x), 4) for x in same]
    return result


def failed_bounds(result: dict, device: torch.device) -> list[str]:
    failures = []
    if result["nf4_bytes"] != result["planned_bytes"]:
        failures.append(f"4-bit bytes {result['nf4_bytes']:,} differ from planned_bytes {result['planned_bytes']:,}")
    if result["load_peak_bytes"] > result["load_peak_bound"]:
        failures.append(f"load peak {_gib(result['load_peak_bytes'])} above the bound {_gib(result['load_peak_bound'])}")
    if min(result["first_choice_agreement_per_layer"]) < BOUNDS["min_first_choice_agreement"]:
        failures.append(f"first-choice agreement {result['first_choice_agreement_per_layer']} below "
                        f"{BOUNDS['min_first_choice_agreement']}")
    if device.type == "cuda" and result["capture_overhead_nf4"] > BOUNDS["max_capture_overhead"]:
        failures.append(f"capture overhead {result['capture_overhead_nf4']:.3f} above {BOUNDS['max_capture_overhead']}")
    if device.type == "cuda" and result["total_seconds"] > BOUNDS["max_total_seconds"]:
        failures.append(f"took {result['total_seconds']:.0f} s, more than {BOUNDS['max_total_seconds']} s")
    return failures


def markdown(result: dict) -> str:
    rows = [
        ("device", result["device"]), ("layers", result["layers"]), ("widths", result["widths"]),
        ("4-bit bytes / planned_bytes", f"{_gib(result['nf4_bytes'])} / {_gib(result['planned_bytes'])}"),
        ("peak during the load / bound", f"{_gib(result['load_peak_bytes'])} / {_gib(result['load_peak_bound'])}"),
        ("load time", f"{result['load_seconds']:.1f} s"),
    ]
    for n in PREFILL_TOKENS:
        rows.append((f"prefill tokens/s at {n:,}, bf16 / NF4",
                     f"{result[f'prefill_{n}_tokens_per_s_bf16']:,.0f} / {result[f'prefill_{n}_tokens_per_s_nf4']:,.0f}"))
    rows += [
        ("decode tokens/s, bf16 / NF4", f"{result['decode_tokens_per_s_bf16']:,.1f} / {result['decode_tokens_per_s_nf4']:,.1f}"),
        ("capture overhead (NF4, 512 tokens)", f"{result['capture_overhead_nf4']:.3f}"),
        ("first-choice agreement NF4 vs bf16, per layer", ", ".join(f"{x:.3f}" for x in result["first_choice_agreement_per_layer"])),
        ("CUDA tests (pytest -m cuda)", result["cuda_tests"]),
        ("bounds", "all met" if not result["failures"] else "; ".join(result["failures"])),
    ]
    return "\n".join(["| figure | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]) + "\n"


def _gib(size: int) -> str:
    return f"{size / 2**30:,.2f} GiB" if size >= 2**30 else f"{size / 2**20:,.1f} MiB"


def run_cuda_tests() -> tuple[str, int]:
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                            capture_output=True, text=True)
    last = (result.stdout.strip().splitlines() or ["no output"])[-1]
    return last, result.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--small", action="store_true", help="tiny widths (hidden 128, vocabulary 1,024): the CPU smoke run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu_check", help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: this check is for a GPU. For the CPU smoke run: --device cpu --layers 1 --small",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    sizes = dict(SMALL if args.small else MIXTRAL_8X7B, num_hidden_layers=args.layers)
    with tempfile.TemporaryDirectory(prefix="moeviz-gpu-check-") as folder:
        write_checkpoint(Path(folder), sizes)
        result = {"device": str(device), "layers": args.layers, "widths": f"{sizes['hidden_size']} / {sizes['intermediate_size']}",
                  **measure(Path(folder), device, sizes, args.rounds, decode_steps=32 if device.type == "cuda" else 8)}
    result["total_seconds"] = time.perf_counter() - start
    result["failures"] = failed_bounds(result, device)
    tests_status = 0
    if device.type == "cuda":
        result["cuda_tests"], tests_status = run_cuda_tests()
    else:
        result["cuda_tests"] = "not run (no GPU)"
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 1 if result["failures"] or tests_status else 0


if __name__ == "__main__":
    sys.exit(main())
