"""Measure a bundled model on the held-out samples, as tests/test_bundled_model.py does, and
print the model card's tables (Markdown): perplexity against a unigram model and the same
architecture untrained, held-out loss, expert balance, specialisation, and the routing targets
(adjacent same first choice, most-used expert's first-choice share) per layer and sample.

Usage: python scripts/measure_bundled.py mixtral     (or deepseek)
       python scripts/measure_bundled.py mixtral --folder RUN   (a training run's output before it ships)
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test's own measuring functions, so card and test agree

import test_bundled_model as measure  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def heldout_loss(model, tokenizer, window: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for domain in measure.DOMAINS:
            text = (measure.SAMPLES_DIR / f"{domain}.txt").read_text(encoding="utf-8")
            for ids in measure.sample_windows(tokenizer, text, window):
                total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
                count += ids.shape[1] - 1
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=list(measure.MODEL_DIRS))
    parser.add_argument("--folder", type=Path, help="measure this model folder instead of the bundled one")
    args = parser.parse_args()
    folder = args.folder or measure.MODEL_DIRS[args.arch]
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    num_experts = model.config.num_local_experts
    window = model.config.max_position_embeddings
    windows = {d: measure.sample_windows(tokenizer, (measure.SAMPLES_DIR / f"{d}.txt").read_text(encoding="utf-8"), window)
               for d in measure.DOMAINS}
    trained = {d: measure.run_domain(model, w) for d, w in windows.items()}
    torch.manual_seed(0)
    untrained_model = type(model)(model.config).eval()
    untrained = {d: measure.run_domain(untrained_model, w) for d, w in windows.items()}
    layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]

    print(f"held-out loss: {heldout_loss(model, tokenizer, 512):.3f} nats in 512-token windows, "
          f"{heldout_loss(model, tokenizer, window):.3f} with each sample whole\n")
    print(table(["domain", "model", "unigram", "untrained"], [
        [d, f"{np.exp(trained[d].nll.mean()):,.1f}", f"{np.exp(measure.unigram_nll(folder, trained[d].target_ids).mean()):,.1f}",
         f"{np.exp(untrained[d].nll.mean()):,.0f}"] for d in measure.DOMAINS]) + "\n")

    topk = np.concatenate([r.topk_ids for r in trained.values()], axis=1)
    load = measure.expert_load(topk, num_experts)
    print(f"balance over {topk.shape[1]:,} tokens (even: {1 / num_experts:.1%})")
    print(table(["layer", *map(str, layers)], [
        ["least-used expert", *(f"{v:.1%}" for v in load.min(axis=1))],
        ["most-used expert", *(f"{v:.1%}" for v in load.max(axis=1))]]) + "\n")

    spec_t = measure.specialisation_ratio(trained, num_experts)
    spec_u = measure.specialisation_ratio(untrained, num_experts)
    print(table(["specialisation", *map(str, layers), "best"], [
        ["trained", *(f"{v:.1f}" for v in spec_t), f"{spec_t.max():.1f}"],
        ["untrained", *(f"{v:.1f}" for v in spec_u), f"{spec_u.max():.1f}"]]))
    print(f"best trained / best untrained: {spec_t.max() / spec_u.max():.1f}x\n")

    rows_adjacent, rows_share = [], []
    for d in measure.DOMAINS:
        first = trained[d].topk_ids[:, :, 0]
        rows_adjacent.append([d, *(f"{v:.2f}" for v in (first[:, 1:] == first[:, :-1]).mean(axis=1))])
        rows_share.append([d, *(f"{np.bincount(f, minlength=num_experts).max() / len(f):.2f}" for f in first)])
    print(f"adjacent tokens with the same first choice (target <= {measure.MAX_ADJACENT_SAME_FIRST})")
    print(table(["sample", *map(str, layers)], rows_adjacent) + "\n")
    print(f"most-used expert's share of first choices (target <= {measure.MAX_TOP_FIRST_SHARE})")
    print(table(["sample", *map(str, layers)], rows_share))


if __name__ == "__main__":
    main()
