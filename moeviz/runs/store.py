"""Corpus runs on disk, read back and analysed per domain. No torch: a run written on a GPU box
opens on a laptop, and the app's pages read it.

A run is a directory written by `moeviz corpus` (`moeviz.runs.corpus.run_corpus`):

    run.json            RunManifest: the model and token limit every row comes from
    part-00000.parquet  per-token routing of complete documents only (ROW_SCHEMA), one
    part-00001.parquet  batch each, written under a temporary name and then renamed

One row per (document, token position, MoE layer). Analyses lay the documents of a domain
end to end, as `topk_ids int32[layers, tokens, k]`, and count adjacent-token repeats only
within documents.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moeviz.analysis import metrics
from moeviz.trace import layer_label

RUN_FORMAT = "moeviz-corpus-run"
RUN_VERSION = 1
MANIFEST_NAME = "run.json"
PART_PATTERN = "part-*.parquet"
NO_DOMAIN = "(no domain)"  # label of documents without a domain

ROW_SCHEMA = pa.schema([
    ("doc_id", pa.string()),
    ("domain", pa.string()),  # null when the corpus gives none
    ("position", pa.int32()),  # token position within the document
    ("token", pa.string()),
    ("token_id", pa.int32()),
    ("layer", pa.int32()),  # true layer number, as RoutingTrace.layer_ids
    ("topk_ids", pa.list_(pa.int32())),  # k experts, highest weight first
    ("topk_weights", pa.list_(pa.float32())),
])


class RunError(ValueError):
    """A run directory that cannot be read, or resumed, with a message that says why."""


@dataclass(frozen=True)
class RunManifest:
    """What every row of a run comes from. A run resumes only with an equal manifest."""

    model_id: str
    model_type: str
    num_experts: int
    top_k: int
    num_layers: int
    layer_ids: list[int]
    scoring: str
    router_class: str
    shared_experts: int
    encoder_layers: int
    dtype: str  # of the weights the routers computed in, e.g. "float32"
    quantization: str  # "none", "nf4", ...: 4-bit weights route slightly differently
    max_tokens: int

    def to_json(self) -> str:
        return json.dumps({"format": RUN_FORMAT, "version": RUN_VERSION, **asdict(self)}, indent=2)

    @classmethod
    def read(cls, run_dir: Path) -> RunManifest:
        path = run_dir / MANIFEST_NAME
        if not path.is_file():
            raise RunError(f"{run_dir} is not a moeviz corpus run: it has no {MANIFEST_NAME}")
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))
            if fields.pop("format", None) != RUN_FORMAT:
                raise ValueError(f"its 'format' is not {RUN_FORMAT!r}")
            version = fields.pop("version", None)
            if version != RUN_VERSION:
                raise ValueError(f"it is format version {version}; this moeviz reads version {RUN_VERSION}")
            return cls(**fields)
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as error:
            raise RunError(f"{path} is not a readable moeviz run manifest: {error}") from None

    def layer_label(self, layer_id: int) -> str:
        """How people name layer `layer_id`, as in `RoutingTrace.layer_label`."""
        return layer_label(layer_id, self.encoder_layers)

    def differences(self, other: RunManifest) -> list[str]:
        """'field: ours vs theirs' for each field that differs."""
        ours, theirs = asdict(self), asdict(other)
        return [f"{name}: {ours[name]!r} vs {theirs[name]!r}" for name in ours if ours[name] != theirs[name]]


def part_paths(run_dir: str | Path) -> list[Path]:
    """The run's finished part files, in the order they were written."""
    return sorted(Path(run_dir).glob(PART_PATTERN))


def read_part(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise RunError(f"{path} is not a readable part of a moeviz run: {error}") from None


# -- analysis ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DomainRouting:
    """All documents of one domain, laid end to end in document-id order.

    topk_ids:      int32[layers, tokens, k]
    same_document: bool[tokens - 1], True where tokens t and t + 1 belong to one document
    """

    domain: str
    documents: int
    topk_ids: np.ndarray
    same_document: np.ndarray

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[1]


@dataclass(frozen=True, eq=False)
class CorpusRun:
    """A run read back: its manifest and the routing of each domain, by domain label
    (sorted; documents without a domain last, as NO_DOMAIN)."""

    path: Path
    manifest: RunManifest
    domains: dict[str, DomainRouting]

    @property
    def documents(self) -> int:
        return sum(domain.documents for domain in self.domains.values())

    @property
    def tokens(self) -> int:
        return sum(domain.num_tokens for domain in self.domains.values())


def finished_run(run_dir: str | Path) -> tuple[RunManifest, list[Path]]:
    """The manifest and finished part files of the run in `run_dir`. Raises RunError for a
    folder that is not a run or holds no finished part yet."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"No corpus run at {run_dir}: give the folder `moeviz corpus -o` wrote")
    manifest = RunManifest.read(run_dir)
    parts = part_paths(run_dir)
    if not parts:
        raise RunError(f"{run_dir} has no finished part files yet ({PART_PATTERN})")
    return manifest, parts


def read_run(run_dir: str | Path) -> CorpusRun:
    """Read a run written by `moeviz corpus`. Raises RunError for a directory that is not a
    run, a damaged part, or rows that do not form whole documents (missing or repeated rows)."""
    run_dir = Path(run_dir)
    manifest, parts = finished_run(run_dir)
    columns = ["doc_id", "domain", "position", "layer", "topk_ids"]
    table = pa.concat_tables(read_part(path, columns) for path in parts)
    return CorpusRun(run_dir, manifest, _domains(table, manifest))


def _domains(table: pa.Table, manifest: RunManifest) -> dict[str, DomainRouting]:
    layers, k = len(manifest.layer_ids), manifest.top_k
    if not pc.all(pc.equal(pc.list_value_length(table["topk_ids"]), k)).as_py():
        raise RunError(f"Some rows do not hold top_k = {k} expert ids")
    ids = table["topk_ids"].combine_chunks().flatten().to_numpy().reshape(-1, k)
    layer = table["layer"].to_numpy()
    layer_index = np.searchsorted(manifest.layer_ids, layer)
    if not np.array_equal(np.asarray(manifest.layer_ids)[np.minimum(layer_index, layers - 1)], layer):
        raise RunError(f"Some rows have layers outside the run's MoE layers {manifest.layer_ids}")
    domain_code, domain_names = pd.factorize(table["domain"].to_pandas(), sort=True, use_na_sentinel=False)
    doc_code, _ = pd.factorize(table["doc_id"].to_numpy(zero_copy_only=False), sort=True)
    position = table["position"].to_numpy()
    # By domain, then layer, then document, then position: each domain's rows reshape to
    # [layers, tokens] with its documents end to end in every layer.
    order = np.lexsort((position, doc_code, layer_index, domain_code))
    domain_code, layer_index, doc_code, position, ids = (
        a[order] for a in (domain_code, layer_index, doc_code, position, ids)
    )
    starts = np.searchsorted(domain_code, np.arange(len(domain_names) + 1))
    domains = {}
    for code, name in enumerate(domain_names):
        rows = slice(starts[code], starts[code + 1])
        label = NO_DOMAIN if pd.isna(name) else str(name)
        domains[label] = _domain_routing(label, layers, layer_index[rows], doc_code[rows], position[rows], ids[rows])
    return dict(sorted(domains.items(), key=lambda item: (item[0] == NO_DOMAIN, item[0])))


def _domain_routing(label, layers, layer_index, doc_code, position, ids) -> DomainRouting:
    tokens = len(ids) // layers
    first_layer_docs, first_layer_positions = doc_code[:tokens], position[:tokens]
    same_document = first_layer_docs[1:] == first_layer_docs[:-1]
    starts_at_zero = first_layer_positions[np.r_[True, ~same_document]] == 0
    consecutive = first_layer_positions[1:][same_document] == first_layer_positions[:-1][same_document] + 1
    whole = (
        len(ids) == tokens * layers
        and np.array_equal(layer_index, np.repeat(np.arange(layers), tokens))
        and (doc_code.reshape(layers, tokens) == first_layer_docs).all()
        and (position.reshape(layers, tokens) == first_layer_positions).all()
        and starts_at_zero.all()
        and consecutive.all()
    )
    if not whole:
        raise RunError(
            f"The rows of domain {label!r} do not form whole documents (a token is missing or "
            "repeated in some layer): was a part file copied in twice or edited?"
        )
    return DomainRouting(
        domain=label,
        documents=int(len(np.unique(first_layer_docs))),
        topk_ids=ids.reshape(layers, tokens, -1).astype(np.int32),
        same_document=same_document,
    )


def domain_loads(run: CorpusRun, choices: int | None = None) -> dict[str, np.ndarray]:
    """{domain: float[layers, experts]}: `metrics.expert_load` of all tokens of the domain's
    documents, counting each token's first `choices` picks (default: all k)."""
    choices = run.manifest.top_k if choices is None else choices
    if not 1 <= choices <= run.manifest.top_k:
        raise ValueError(f"choices must be between 1 and top_k = {run.manifest.top_k}, got {choices}")
    experts = run.manifest.num_experts
    return {name: metrics.load_from_ids(d.topk_ids[..., :choices], experts) for name, d in run.domains.items()}


def domain_js_matrix(loads: dict[str, np.ndarray], layer_index: int) -> np.ndarray:
    """float[domains, domains]: Jensen-Shannon divergence (bits) between the domains' loads at
    one layer (its position in the arrays), `metrics.load_js_matrix`."""
    return metrics.load_js_matrix([load[layer_index] for load in loads.values()])


def domain_repeat_rates(run: CorpusRun) -> dict[str, metrics.RepeatRates]:
    """{domain: RepeatRates float[layers]}: the Mixtral paper's Table 5 rates over the adjacent
    token pairs inside each document (never across two documents). Domains whose documents
    are all one token long have no pairs and are left out."""
    return {
        name: metrics.repeat_rates_from_ids(d.topk_ids, d.same_document)
        for name, d in run.domains.items()
        if d.same_document.any()
    }


def repeat_chance(run: CorpusRun) -> metrics.RepeatRates:
    """`metrics.repeat_chance` for the run's model."""
    manifest = run.manifest
    return metrics.repeat_chance_for(manifest.num_experts, manifest.top_k, len(manifest.layer_ids))
