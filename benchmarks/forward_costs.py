"""What two of issue 12's changes save, measured side by side on the bundled model.

1. Logits nobody reads. A corpus batch (`runs.corpus.trace_batch`: 8 texts of 512 tokens) run
   the old way, every position's logits (`logits_to_keep=0`), against the way moeviz runs it
   now, the last position's only (`logits_to_keep=1`); both inside `recording_routers`, float32
   compute, the model's default on the CPU. Rounds time A B B A; a round's ratio is
   (old + old) / (new + new); the median and quartiles over `--rounds` rounds. Also the bytes of
   the logits tensor each builds.
2. Concurrent sessions on one 4-bit model: the most dequantized fused expert tensors alive at
   once while 1, 2 and 4 threads each trace their own text 3 times (each tensor returned by a
   dequantization is tracked until it is freed). A layer holds 2 (gate_up_proj, down_proj).

    .venv/bin/python benchmarks/forward_costs.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import weakref
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's moeviz, not an installed one

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from moeviz.model import nf4_experts, quantize  # noqa: E402
from moeviz.model.capture import recording_routers, trace_text  # noqa: E402
from moeviz.model.loading import BUNDLED_MODEL  # noqa: E402

SAMPLES = sorted((ROOT / "assets" / "samples").glob("*.txt"))


def logits_costs(rounds: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (8, 512), generator=torch.Generator().manual_seed(0))

    def seconds(keep: int) -> tuple[float, int]:
        start = time.perf_counter()
        with recording_routers(model), torch.inference_mode():
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
        return time.perf_counter() - start, logits.numel() * logits.element_size()

    seconds(0), seconds(1)  # warm-up
    ratios = []
    for _ in range(rounds):
        new = seconds(1)[0]
        old = seconds(0)[0] + seconds(0)[0]
        ratios.append(old / (new + seconds(1)[0]))
    quartiles = statistics.quantiles(ratios, n=4)
    return {"old_over_new": statistics.median(ratios), "quartiles": (quartiles[0], quartiles[2]),
            "logits_bytes_old": seconds(0)[1], "logits_bytes_new": seconds(1)[1]}


def peak_live_experts(threads: int) -> int:
    model = quantize.load_nf4(BUNDLED_MODEL, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    texts = [path.read_text(encoding="utf-8")[:600] for path in SAMPLES[:threads]]
    counts = {"alive": 0, "peak": 0}
    lock = threading.Lock()

    def freed():
        with lock:
            counts["alive"] -= 1

    def tracking(real):
        def tracked(*args, **kwargs):
            out = real(*args, **kwargs)
            if out.ndim >= 3:
                with lock:
                    counts["alive"] += 1
                    counts["peak"] = max(counts["peak"], counts["alive"])
                weakref.finalize(out, freed)
            return out

        return tracked

    functional = sys.modules["bitsandbytes"].functional
    real_whole, real_rows = functional.dequantize_4bit, nf4_experts.dequantize_rows
    functional.dequantize_4bit, nf4_experts.dequantize_rows = tracking(real_whole), tracking(real_rows)
    try:
        workers = [threading.Thread(target=lambda t=t: [trace_text(model, tokenizer, t) for _ in range(3)]) for t in texts]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        functional.dequantize_4bit, nf4_experts.dequantize_rows = real_whole, real_rows
    return counts["peak"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    costs = logits_costs(args.rounds)
    print(f"trace_batch 8 x 512, all logits / last logit: {costs['old_over_new']:.2f} "
          f"({costs['quartiles'][0]:.2f}-{costs['quartiles'][1]:.2f}); logits "
          f"{costs['logits_bytes_old'] / 2**20:,.1f} MiB -> {costs['logits_bytes_new'] / 2**10:,.1f} KiB")
    for threads in (1, 2, 4):
        print(f"{threads} thread(s): at most {peak_live_experts(threads)} dequantized expert tensors alive")


if __name__ == "__main__":
    main()
