"""The expert atlas: what each expert does, over a set of traces or a whole corpus run.

Per (layer, expert): load share, top tokens by vocabulary specialization (OLMoE Eq. 8), its
share of each domain (Eq. 7), co-activation partners (Eq. 6), the entropy of its token and
domain distributions, and its max-activating contexts. Per layer: MaxVio, coefficient of
variation, Jain's index, tokens per expert (min / median / p95 / max) and dead experts. Per
layer and segment length n: SRP and SCH (local routing consistency, arXiv 2505.16056).

Counts come from DuckDB queries over one relation of rows, one per (document, position, MoE
layer) as in `moeviz.runs.store.ROW_SCHEMA`: an in-memory Arrow table for traces, the run's
Parquet part files read out of core for a run (`run_atlas`), so a run never sits whole in
memory. Segment metrics stream document by document (one part file at a time) in numpy.
No torch.

Which tokens count: `counted` masks (traces) and `excluded_token_ids` (runs) leave tokens
out of every statistic (e.g. special tokens; `special_token_ids` reads them from a tokenizer
file). Contexts still show them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moeviz.runs.store import NO_DOMAIN, RunError, RunManifest, finished_run
from moeviz.trace import RoutingTrace, layer_label

SEGMENT_LENGTHS = (2, 4, 8, 16, 32, 64)
PHASES = ("all", "prefill", "generated")
DEAD_SHARE = 0.01  # an expert is dead below 1% of the uniform load
CONTEXT_WINDOW = 8  # tokens shown on each side of a max-activating token
DUCKDB_MEMORY = "512MB"  # DuckDB spills to disk beyond this: a run never sits whole in memory
SCH_CHANCE_SEED = 0


# -- the formulas -----------------------------------------------------------------------------


def load_share(counts: np.ndarray) -> np.ndarray:
    """float[experts]: each expert's share of a layer's top-k assignments, counts int[experts]
    (the assignments per expert). Sums to 1; uniform balance gives 1/E."""
    counts = np.asarray(counts, dtype=np.float64)
    return counts / counts.sum() if counts.sum() else np.zeros_like(counts)


def maxvio(counts: np.ndarray) -> float:
    """Maximal violation of balance (Wang et al., Auxiliary-Loss-Free Load Balancing,
    arXiv 2408.15664, Sec. 4.1): "MaxVio = (max_i Load_i − mean Load_i) / mean Load_i, where
    Load_i represents the number of tokens assigned to the i-th expert, and mean Load_i denotes
    the expected expert load under perfect load balance". 0 when balanced; E − 1 when one expert
    takes everything."""
    counts = np.asarray(counts, dtype=np.float64)
    mean = counts.mean()
    return float((counts.max() - mean) / mean) if mean else 0.0


def coefficient_of_variation(counts: np.ndarray) -> float:
    """Population standard deviation of the per-expert counts over their mean."""
    counts = np.asarray(counts, dtype=np.float64)
    return float(counts.std() / counts.mean()) if counts.mean() else 0.0


def jain_index(counts: np.ndarray) -> float:
    """Jain's fairness index (Jain, Chiu and Hawe, 1984): J = (Σ x_i)² / (n · Σ x_i²), from 1/n
    (one expert takes everything) to 1 (perfect balance)."""
    counts = np.asarray(counts, dtype=np.float64)
    squares = (counts**2).sum()
    return float(counts.sum() ** 2 / (len(counts) * squares)) if squares else 0.0


def dead_experts(counts: np.ndarray) -> list[int]:
    """Experts whose load is below 1% of the uniform load (assignments / E)."""
    counts = np.asarray(counts, dtype=np.float64)
    return [int(e) for e in np.flatnonzero(counts < DEAD_SHARE * counts.sum() / len(counts))]


def coactivation_share(pair_counts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """float[experts, experts], OLMoE (arXiv 2409.02060, §5, Eq. 6): "Expert co-activation
    (E_i, E_j) = N_{E_i,E_j} / N_{E_i}, where N_{E_i} is the number of times expert E_i is
    activated and N_{E_i,E_j} the number of times E_i and E_j are activated together" (for the
    same token, both in its top-k). Asymmetric: row i is divided by expert i's count. The
    diagonal is 0; rows of experts never activated are 0.

    pair_counts: int[experts, experts], tokens with both i and j in their top-k (i != j).
    (OLMoE's script counts only neighbouring ids of the sorted top-8 list; this counts all pairs,
    as the equation says.)"""
    counts = np.asarray(counts, dtype=np.float64)
    shares = np.divide(pair_counts, counts[:, None], out=np.zeros(pair_counts.shape), where=counts[:, None] > 0)
    np.fill_diagonal(shares, 0.0)
    return shares


def domain_specialization(routed: np.ndarray, domain_tokens: np.ndarray) -> np.ndarray:
    """float[experts, domains], OLMoE (arXiv 2409.02060, §5, Eq. 7): "Domain specialization
    (E_i, D) = N^{(k)}_{E_i,D} / N_D, where N_D is the total number of tokens in domain D and
    N^{(k)}_{E_i,D} the number of tokens of D routed to E_i" among their top-k. The uniform
    value is k/E: an expert above it takes more than its share of the domain.

    routed: int[experts, domains]; domain_tokens: int[domains]."""
    domain_tokens = np.asarray(domain_tokens, dtype=np.float64)
    return np.divide(routed, domain_tokens, out=np.zeros(np.shape(routed)), where=domain_tokens > 0)


def vocabulary_specialization(routed: np.ndarray, occurrences: np.ndarray) -> np.ndarray:
    """OLMoE (arXiv 2409.02060, §5, Eq. 8): "Vocabulary specialization(E_i, x) =
    N^{(k)}_{x,E_i} / N_x, where N_x is the total number of tokens with ID x and N^{(k)}_{x,E_i}
    the number of those routed to E_i" among their top-k: the share of a token id's
    occurrences routed to the expert (chance k/E). Elementwise over matching arrays."""
    occurrences = np.asarray(occurrences, dtype=np.float64)
    return np.divide(routed, occurrences, out=np.zeros(np.shape(routed)), where=occurrences > 0)


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy in bits of the distribution proportional to counts (0 log 0 = 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if not total:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def segment_match_counts(window_counts: np.ndarray, n: int) -> np.ndarray:
    """int[n + 1]: hist[c] = (segment, expert) pairs in which the expert is activated c times,
    from window_counts int[experts, segments] (activations in each n-token segment). The
    sufficient statistic of SRP, accumulated over documents."""
    return np.bincount(window_counts.ravel().view(np.uint8) if window_counts.dtype == np.int8
                       else window_counts.ravel(), minlength=n + 1)


def srp(histogram: np.ndarray, n: int) -> float:
    """Segment routing best performance (Liang et al., arXiv 2505.16056; ljcleo/moe-lrc,
    src/30_srp_calc.py and src/31_srp_refine.py): for every n-token segment, predict that an
    expert serves the *whole* segment iff it is activated in at least j of its tokens; score
    the prediction against the real activations by F1 and take the best threshold j:

        matches(j) = Σ_{c ≥ j} c · hist[c]       ("num_matches")
        preds(j)   = n · Σ_{c ≥ j} hist[c]       ("num_preds")
        acts       = matches(0)                  ("num_acts")
        SRP        = max_j 2 · matches(j) / (preds(j) + acts)     ("best_f1")

    hist[c] counts (segment, expert) pairs with c activations (`segment_match_counts`),
    summed over the layer's experts as the repository's layer level does (one j for all).
    1 when every segment uses one fixed set of experts throughout."""
    hist = np.asarray(histogram, dtype=np.float64)
    c = np.arange(n + 1)
    matches = np.cumsum((c * hist)[::-1])[::-1]
    preds = n * np.cumsum(hist[::-1])[::-1]
    acts = matches[0]
    if not acts:
        return float("nan")
    return float((2 * matches / np.maximum(preds + acts, 1)).max())


def sch_hits(window_counts: np.ndarray, cache_size: int) -> int:
    """Activations served by each segment's best cache of `cache_size` experts: the sum over
    segments of its `cache_size` largest expert counts, window_counts int[experts, segments].
    The numerator of SCH."""
    experts = window_counts.shape[0]
    if cache_size >= experts:
        return int(window_counts.sum(dtype=np.int64))
    if experts > SORTING_NETWORK_MAX:
        return int(np.sort(window_counts, axis=0)[-cache_size:].sum(dtype=np.int64))
    # A sorting network over the expert rows: a few vectorised min/max over all segments at
    # once, where np.sort would sort each segment's short row on its own (~40x slower).
    rows = [window_counts[e] for e in range(experts)]
    rows += [np.zeros_like(rows[0])] * (_next_power_of_two(experts) - experts)  # counts >= 0
    for i, j in _batcher_pairs(len(rows)):
        rows[i], rows[j] = np.minimum(rows[i], rows[j]), np.maximum(rows[i], rows[j])
    return sum(int(row.sum(dtype=np.int64)) for row in rows[-cache_size:])


SORTING_NETWORK_MAX = 64


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _batcher_pairs(size: int) -> list[tuple[int, int]]:
    """Comparators (i, j), i < j, of Batcher's odd-even merge sort of `size` (a power of two)
    values: applying min to i and max to j in order sorts them ascending (Knuth, TAOCP 3,
    5.3.4, Algorithm M)."""
    pairs = []

    def merge(low: int, length: int, stride: int) -> None:
        step = stride * 2
        if step < length:
            merge(low, length, step)
            merge(low + stride, length, step)
            pairs.extend((i, i + stride) for i in range(low + stride, low + length - stride, step))
        else:
            pairs.append((low, low + stride))

    def sort(low: int, length: int) -> None:
        if length > 1:
            half = length // 2
            sort(low, half)
            sort(low + half, half)
            merge(low, length, 1)

    sort(0, size)
    return pairs


def sch(hits: int, segments: int, n: int, k: int) -> float:
    """Segment cache best hit rate (Liang et al., arXiv 2505.16056 v1; ljcleo/moe-lrc,
    src/40_sch_calc.py): the hit rate of a cache holding, for each n-token segment, the best m
    experts for that segment (the m most activated in it), fixed for the whole segment:

        SCH(n, m) = Σ_segments (sum of the segment's m largest expert counts) / (k · n · segments)

    ("sorted_val ... cumsum / (mask.shape[0] * top_k * seg_len * segments)"). 1 when each
    segment uses at most m experts. (v4 of the paper replaces it with a cache that looks n
    tokens ahead, src/41_sch_calc.py.)"""
    return hits / (k * n * segments) if segments else float("nan")


def srp_chance(num_experts: int, k: int, n: int) -> float:
    """SRP if every token drew its k experts uniformly and independently: an expert's count in
    a segment is then Binomial(n, k/E), and hist is proportional to its probabilities."""
    p = k / num_experts
    hist = np.array([math.comb(n, c) * p**c * (1 - p) ** (n - c) for c in range(n + 1)])
    return srp(hist, n)


def sch_chance(num_experts: int, k: int, n: int, cache_size: int) -> float:
    """SCH under uniform independent routing, estimated on up to 2,000 random segments (seeded:
    the same value on every call; fewer for many experts, to bound memory)."""
    samples = max(100, min(2000, 4_000_000 // (n * num_experts)))
    rng = np.random.default_rng(SCH_CHANCE_SEED)
    picks = rng.random((samples, n, num_experts)).argpartition(k, axis=-1)[..., :k]
    counts = np.zeros((samples, num_experts), dtype=np.int64)
    np.add.at(counts, (np.arange(samples)[:, None, None], picks), 1)
    return sch(sch_hits(counts.T, cache_size), samples, n, k)


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopToken:
    token_id: int
    token: str
    count: int  # tokens with this id routed to the expert (top-k)
    share: float  # Eq. 8: of all occurrences of the id, the share routed to the expert


@dataclass(frozen=True)
class Context:
    """A max-activating example: `tokens[focus]` is the token at `position` of document `doc`."""

    doc: str
    position: int
    score: float
    tokens: list[str]
    focus: int


@dataclass(frozen=True)
class ExpertCard:
    expert: int
    count: int  # tokens that have the expert in their top-k
    load_share: float  # of the layer's top-k assignments
    top_tokens: list[TopToken]
    domain_share: dict[str, float]  # Eq. 7, uniform k/E
    partners: list[tuple[int, float]]  # Eq. 6, most frequent first
    token_entropy: float  # bits, of the token ids routed to it
    domain_entropy: float  # 0 (one domain) .. 1 (all alike), of its Eq. 7 shares normalised
    contexts: list[Context]


@dataclass(frozen=True, eq=False)
class LayerAtlas:
    """One MoE layer. counts int[experts]: assignments per expert; coactivation float[E, E]
    (Eq. 6, rows divided by the row expert's count)."""

    layer: int
    label: str
    tokens: int
    counts: np.ndarray
    coactivation: np.ndarray
    vocabulary_entropy: float  # bits, of all counted token ids: the reference for token_entropy
    experts: list[ExpertCard]

    @property
    def maxvio(self) -> float:
        return maxvio(self.counts)

    @property
    def cv(self) -> float:
        return coefficient_of_variation(self.counts)

    @property
    def jain(self) -> float:
        return jain_index(self.counts)

    @property
    def dead_experts(self) -> list[int]:
        return dead_experts(self.counts)

    @property
    def tokens_per_expert(self) -> dict[str, float]:
        """min / median / p95 / max of the assignments per expert."""
        counts = self.counts.astype(np.float64)
        return {"min": counts.min(), "median": float(np.median(counts)),
                "p95": float(np.percentile(counts, 95)), "max": counts.max()}


@dataclass(frozen=True, eq=False)
class SegmentConsistency:
    """srp, sch: float[layers, lengths] (nan where no segment is that long); chance levels
    float[lengths] for uniform independent routing; segments int[layers, lengths]."""

    lengths: tuple[int, ...]
    srp: np.ndarray
    sch: np.ndarray
    srp_chance: np.ndarray
    sch_chance: np.ndarray
    segments: np.ndarray
    cache_size: int


@dataclass(frozen=True, eq=False)
class Atlas:
    model_id: str
    num_experts: int
    top_k: int
    layer_ids: list[int]
    encoder_layers: int
    phase: str  # "all", "prefill" or "generated"
    domains: dict[str, int]  # counted tokens per domain
    score_kind: str  # what contexts are ranked by: "router probability", "mixing weight", "" (none)
    layers: list[LayerAtlas]
    segments: SegmentConsistency
    excluded_tokens: int = 0  # tokens left out (special tokens, other phase)
    has_generated: bool = False

    def layer(self, layer_id: int) -> LayerAtlas:
        for layer in self.layers:
            if layer.layer == layer_id:
                return layer
        raise ValueError(f"layer {layer_id} is not a MoE layer of this collection; MoE layers are {self.layer_ids}")


# -- which tokens count -----------------------------------------------------------------------


def special_token_ids(model_folder: str | Path) -> frozenset[int]:
    """The ids of the special tokens (BOS, EOS, PAD, ...) of the tokenizer in a model folder,
    read from its tokenizer.json ("added_tokens" marked "special"); empty when there is none."""
    path = Path(model_folder) / "tokenizer.json"
    if not path.is_file():
        return frozenset()
    try:
        added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens") or []
        return frozenset(int(token["id"]) for token in added if token.get("special"))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        raise ValueError(f"{path} is not a readable tokenizer file") from None


def counted_mask(trace: RoutingTrace, excluded_token_ids: frozenset[int] = frozenset()) -> np.ndarray:
    """bool[tokens]: True for the tokens whose id is not excluded."""
    return ~np.isin(np.asarray(trace.token_ids), list(excluded_token_ids))


# -- building an atlas ------------------------------------------------------------------------


def trace_atlas(traces: Mapping[str, RoutingTrace], domains: Mapping[str, str] | None = None, *,
                counted: Mapping[str, np.ndarray] | None = None, phase: str = "all", top: int = 10,
                contexts: int = 5, cache_size: int | None = None) -> Atlas:
    """The atlas of traces of one model, by name. `domains` maps a name to its domain (default:
    the name itself); `counted` maps a name to bool[tokens], the tokens to count (default: all).
    `phase` keeps prefill or generated tokens only. Contexts are ranked by router probability
    (traces with logits) or mixing weight (weights only)."""
    if not traces:
        raise ValueError("no traces to build an atlas from: give at least one")
    first = next(iter(traces.values()))
    for name, trace in traces.items():
        if (trace.num_experts, trace.top_k, trace.layer_ids) != (first.num_experts, first.top_k, first.layer_ids):
            raise ValueError(
                f"{name!r} comes from another model ({trace.num_experts} experts, top-{trace.top_k}, layers "
                f"{trace.layer_ids}) than the first trace ({first.num_experts}, top-{first.top_k}, {first.layer_ids}): "
                "an atlas needs traces of one model"
            )
    domains = domains or {name: name for name in traces}
    counted = {name: _checked_mask(trace, (counted or {}).get(name), name) for name, trace in traces.items()}
    table = pa.concat_tables(_trace_table(name, domains.get(name, name), trace, counted[name])
                             for name, trace in traces.items())
    score_kind = ("router probability" if all(t.has_logits for t in traces.values())
                  else "mixing weight" if all(t.has_weights for t in traces.values()) else "")
    batches = (_trace_segments(trace, counted[name], phase) for name, trace in traces.items())
    with _connection() as con:
        con.register("rows", table)
        return _atlas(con, batches, model_id=first.model_id, num_experts=first.num_experts, top_k=first.top_k,
                      layer_ids=first.layer_ids, encoder_layers=first.encoder_layers, phase=phase, top=top,
                      contexts=contexts, cache_size=cache_size, score_kind=score_kind,
                      has_generated=any(t.generated for t in traces.values()))


def run_atlas(run_dir: str | Path, *, excluded_token_ids: frozenset[int] = frozenset(), top: int = 10,
              contexts: int = 5, cache_size: int | None = None) -> Atlas:
    """The atlas of a corpus run, out of core: DuckDB reads the Parquet part files (spilling
    to disk past DUCKDB_MEMORY) and segment metrics stream one part at a time. Tokens whose id
    is in `excluded_token_ids` (e.g. BOS) are left out; a run records no special-token ids
    itself, so the caller says which. Contexts are ranked by mixing weight (runs keep no logits).
    """
    manifest, parts = finished_run(run_dir)
    excluded = sorted(int(i) for i in excluded_token_ids)
    files = ", ".join(_sql_text(str(path)) for path in parts)
    with _connection() as con:
        con.execute(f"""
            CREATE VIEW rows AS SELECT doc_id AS doc, coalesce(domain, {_sql_text(NO_DOMAIN)}) AS domain, position,
                   token, token_id, layer, topk_ids, topk_weights AS scores,
                   NOT list_contains({excluded}::INTEGER[], token_id) AS counted, 'prefill' AS phase
            FROM read_parquet([{files}])""")
        has_weights = con.execute("SELECT bool_or(scores IS NOT NULL) FROM (SELECT scores FROM rows LIMIT 1000)").fetchone()[0]
        batches = (_run_segments(path, manifest, excluded) for path in parts)
        return _atlas(con, batches, model_id=manifest.model_id, num_experts=manifest.num_experts,
                      top_k=manifest.top_k, layer_ids=manifest.layer_ids, encoder_layers=manifest.encoder_layers,
                      phase="all", top=top, contexts=contexts, cache_size=cache_size,
                      score_kind="mixing weight" if has_weights else "", has_generated=False)


def _connection() -> duckdb.DuckDBPyConnection:
    return duckdb.connect(config={"memory_limit": DUCKDB_MEMORY, "threads": 2, "preserve_insertion_order": False})


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _checked_mask(trace: RoutingTrace, mask, name: str) -> np.ndarray:
    if mask is None:
        return np.ones(trace.num_tokens, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (trace.num_tokens,):
        raise ValueError(f"the mask of {name!r} has shape {mask.shape}; expected one flag per token ({trace.num_tokens},)")
    return mask


def _phases(trace: RoutingTrace) -> np.ndarray:
    generated = np.zeros(trace.num_tokens, dtype=bool)
    if trace.generated:
        generated[trace.generated_from:] = True
    return np.where(generated, "generated", "prefill")


def _trace_table(name: str, domain: str, trace: RoutingTrace, counted: np.ndarray) -> pa.Table:
    """The rows of one trace in ROW_SCHEMA's layout (token-major, layers inner), plus its
    scores (router probabilities of the chosen experts, else their weights), the counted flag
    and the phase."""
    layers, tokens, k = trace.topk_ids.shape
    rows = tokens * layers
    ids = trace.topk_ids.transpose(1, 0, 2).reshape(rows, k)
    offsets = pa.array(np.arange(0, rows * k + 1, k, dtype=np.int32))
    if trace.has_logits:
        scores = np.take_along_axis(trace.router_probs, trace.topk_ids.astype(np.int64), axis=-1)
    else:
        scores = trace.topk_weights
    score_column = (pa.nulls(rows, pa.list_(pa.float32())) if scores is None else pa.ListArray.from_arrays(
        offsets, pa.array(scores.transpose(1, 0, 2).reshape(-1).astype(np.float32))))
    return pa.table({
        "doc": pa.repeat(pa.scalar(name, pa.string()), rows),
        "domain": pa.repeat(pa.scalar(domain, pa.string()), rows),
        "position": np.repeat(np.arange(tokens, dtype=np.int32), layers),
        "token": pa.array(np.repeat(np.array(trace.tokens, dtype=object), layers), pa.string()),
        "token_id": np.repeat(np.asarray(trace.token_ids, dtype=np.int32), layers),
        "layer": np.tile(np.asarray(trace.layer_ids, dtype=np.int32), tokens),
        "topk_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.ravel().astype(np.int32))),
        "scores": score_column,
        "counted": np.repeat(counted, layers),
        "phase": pa.array(np.repeat(_phases(trace), layers), pa.string()),
    })


def _atlas(con, batches, *, model_id, num_experts, top_k, layer_ids, encoder_layers, phase, top, contexts,
           cache_size, score_kind, has_generated) -> Atlas:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if top < 1 or contexts < 0:
        raise ValueError(f"top must be at least 1 and contexts at least 0, got {top} and {contexts}")
    cache_size = min(2 * top_k if cache_size is None else cache_size, num_experts)
    if cache_size < 1:
        raise ValueError(f"cache_size must be at least 1, got {cache_size}")
    where = "counted" + ("" if phase == "all" else f" AND phase = {_sql_text(phase)}")
    con.execute(f"CREATE TEMP VIEW counted_rows AS SELECT * FROM rows WHERE {where}")
    counts = _Counts.query(con, top_k, num_experts, layer_ids, top)
    hits = _contexts(con, top_k, contexts) if contexts and score_kind else {}
    layers = [_layer_atlas(counts, position, layer, hits, layer_label(layer, encoder_layers))
              for position, layer in enumerate(layer_ids)]
    rows_total = con.execute("SELECT count(*) FROM rows").fetchone()[0]
    return Atlas(
        model_id=model_id, num_experts=num_experts, top_k=top_k, layer_ids=list(layer_ids),
        encoder_layers=encoder_layers, phase=phase, domains=counts.domain_tokens, score_kind=score_kind,
        layers=layers, segments=_segments(batches, num_experts, top_k, len(layer_ids), cache_size),
        excluded_tokens=(rows_total - counts.rows) // max(len(layer_ids), 1), has_generated=has_generated,
    )


@dataclass
class _Counts:
    """What the SQL queries return, as dense numpy arrays by layer position."""

    rows: int
    tokens: np.ndarray  # int[layers]
    domain_tokens: dict[str, int]
    domain_routed: np.ndarray  # int[layers, experts, domains]
    pairs: np.ndarray  # int[layers, experts, experts]
    vocabulary_entropy: np.ndarray  # float[layers]
    token_entropy: np.ndarray  # float[layers, experts]
    top_tokens: dict[tuple[int, int], list[TopToken]]  # (layer position, expert) -> top tokens

    @classmethod
    def query(cls, con, k: int, experts: int, layer_ids: list[int], top: int) -> _Counts:
        index = {layer: i for i, layer in enumerate(layer_ids)}
        layers = len(layer_ids)
        tokens = np.zeros(layers, dtype=np.int64)
        domain_rows = con.execute("SELECT layer, domain, count(*) FROM counted_rows GROUP BY ALL").fetchall()
        names = sorted({d for _, d, _ in domain_rows}, key=lambda d: (d == NO_DOMAIN, d))
        domain_of = {d: i for i, d in enumerate(names)}
        domain_tokens = dict.fromkeys(names, 0)
        for layer, domain, n in domain_rows:
            tokens[index[layer]] += n
            if layer == layer_ids[0]:
                domain_tokens[domain] = n
        routed = np.zeros((layers, experts, len(names)), dtype=np.int64)
        for layer, domain, expert, n in con.execute(f"""
                SELECT layer, domain, topk_ids[i], count(*) FROM counted_rows, range(1, {k + 1}) r(i)
                GROUP BY ALL""").fetchall():
            routed[index[layer], expert, domain_of[domain]] = n
        pairs = np.zeros((layers, experts, experts), dtype=np.int64)
        for layer, a, b, n in con.execute(f"""
                SELECT layer, topk_ids[i], topk_ids[j], count(*)
                FROM counted_rows, range(1, {k + 1}) r(i), range(1, {k + 1}) s(j) WHERE i <> j GROUP BY ALL""").fetchall():
            pairs[index[layer], a, b] = n
        vocabulary_entropy, token_entropy, top_tokens = cls._vocabulary(con, k, experts, index, top)
        return cls(int(tokens.sum()), tokens, domain_tokens, routed, pairs, vocabulary_entropy, token_entropy,
                   top_tokens)

    @staticmethod
    def _vocabulary(con, k, experts, index, top):
        con.execute("""CREATE TEMP TABLE occurrences AS SELECT layer, token_id, count(*) AS n, min(token) AS token
                       FROM counted_rows GROUP BY ALL""")
        con.execute(f"""CREATE TEMP TABLE routed_ids AS SELECT layer, topk_ids[i] AS expert, token_id, count(*) AS n
                        FROM counted_rows, range(1, {k + 1}) r(i) GROUP BY ALL""")
        entropy = "0.0 - sum(n / total * log2(n / total))"  # 0.0 - x: never -0.0
        vocabulary_entropy = np.zeros(len(index))
        for layer, value in con.execute(f"""SELECT layer, {entropy} FROM (SELECT layer, n, sum(n) OVER (PARTITION BY layer)
                                         AS total FROM occurrences) GROUP BY layer""").fetchall():
            vocabulary_entropy[index[layer]] = value
        token_entropy = np.zeros((len(index), experts))
        for layer, expert, value in con.execute(f"""
                SELECT layer, expert, {entropy} FROM (SELECT layer, expert, n,
                       sum(n) OVER (PARTITION BY layer, expert) AS total FROM routed_ids) GROUP BY ALL""").fetchall():
            token_entropy[index[layer], expert] = value
        top_tokens: dict[tuple[int, int], list[TopToken]] = {}
        for layer, expert, token_id, token, n, total in con.execute(f"""
                SELECT r.layer, r.expert, r.token_id, o.token, r.n, o.n FROM routed_ids r
                JOIN occurrences o USING (layer, token_id)
                QUALIFY row_number() OVER (PARTITION BY r.layer, r.expert ORDER BY r.n DESC, r.token_id) <= {top}
                ORDER BY r.layer, r.expert, r.n DESC, r.token_id""").fetchall():
            top_tokens.setdefault((index[layer], expert), []).append(
                TopToken(int(token_id), token, int(n), float(vocabulary_specialization(n, total))))
        return vocabulary_entropy, token_entropy, top_tokens


def _contexts(con, k: int, count: int) -> dict[tuple[int, int], list[Context]]:
    """(layer, expert) -> its `count` highest-scoring tokens, with CONTEXT_WINDOW tokens each
    side (from the document's rows of its first layer)."""
    best = con.execute(f"""
        SELECT layer, topk_ids[i] AS expert, max_by({{'doc': doc, 'position': position, 'score': scores[i]}},
               scores[i], {count}) AS hits
        FROM counted_rows, range(1, {k + 1}) r(i) WHERE scores IS NOT NULL GROUP BY ALL""").fetchall()
    hits = [(layer, expert, h["doc"], h["position"], h["score"]) for layer, expert, found in best for h in found]
    if not hits:
        return {}
    wanted = pa.table({"doc": [h[2] for h in hits], "lo": [h[3] - CONTEXT_WINDOW for h in hits],
                       "hi": [h[3] + CONTEXT_WINDOW for h in hits]})
    con.register("wanted", wanted)
    window: dict[str, dict[int, str]] = {}
    for doc, position, token in con.execute("""
            SELECT DISTINCT r.doc, r.position, r.token FROM rows r
            JOIN (SELECT DISTINCT doc, lo, hi FROM wanted) w ON r.doc = w.doc AND r.position BETWEEN w.lo AND w.hi
            WHERE r.layer = (SELECT min(layer) FROM rows)""").fetchall():
        window.setdefault(doc, {})[position] = token
    contexts: dict[tuple[int, int], list[Context]] = {}
    for layer, expert, doc, position, score in hits:
        positions = [p for p in range(position - CONTEXT_WINDOW, position + CONTEXT_WINDOW + 1) if p in window[doc]]
        contexts.setdefault((layer, expert), []).append(Context(
            doc, int(position), float(score), [window[doc][p] for p in positions], positions.index(position)))
    return contexts


def _layer_atlas(counts: _Counts, position: int, layer: int, hits, label: str) -> LayerAtlas:
    routed = counts.domain_routed[position]  # [experts, domains]
    per_expert = routed.sum(axis=1)
    shares = load_share(per_expert)
    domain_names = list(counts.domain_tokens)
    specialization = domain_specialization(routed, np.array(list(counts.domain_tokens.values())))
    coactivation = coactivation_share(counts.pairs[position], per_expert)
    cards = []
    for expert in range(len(per_expert)):
        partners = [(int(f), float(coactivation[expert, f])) for f in np.argsort(-coactivation[expert], kind="stable")
                    if coactivation[expert, f] > 0]
        domain_entropy = (entropy_bits(specialization[expert]) / math.log2(len(domain_names))
                          if len(domain_names) > 1 else 0.0)
        cards.append(ExpertCard(
            expert=expert, count=int(per_expert[expert]), load_share=float(shares[expert]),
            top_tokens=counts.top_tokens.get((position, expert), []),
            domain_share={d: float(specialization[expert, i]) for i, d in enumerate(domain_names)},
            partners=partners, token_entropy=float(counts.token_entropy[position, expert]),
            domain_entropy=domain_entropy,
            contexts=sorted(hits.get((layer, expert), []), key=lambda c: (-c.score, c.doc, c.position)),
        ))
    return LayerAtlas(layer, label, int(counts.tokens[position]), per_expert, coactivation,
                      float(counts.vocabulary_entropy[position]), cards)


# -- segments ---------------------------------------------------------------------------------


def stretches(counted: np.ndarray, breaks: np.ndarray | None = None) -> np.ndarray:
    """int[tokens]: an id per maximal stretch of consecutive counted tokens, -1 for tokens not
    counted; `breaks` bool[tokens] starts a new stretch (a new document, a gap in positions).
    A segment is n consecutive tokens of one stretch."""
    counted = np.asarray(counted, dtype=bool)
    starts = counted & np.r_[True, ~counted[:-1]]
    if breaks is not None:
        starts |= counted & np.asarray(breaks, dtype=bool)
    ids = np.cumsum(starts) - 1
    return np.where(counted, ids, -1)


def _trace_segments(trace: RoutingTrace, counted: np.ndarray, phase: str):
    keep = counted if phase == "all" else counted & (_phases(trace) == phase)
    breaks = np.zeros(trace.num_tokens, dtype=bool)
    if trace.generated:
        breaks[trace.generated_from] = True  # prefill and generation are segmented apart
    return trace.topk_ids, stretches(keep, breaks)


def _run_segments(path: Path, manifest: RunManifest, excluded: list[int]):
    """The topk_ids int[layers, tokens, k] of one part file (its documents end to end) and their
    stretches. A part as `moeviz corpus` writes it (token by token, each token's layers in
    order) is only reshaped; rows in another order are sorted first."""
    table = pq.read_table(path, columns=["doc_id", "position", "token_id", "layer", "topk_ids"])
    layers, k = len(manifest.layer_ids), manifest.top_k
    tokens = table.num_rows // layers
    if tokens * layers != table.num_rows:
        raise RunError(f"{path} does not hold every MoE layer of every token: was it edited?")
    doc = pc.dictionary_encode(table["doc_id"]).combine_chunks().indices.to_numpy()
    position = table["position"].to_numpy()
    layer = np.searchsorted(manifest.layer_ids, table["layer"].to_numpy())
    ids = table["topk_ids"].combine_chunks().flatten().to_numpy().reshape(-1, k)
    token_id = table["token_id"].to_numpy()
    if np.array_equal(layer, np.tile(np.arange(layers), tokens)):
        ids = ids.reshape(tokens, layers, k).transpose(1, 0, 2)
        doc, position, token_id = doc[::layers], position[::layers], token_id[::layers]
    else:
        order = np.lexsort((position, doc, layer))
        ids = ids[order].reshape(layers, tokens, k)
        doc, position, token_id = (a[order][:tokens] for a in (doc, position, token_id))
    breaks = np.r_[True, (doc[1:] != doc[:-1]) | (position[1:] != position[:-1] + 1)]
    return ids, stretches(~np.isin(token_id, excluded), breaks)


def _segments(batches: Iterator, experts: int, k: int, layers: int, cache_size: int) -> SegmentConsistency:
    lengths = SEGMENT_LENGTHS
    histograms = [[np.zeros(n + 1, dtype=np.int64) for n in lengths] for _ in range(layers)]
    hits = np.zeros((layers, len(lengths)), dtype=np.int64)
    segments = np.zeros((layers, len(lengths)), dtype=np.int64)
    for topk_ids, stretch in batches:
        for position in range(layers):
            windows = _all_window_counts(topk_ids[position], stretch, experts)
            for j, (n, (every, outside)) in enumerate(zip(lengths, windows)):
                # All windows, less the few that cross a stretch's end: cheaper than selecting.
                histograms[position][j] += segment_match_counts(every, n) - segment_match_counts(outside, n)
                hits[position, j] += sch_hits(every, cache_size) - sch_hits(outside, cache_size)
                segments[position, j] += every.shape[1] - outside.shape[1]
    srp_values = np.array([[srp(histograms[i][j], n) for j, n in enumerate(lengths)] for i in range(layers)])
    sch_values = np.array([[sch(hits[i, j], segments[i, j], n, k) for j, n in enumerate(lengths)]
                           for i in range(layers)])
    return SegmentConsistency(
        lengths=lengths, srp=srp_values.reshape(layers, len(lengths)), sch=sch_values.reshape(layers, len(lengths)),
        srp_chance=np.array([srp_chance(experts, k, n) for n in lengths]),
        sch_chance=np.array([sch_chance(experts, k, n, cache_size) for n in lengths]),
        segments=segments, cache_size=cache_size,
    )


def window_counts(topk_ids: np.ndarray, stretch: np.ndarray, n: int, experts: int) -> np.ndarray:
    """int8[experts, segments]: activations of each expert in every n-token segment (all
    starts, stride 1, as moe-lrc slides them) that lies inside one stretch; n a power of 2
    up to 64. topk_ids int[tokens, k]."""
    every, _ = dict(zip(SEGMENT_LENGTHS, _all_window_counts(topk_ids, stretch, experts)))[n]
    inside = np.ones(every.shape[1], dtype=bool)
    inside[_crossing(stretch, n, every.shape[1])] = False
    return every[:, inside]


def _crossing(stretch: np.ndarray, n: int, starts: int) -> np.ndarray:
    """Starts of the n-token windows that leave their stretch (or hold uncounted tokens)."""
    return np.flatnonzero((stretch[:starts] < 0) | (stretch[:starts] != stretch[n - 1:n - 1 + starts]))


def _all_window_counts(topk_ids: np.ndarray, stretch: np.ndarray, experts: int) -> Iterator[tuple]:
    """(every window's counts, the counts of windows crossing a stretch's end) for each of
    SEGMENT_LENGTHS, by doubling as moe-lrc does (`mask = mask[:-n] + mask[n:]`): each length
    is two windows of half its length."""
    tokens = len(stretch)
    counts = np.zeros((experts, tokens), dtype=np.int8)  # expert-major; n <= 64 fits in int8
    counts[topk_ids.T, np.arange(tokens)] = 1  # a token's k ids are distinct
    n = 1
    while n < SEGMENT_LENGTHS[-1]:
        counts = counts[:, :-n] + counts[:, n:] if counts.shape[1] > n else counts[:, :0]
        n *= 2
        if n in SEGMENT_LENGTHS:
            yield counts, counts[:, _crossing(stretch, n, counts.shape[1])]


# -- the command line's JSON ------------------------------------------------------------------


def atlas_json(atlas: Atlas, top: int) -> dict:
    """The atlas as `moeviz atlas --json` prints it."""
    return {"layers": [{
        "layer": layer.layer, "maxvio": layer.maxvio, "cv": layer.cv, "jain": layer.jain,
        "dead_experts": layer.dead_experts,
        "experts": [{
            "expert": card.expert, "load_share": card.load_share,
            "top_tokens": [{"token_id": t.token_id, "token": t.token, "count": t.count, "share": t.share}
                           for t in card.top_tokens[:top]],
            "domain_share": card.domain_share,
        } for card in layer.experts],
    } for layer in atlas.layers]}
