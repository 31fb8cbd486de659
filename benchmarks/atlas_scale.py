"""The expert atlas of a big corpus run: out of core (moeviz.analysis.atlas.run_atlas, DuckDB
over the Parquet parts + segment metrics one part at a time) against the naive way (the whole
run read into one pandas DataFrame, exploded and grouped).

A synthetic run in the layout `moeviz corpus` writes (run.json + part-*.parquet, ROW_SCHEMA):
8 MoE layers x 1.25 M tokens = 10 M token x layer rows by default, 8 experts top-2, a 4,096-token
vocabulary, 8 domains, 512-token documents, 64 documents a part. Routing depends on the token
id, the domain and the previous token's choice, so that experts specialise and segments repeat.

Each method runs in its own subprocess (`--method`), which reports its wall time and its peak
resident memory (getrusage ru_maxrss of that process alone) and CPU seconds (user + system,
which a busy shared machine inflates less than wall time); both methods' load counts and top
tokens are checked to agree.

    .venv/bin/python benchmarks/atlas_scale.py [--rows 10000000] [--run /tmp/atlas-bench-run]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's moeviz, not another one installed in the venv

LAYERS, EXPERTS, TOP_K, VOCABULARY, DOMAINS = 8, 8, 2, 4096, 8
DOC_TOKENS, DOCS_PER_PART = 512, 64


def manifest() -> dict:
    return {"format": "moeviz-corpus-run", "version": 1, "model_id": "synthetic", "model_type": "mixtral",
            "num_experts": EXPERTS, "top_k": TOP_K, "num_layers": LAYERS, "layer_ids": list(range(LAYERS)),
            "scoring": "softmax", "router_class": "MixtralTopKRouter", "shared_experts": 0, "encoder_layers": 0,
            "dtype": "float32", "quantization": "none", "max_tokens": DOC_TOKENS}


def write_run(run: Path, rows: int) -> None:
    from moeviz.runs.store import ROW_SCHEMA

    run.mkdir(parents=True, exist_ok=True)
    (run / "run.json").write_text(json.dumps(manifest()), encoding="utf-8")
    rng = np.random.default_rng(0)
    preference = rng.integers(0, EXPERTS, size=(LAYERS, VOCABULARY))  # each token id's favourite expert
    tokens_total = rows // LAYERS
    docs = tokens_total // DOC_TOKENS
    for part, first in enumerate(range(0, docs, DOCS_PER_PART)):
        count = min(DOCS_PER_PART, docs - first)
        tokens = count * DOC_TOKENS
        domain = np.repeat((np.arange(first, first + count) % DOMAINS), DOC_TOKENS)
        token_id = (rng.zipf(1.3, tokens) + domain * 97) % VOCABULARY
        token_id[::DOC_TOKENS] = 0  # every document starts with BOS
        ids = np.empty((tokens, LAYERS, TOP_K), dtype=np.int32)
        for layer in range(LAYERS):
            first_choice = np.where(rng.random(tokens) < 0.6, preference[layer, token_id], (domain + layer) % EXPERTS)
            keep = rng.random(tokens) < 0.3  # repeat the previous token's first choice
            first_choice[1:][keep[1:]] = first_choice[:-1][keep[1:]]
            second = (first_choice + 1 + rng.integers(0, EXPERTS - 1, tokens)) % EXPERTS
            ids[:, layer] = np.stack([first_choice, second], axis=1)
        weights = rng.random((tokens, LAYERS, TOP_K)).astype(np.float32)
        row_count = tokens * LAYERS
        offsets = pa.array(np.arange(0, row_count * TOP_K + 1, TOP_K, dtype=np.int32))
        doc_names = np.repeat(np.array([f"doc-{d:06d}" for d in range(first, first + count)], dtype=object), DOC_TOKENS)
        table = pa.table({
            "doc_id": pa.array(np.repeat(doc_names, LAYERS), pa.string()),
            "domain": pa.array(np.repeat(np.array([f"domain-{d}" for d in domain], dtype=object), LAYERS), pa.string()),
            "position": np.repeat(np.tile(np.arange(DOC_TOKENS, dtype=np.int32), count), LAYERS),
            "token": pa.array(np.repeat(np.array([f"t{t}" for t in token_id], dtype=object), LAYERS), pa.string()),
            "token_id": np.repeat(token_id.astype(np.int32), LAYERS),
            "layer": np.tile(np.arange(LAYERS, dtype=np.int32), tokens),
            "topk_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.ravel())),
            "topk_weights": pa.ListArray.from_arrays(offsets, pa.array(weights.ravel())),
        }, schema=ROW_SCHEMA)
        pq.write_table(table, run / f"part-{part:05d}.parquet")


# -- the two methods --------------------------------------------------------------------------


def out_of_core(run: Path) -> dict:
    from moeviz.analysis.atlas import run_atlas

    atlas = run_atlas(run, excluded_token_ids=frozenset({0}))
    return {"counts": [layer.counts.tolist() for layer in atlas.layers],
            "top": [[t.token_id for t in card.top_tokens] for layer in atlas.layers for card in layer.experts],
            "srp_8": atlas.segments.srp[:, 2].tolist()}


def naive_pandas(run: Path) -> dict:
    """The whole run in one DataFrame: explode the top-k lists, group, and segment each
    (document, layer) in numpy. What one writes without thinking about size."""
    import pandas as pd

    from moeviz.analysis.atlas import segment_match_counts, srp, window_counts

    frame = pd.concat([pd.read_parquet(path) for path in sorted(run.glob("part-*.parquet"))], ignore_index=True)
    frame = frame[frame["token_id"] != 0]
    exploded = frame[["doc_id", "domain", "position", "token_id", "layer", "topk_ids"]].explode("topk_ids")
    exploded["expert"] = exploded["topk_ids"].astype(int)
    counts = exploded.groupby(["layer", "expert"]).size().unstack(fill_value=0).reindex(columns=range(EXPERTS),
                                                                                       fill_value=0)
    exploded.groupby(["layer", "expert", "domain"]).size()
    by_token = exploded.groupby(["layer", "expert", "token_id"]).size().rename("n").reset_index()
    by_token = by_token.sort_values(["layer", "expert", "n", "token_id"], ascending=[True, True, False, True])
    top = by_token.groupby(["layer", "expert"]).head(10).groupby(["layer", "expert"])["token_id"].apply(list)
    frame.groupby(["layer", "token_id"]).size()
    srp_8 = []
    for layer, rows in frame.sort_values(["layer", "doc_id", "position"]).groupby("layer"):
        histogram = np.zeros(9, dtype=np.int64)
        for _, doc in rows.groupby("doc_id"):
            ids = np.stack(doc["topk_ids"].to_numpy())
            stretch = np.where(np.diff(doc["position"].to_numpy(), prepend=-5) == 1, 0, 1).cumsum()
            histogram += segment_match_counts(window_counts(ids, stretch, 8, EXPERTS), 8)
        srp_8.append(srp(histogram, 8))
    return {"counts": counts.to_numpy().tolist(), "top": top.tolist(), "srp_8": srp_8}


METHODS = {"out-of-core": out_of_core, "pandas": naive_pandas}


def measure(method: str, run: Path) -> None:
    start = time.perf_counter()
    result = METHODS[method](run)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                      "peak_bytes": usage.ru_maxrss * 1024, "result": result}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--run", type=Path, default=Path("/tmp/atlas-bench-run"))
    parser.add_argument("--method", choices=list(METHODS))
    args = parser.parse_args()
    if args.method:
        measure(args.method, args.run)
        return
    if not (args.run / "run.json").exists():
        start = time.perf_counter()
        write_run(args.run, args.rows)
        print(f"wrote {args.run} in {time.perf_counter() - start:.1f} s")
    size = sum(p.stat().st_size for p in args.run.glob("part-*.parquet"))
    print(f"{args.rows:,} rows, {len(list(args.run.glob('part-*.parquet')))} parts, {size / 2**20:.0f} MiB of Parquet")
    results = {}
    for method in METHODS:
        done = subprocess.run([sys.executable, __file__, "--method", method, "--run", str(args.run)],
                              capture_output=True, text=True)
        if done.returncode:
            print(f"{method}: failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
            continue
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
        result = results[method]
        print(f"{method:12s} {result['seconds']:7.1f} s wall, {result['cpu_seconds']:7.1f} s CPU (whole process), "
              f"peak RSS {result['peak_bytes'] / 2**30:5.2f} GiB")
    if len(results) == 2:
        ours, theirs = results["out-of-core"], results["pandas"]
        agree = ours["result"]["counts"] == theirs["result"]["counts"] and ours["result"]["top"] == theirs["result"]["top"]
        agree &= np.allclose(ours["result"]["srp_8"], theirs["result"]["srp_8"])
        print(f"results agree: {agree}; time ratio pandas / out-of-core "
              f"{theirs['seconds'] / ours['seconds']:.2f}, memory ratio {theirs['peak_bytes'] / ours['peak_bytes']:.1f}")


if __name__ == "__main__":
    main()
