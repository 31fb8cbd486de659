"""What capturing the routing costs: the model with moeviz's router hooks against the model
alone, and the bytes a trace takes per token.

Two comparisons, each side by side on the same input:

  forward          model(input_ids) alone
  hooked forward   the same call inside `recording_routers(model)`: the hooks' cost

  tokens+forward   tokenize the text, then the plain forward: what any app must do
  trace_text       tokenize, hooked forward and build the RoutingTrace: what moeviz does

Every round times each pair A B B A, so that drift in a shared machine's load falls on both
sides alike; a round's ratio is (B + B) / (A + A), and each ratio reported is the median of
the rounds' ratios. torch runs on one thread by default: on two cores shared with other
jobs, two threads stall whenever one is descheduled, and the noise drowns a 1 % effect.

    .venv/bin/python benchmarks/capture_overhead.py [--model PATH] [--rounds 31] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from moeviz.model.capture import recording_routers, trace_text  # noqa: E402
from moeviz.model.loading import load_model  # noqa: E402
from moeviz.ui import default_model_source  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
LENGTHS = (128, 512, 1024, 2048)


def text_of(tokenizer, tokens: int) -> str:
    """A prefix of the held-out samples (prose, code, maths, other scripts) that tokenizes
    to exactly `tokens` tokens, special tokens included."""
    corpus = "\n".join(path.read_text(encoding="utf-8") for path in sorted(SAMPLES.glob("*.txt")))
    while len(tokenizer(corpus)["input_ids"]) <= tokens:
        corpus += "\n" + corpus
    encoding = tokenizer(corpus, return_offsets_mapping=True)
    cut = encoding["offset_mapping"][tokens][0]
    text = corpus[:cut]
    while len(tokenizer(text)["input_ids"]) > tokens:  # a merge across the cut
        text = text[:-1]
    return text


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure(loaded, tokens: int, rounds: int) -> dict[str, list[float]]:
    model, tokenizer = loaded.model, loaded.tokenizer
    text = text_of(tokenizer, tokens)
    input_ids = torch.tensor([tokenizer(text)["input_ids"]])

    def forward():
        with torch.inference_mode():
            model(input_ids=input_ids, use_cache=False)

    def hooked():
        with recording_routers(model), torch.inference_mode():
            model(input_ids=input_ids, use_cache=False)

    def tokens_forward():
        ids = torch.tensor([tokenizer(text)["input_ids"][:tokens]])
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    def capture():
        trace = trace_text(model, tokenizer, text, max_tokens=tokens)
        assert trace.num_tokens == input_ids.shape[1]

    cases = {"forward": forward, "hooked forward": hooked, "tokens+forward": tokens_forward, "trace_text": capture}
    for function in cases.values():  # warm-up: allocator, kernels, caches
        function()
        function()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for a, b in PAIRS:
            first_a, first_b, second_b, second_a = (timed(cases[name]) for name in (a, b, b, a))
            times[a].append((first_a + second_a) / 2)
            times[b].append((first_b + second_b) / 2)
    return times


PAIRS = (("forward", "hooked forward"), ("tokens+forward", "trace_text"))


def paired_ratio(numerator: list[float], denominator: list[float]) -> str:
    """Median of the rounds' ratios, with the quartiles: the noise a reader must allow for."""
    ratios = [b / a for b, a in zip(numerator, denominator)]
    low, _, high = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.3f} ({low:.3f}–{high:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=default_model_source(), help="folder or hub id (default: the app's default)")
    parser.add_argument("--rounds", type=int, default=31, help="timed rounds per length (at least 15)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu")
    config = loaded.model.config
    print(f"model {loaded.model_id}: {loaded.parameter_count / 1e6:.1f} M parameters, {config.num_hidden_layers} layers; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; {args.rounds} rounds\n")
    print("| tokens | forward (ms) | hooked forward (ms) | hooks ratio (quartiles) | tokens+forward (ms) "
          "| trace_text (ms) | trace_text ratio (quartiles) | trace bytes/token | arrays bytes/token |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tokens in args.lengths:
        times = measure(loaded, tokens, args.rounds)
        median = {name: statistics.median(values) * 1000 for name, values in times.items()}
        trace = trace_text(loaded.model, loaded.tokenizer, text_of(loaded.tokenizer, tokens), max_tokens=tokens)
        arrays = trace.topk_ids.nbytes + trace.topk_weights.nbytes + trace.router_logits.nbytes
        print(f"| {tokens:,} | {median['forward']:.1f} | {median['hooked forward']:.1f} "
              f"| {paired_ratio(times['hooked forward'], times['forward'])} "
              f"| {median['tokens+forward']:.1f} | {median['trace_text']:.1f} "
              f"| {paired_ratio(times['trace_text'], times['tokens+forward'])} "
              f"| {len(trace.to_bytes()) / tokens:,.0f} | {arrays / tokens:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
