"""Decoding with 4-bit experts: tokens per second against 16-bit, and the bytes dequantized per
generated token against the bytes of the experts that token used.

Three variants of one model, all computing in bfloat16:

  16-bit       the weights in bfloat16
  nf4          moeviz's 4-bit model (`quantize.quantize_model`): the hit-experts forward
               (`moeviz.model.nf4_experts`) dequantizes only the experts a step uses
  nf4 whole    the same 4-bit model run through transformers' grouped_mm on whole dequantized
               layers, as moeviz did before issue 12 (`set_experts_implementation("grouped_mm")`)

Two models: the bundled model (assets/model), and one Mixtral-8x7B-shaped layer (hidden 4,096,
expert width 14,336, 8 experts top-2, vocabulary 32,000, random weights; ~2.8 GB in bf16).

Decode speed: a 32-token prompt is prefilled, then `--steps` greedy tokens are decoded one at a
time with the KV cache, inside `recording_routers` as moeviz runs generation; tokens/s of the
decode steps alone. Each round runs the variants in the order A B C C B A; a round's ratio is
(nf4 time)/(16-bit time) summed over its two runs; the median over `--rounds` rounds.

Bytes dequantized: one decoded token, counting every tensor moeviz's one dequantization route
(`nf4_experts._dequantize_blocks`: bitsandbytes' CPU kernel, or `functional.dequantize_4bit`
elsewhere) returns while an experts module runs ("experts") and outside one ("other":
the embedding and a tied lm_head); bitsandbytes' Linear4bit layers (attention, an untied
lm_head) are not counted: in bf16 on a CPU with AVX512-BF16 they multiply by the 4-bit weights
in bitsandbytes' packed kernel and dequantize nothing, elsewhere they dequantize inside
bitsandbytes. "k experts used" = MoE
layers x k x bytes of one expert in bf16.

    .venv/bin/python benchmarks/nf4_decode.py [--rounds 5] [--steps 16] [--threads 1] [--skip-mixtral]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's moeviz, not an installed one
sys.path.insert(0, str(ROOT / "tests"))  # the byte counter the tests use

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, MixtralConfig  # noqa: E402

from moeviz.model import nf4_experts, quantize  # noqa: E402
from moeviz.model.capture import find_routers, recording_routers  # noqa: E402
from moeviz.model.loading import BUNDLED_MODEL  # noqa: E402

from dequantized_bytes import DequantizedBytes  # noqa: E402  (tests/: shared with the byte test)

MIXTRAL_LAYER = MixtralConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32,
    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
)
PROMPT_TOKENS = 32


def decode_seconds(model, prompt: torch.Tensor, steps: int) -> float:
    """Seconds for `steps` greedy decode steps after prefilling `prompt`."""
    with recording_routers(model), torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        start = time.perf_counter()
        for _ in range(steps):
            next_id = out.logits[0, -1].argmax().view(1, 1)
            out = model(input_ids=next_id, cache=out.cache, use_cache=True)
        return time.perf_counter() - start


def bytes_per_token(model, prompt: torch.Tensor) -> dict[str, int]:
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        with DequantizedBytes(model) as counted:
            model(input_ids=out.logits[0, -1].argmax().view(1, 1), cache=out.cache, use_cache=True)
    return {"experts": counted.experts, "other": counted.other}


def used_expert_bytes(model) -> int:
    """MoE layers x k x bytes of one expert (every fused expert tensor's slice) in bf16."""
    sites = find_routers(model)
    experts = sites[0].block.experts
    per_expert = 0
    for plist in experts.parametrizations.values():
        shape = plist[0].quant_state.shape
        per_expert += shape[1:].numel() * torch.bfloat16.itemsize
    return len(sites) * model.config.num_experts_per_tok * per_expert


def measure(name: str, sixteen: torch.nn.Module, rounds: int, steps: int) -> dict:
    nf4 = quantize.quantize_model(copy.deepcopy(sixteen))
    prompt = torch.randint(0, sixteen.config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    variants = {"16-bit": (sixteen, None), "nf4": (nf4, nf4_experts.EXPERTS_IMPLEMENTATION), "nf4 whole": (nf4, "grouped_mm")}

    def run(variant):
        model, implementation = variants[variant]
        if implementation:
            model.set_experts_implementation(implementation)
        return decode_seconds(model, prompt, steps)

    for variant in variants:  # warm-up: first-call allocations, bitsandbytes' lazy setup
        run(variant)
    times = {variant: [] for variant in variants}
    ratios = {"nf4": [], "nf4 whole": []}
    for _ in range(rounds):
        order = list(variants) + list(reversed(variants))
        round_times = {variant: 0.0 for variant in variants}
        for variant in order:
            seconds = run(variant)
            round_times[variant] += seconds
            times[variant].append(seconds)
        for variant in ratios:
            ratios[variant].append(round_times["16-bit"] / round_times[variant])
    nf4.set_experts_implementation(nf4_experts.EXPERTS_IMPLEMENTATION)
    hit = bytes_per_token(nf4, prompt)
    nf4.set_experts_implementation("grouped_mm")
    whole = bytes_per_token(nf4, prompt)
    used = used_expert_bytes(nf4)
    return {
        "model": name,
        "decode_tokens_per_s": {variant: steps / statistics.median(seconds) for variant, seconds in times.items()},
        "speed_vs_16bit": {variant: statistics.median(values) for variant, values in ratios.items()},
        "speed_vs_16bit_quartiles": {variant: statistics.quantiles(values, n=4)[::2] if len(values) > 1 else values * 2
                                     for variant, values in ratios.items()},
        "dequantized_bytes_per_token": {"nf4": hit, "nf4 whole": whole},
        "used_expert_bytes_per_token": used,
        "experts_dequantized_vs_used": {"nf4": hit["experts"] / used, "nf4 whole": whole["experts"] / used},
    }


def bundled() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.bfloat16).eval()


def mixtral_layer() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(MIXTRAL_LAYER, dtype=torch.bfloat16).eval()


def table(results: list[dict]) -> str:
    lines = [
        "| model | 16-bit tok/s | nf4 tok/s | nf4 whole tok/s | nf4 / 16-bit speed | nf4 whole / 16-bit | "
        "experts dequantized per token: nf4 | nf4 whole | k experts used | nf4 / used | other dequantized (nf4) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        speed, ratio, deq = r["decode_tokens_per_s"], r["speed_vs_16bit"], r["dequantized_bytes_per_token"]
        q = r["speed_vs_16bit_quartiles"]
        lines.append(
            f"| {r['model']} | {speed['16-bit']:,.1f} | {speed['nf4']:,.1f} | {speed['nf4 whole']:,.1f} | "
            f"{ratio['nf4']:.2f} ({q['nf4'][0]:.2f}–{q['nf4'][1]:.2f}) | {ratio['nf4 whole']:.2f} | "
            f"{_mib(deq['nf4']['experts'])} | {_mib(deq['nf4 whole']['experts'])} | {_mib(r['used_expert_bytes_per_token'])} | "
            f"{r['experts_dequantized_vs_used']['nf4']:.2f} | {_mib(deq['nf4']['other'])} |"
        )
    return "\n".join(lines)


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per run (the Mixtral layer uses a quarter)")
    parser.add_argument("--skip-mixtral", action="store_true", help="only the bundled model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
          file=sys.stderr)
    results = [measure("bundled model (assets/model)", bundled(), args.rounds, args.steps)]
    if not args.skip_mixtral:
        results.append(measure("one Mixtral-8x7B-shaped layer (random)", mixtral_layer(), max(3, args.rounds // 2),
                               max(2, args.steps // 4)))
    print(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
