"""What 4-bit costs and saves: bytes, peak memory and time while loading, speed, and how
often the routing still picks the same first expert.

Three ways to hold a model's weights:

  16-bit        the checkpoint as it is, bfloat16 (`from_pretrained(dtype=bfloat16)`)
  plain recipe  transformers v5 with `BitsAndBytesConfig(load_in_4bit=True, nf4, double
                quantization, bfloat16 compute)`: only nn.Linear modules become 4-bit
  moeviz nf4    `load_model(quantization="nf4")`: experts, attention and embeddings in NF4 with
                double quantization, streamed layer by layer (moeviz.model.quantize)

Sizes count parameters, buffers and quantization state. For the bundled model and the test
checkpoint they are measured on the loaded model and also computed from shapes alone
(`quantize.planned_bytes`), which agree; for Mixtral-8x7B they are computed from shapes on
the meta device (no weights needed).

Loads run each in a fresh subprocess: the peak resident memory during the load (VmHWM, reset
just before), the load time, prefill tokens per second (median of rounds, 2 CPU threads), and
for the bundled model the first-choice agreement per layer with its float32 routing on the
held-out samples (a random model's agreement would say little).

    .venv/bin/python benchmarks/quantization.py [--rounds 5] [--sizes-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, MixtralConfig  # noqa: E402

from moeviz.model import quantize, weights  # noqa: E402
from moeviz.model.loading import BUNDLED_MODEL  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "assets" / "samples"
MIXTRAL_8X7B = MixtralConfig(  # mistralai/Mixtral-8x7B-v0.1's config.json
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
)
VARIANTS = ("16-bit", "plain recipe", "moeviz nf4")


def plain_recipe(**overrides) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, **overrides)


def plain_recipe_plan(model: nn.Module) -> dict[str, str]:
    """What the plain recipe quantizes: every nn.Linear but the output embedding."""
    output = model.get_output_embeddings()
    return {f"{name}.weight": quantize.LINEAR for name, module in model.named_modules()
            if type(module) is nn.Linear and module is not output}


def planned(model: nn.Module) -> dict[str, int]:
    """Bytes of each variant, from shapes alone."""
    return {
        "16-bit": quantize.planned_bytes(model, {}, torch.bfloat16, double_quant=False),
        "plain recipe": quantize.planned_bytes(model, plain_recipe_plan(model), torch.bfloat16, double_quant=True),
        "moeviz nf4": quantize.planned_bytes(model, quantize.quantization_plan(model), torch.bfloat16, double_quant=True),
    }


def meta_model(config) -> nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


# -- one load, in its own process --------------------------------------------------------------


def status(field: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))


def load(variant: str, path: Path):
    if variant == "16-bit":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    if variant == "plain recipe":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=plain_recipe())
    if variant == "moeviz nf4":
        return quantize.load_nf4(path, dtype=torch.bfloat16)
    if variant == "float32":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    raise ValueError(variant)


def worker(variant: str, path: Path, rounds: int, tokens: int) -> dict:
    quantize._bitsandbytes(torch.device("cpu"))  # libraries loaded before the measurement
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS
    before, start = status("VmRSS"), time.perf_counter()
    model = load(variant, path).eval()
    result = {"load_s": time.perf_counter() - start, "peak": status("VmHWM") - before,
              "bytes": weights.storage_bytes(model)}
    vocab = model.config.vocab_size
    input_ids = torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(input_ids=input_ids[:, :16])  # warm-up
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            model(input_ids=input_ids)
            times.append(time.perf_counter() - start)
    result["tokens_per_s"] = tokens / statistics.median(times)
    if path == BUNDLED_MODEL:
        result["first_choice"] = first_choices(model, path)
    return result


def first_choices(model, path: Path) -> list[list[list[int]]]:
    """[sample][layer][token] first-choice experts on the held-out samples."""
    from transformers import AutoTokenizer

    from moeviz.model.capture import trace_text

    tokenizer = AutoTokenizer.from_pretrained(path)
    samples = sorted(SAMPLES.glob("*.txt"))
    return [trace_text(model, tokenizer, s.read_text(encoding="utf-8"), max_tokens=512).first_choice.tolist()
            for s in samples]


def run_worker(variant: str, path: Path, rounds: int, tokens: int) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--worker", variant, str(path), "--rounds", str(rounds), "--tokens", str(tokens)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if result.returncode:
        raise RuntimeError(f"{variant} on {path} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_models():
    sys.path.insert(0, str(ROOT / "tests"))
    import test_quant

    return test_quant


def write_test_checkpoint(path: Path) -> int:
    """The hub-layout Mixtral of tests/test_quant.py's peak-memory test: 8 layers, ~306 MiB in bf16."""
    tests = test_models()
    return tests.write_hub_mixtral(path, tests.PEAK_CONFIG)


# -- report ------------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def size_table(rows: dict[str, dict[str, int]], measured: dict[str, dict[str, int]]) -> str:
    lines = ["| model | 16-bit | plain v5 recipe | moeviz nf4 | nf4 / 16-bit | plain / 16-bit |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, sizes in rows.items():
        cells = []
        for variant in VARIANTS:
            cell = mib(sizes[variant])
            if name in measured:
                cell += " (measured)" if measured[name][variant] == sizes[variant] else f" (measured {mib(measured[name][variant])})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {sizes['moeviz nf4'] / sizes['16-bit']:.3f} | "
                     f"{sizes['plain recipe'] / sizes['16-bit']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--sizes-only", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], Path(args.worker[1]), args.rounds, args.tokens)))
        return

    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d')}\n")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp)
        sixteen_bit_file = write_test_checkpoint(checkpoint)
        models = {"Mixtral-8x7B (shapes only)": MIXTRAL_8X7B, "test checkpoint (8-layer Mixtral)": AutoConfig.from_pretrained(checkpoint),
                  "tiny Mixtral of tests/test_quant.py": MixtralConfig(**test_models().MIXTRAL)}
        paths = {"test checkpoint (8-layer Mixtral)": checkpoint}
        if (BUNDLED_MODEL / "model.safetensors").is_file():
            models["bundled model"] = AutoConfig.from_pretrained(BUNDLED_MODEL)
            paths["bundled model"] = BUNDLED_MODEL
        sizes = {name: planned(meta_model(config)) for name, config in models.items()}
        if args.sizes_only:
            print(size_table(sizes, {}))
            return
        loads = {name: {v: run_worker(v, path, args.rounds, args.tokens) for v in VARIANTS} for name, path in paths.items()}
        measured = {name: {v: r["bytes"] for v, r in results.items()} for name, results in loads.items()}
        print("### Bytes of weights (parameters, buffers, quantization state)\n")
        print(size_table(sizes, measured))
        print(f"\nThe test checkpoint's files hold {mib(sixteen_bit_file)} of bf16 tensors.\n")
        print("### Loading and running on this CPU\n")
        print("| model | variant | peak during load | load time | prefill tokens/s |")
        print("|---|---|---:|---:|---:|")
        for name, results in loads.items():
            for variant, r in results.items():
                print(f"| {name} | {variant} | {mib(r['peak'])} | {r['load_s']:.1f} s | {r['tokens_per_s']:,.0f} |")
        if "bundled model" in loads:
            reference = run_worker("float32", BUNDLED_MODEL, 1, args.tokens)["first_choice"]
            print("\n### First-choice agreement with float32 routing, bundled model, held-out samples\n")
            layers = len(reference[0])
            print("| variant | " + " | ".join(f"layer {n}" for n in range(layers)) + " |")
            print("|---|" + "---:|" * layers)
            for variant, r in loads["bundled model"].items():
                same = [sum(a == b for ref, got in zip(reference, r["first_choice"]) for a, b in zip(ref[n], got[n]))
                        for n in range(layers)]
                total = sum(len(sample[0]) for sample in reference)
                print(f"| {variant} | " + " | ".join(f"{s / total:.3f}" for s in same) + " |")


if __name__ == "__main__":
    main()
