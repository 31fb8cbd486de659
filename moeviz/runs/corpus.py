"""Corpus runs: many documents through one model, their per-token routing appended to Parquet.

Documents come from a folder of .txt files or a JSONL file (`read_documents`). They go through
the model in batches (`trace_batch`: right padding, then each document's rows cut back out of
the batch), and every batch becomes one part file of the run directory described in
`moeviz.runs.store`. Parts hold complete documents only and appear under their final name by an
atomic rename, so a run killed at any moment resumes by skipping the documents already in a
part. Reading and analysing runs is in `moeviz.runs.store`, which needs no torch.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from moeviz.model.capture import (
    DEFAULT_MAX_TOKENS, build_trace, last_logit_only, recording_routers, routing_facts, trace_text,
)
from moeviz.model.loading import LoadedModel
from moeviz.model.tokens import tokenize
from moeviz.model.weights import quantization_of
from moeviz.runs.store import MANIFEST_NAME, ROW_SCHEMA, RunError, RunManifest, part_paths, read_part
from moeviz.trace import RoutingTrace

SORT_WINDOW = 64  # batches whose documents are sorted by length together, to limit padding


class CorpusError(ValueError):
    """A corpus that cannot be read, with a message that says where and why."""


@dataclass(frozen=True)
class Document:
    doc_id: str
    domain: str | None
    text: str


# -- reading documents ---------------------------------------------------------------------


def read_documents(source: str | Path) -> list[Document]:
    """The documents of a corpus, all read and checked before any model work starts.

    A folder: every .txt file under it, recursively; the id is the path relative to the
    folder, the domain the first sub-folder (None for files at the top).
    A .jsonl file: one JSON object per line with `text`, an optional `id` (default: the line
    number) and an optional `domain`; blank lines are skipped.
    Raises CorpusError for a missing path, an unreadable or empty document, a bad line or a
    repeated id.
    """
    path = Path(source)
    if path.is_dir():
        documents = _folder_documents(path)
    elif path.is_file() and path.suffix == ".jsonl":
        documents = _jsonl_documents(path)
    elif path.exists():
        raise CorpusError(f"{path} is neither a folder of .txt files nor a .jsonl file")
    else:
        raise CorpusError(f"No corpus at {path}: give a folder of .txt files or a .jsonl file")
    if not documents:
        raise CorpusError(f"{path} holds no documents")
    return documents


def _folder_documents(folder: Path) -> list[Document]:
    documents = []
    for path in sorted(folder.rglob("*.txt")):
        if not path.is_file():
            continue
        relative = path.relative_to(folder)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise CorpusError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
        if not text.strip():
            raise CorpusError(f"{path} is empty: remove it or give it some text")
        domain = relative.parts[0] if len(relative.parts) > 1 else None
        documents.append(Document(relative.as_posix(), domain, text))
    return documents


def _jsonl_documents(path: Path) -> list[Document]:
    documents, lines_of = [], {}
    with path.open(encoding="utf-8") as lines:
        try:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                document = _jsonl_document(line, number, path)
                if document.doc_id in lines_of:
                    raise CorpusError(
                        f"{path}, line {number}: id {document.doc_id!r} was already used on line "
                        f"{lines_of[document.doc_id]}; ids must be unique"
                    )
                lines_of[document.doc_id] = number
                documents.append(document)
        except UnicodeDecodeError as error:
            raise CorpusError(f"{path} is not UTF-8 text ({error.reason})") from None
    return documents


def _jsonl_document(line: str, number: int, path: Path) -> Document:
    where = f"{path}, line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise CorpusError(f"{where} is not valid JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(record, dict):
        raise CorpusError(f"{where} is a JSON {type(record).__name__}; expected an object with a \"text\" field")
    text = record.get("text")
    if not isinstance(text, str):
        problem = "has no \"text\" field" if text is None else f"has a \"text\" that is a {type(text).__name__}"
        raise CorpusError(f"{where} {problem}; every line needs \"text\": \"...\"")
    if not text.strip():
        raise CorpusError(f"{where} has an empty \"text\"")
    doc_id = record.get("id", number)
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise CorpusError(f"{where}: \"id\" must be a string or an integer, got {json.dumps(doc_id)}")
    domain = record.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise CorpusError(f"{where}: \"domain\" must be a string, got {json.dumps(domain)}")
    return Document(str(doc_id), domain, text)


# -- tracing in batches --------------------------------------------------------------------


def trace_batch(model, tokenizer, texts: list[str], *, model_id: str = "",
                max_tokens: int = DEFAULT_MAX_TOKENS) -> list[RoutingTrace]:
    """The routing of each text, from one forward pass over all of them.

    Texts are padded on the right and masked: under causal attention no real token sees a pad
    and positions are unchanged, so each trace equals `trace_text` of its text alone, up to
    float rounding from the batched matrix shapes. Routers see the batch flattened to
    [batch * seq, hidden]; their rows are cut back per text, pads dropped. An encoder-decoder
    model is traced one text at a time.
    """
    if getattr(model.config, "is_encoder_decoder", False):
        return [trace_text(model, tokenizer, text, model_id=model_id, max_tokens=max_tokens) for text in texts]
    batch = [tokenize(tokenizer, text, max_tokens) for text in texts]
    lengths = [len(tokenized.ids) for tokenized in batch]
    width = max(lengths)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # never attended to
    device = next(model.parameters()).device
    input_ids = torch.tensor([t.ids + [pad_id] * (width - len(t.ids)) for t in batch], device=device)
    attention_mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], device=device)
    with recording_routers(model) as collector, torch.inference_mode():
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **last_logit_only(model))
    return [
        build_trace(model, tokenized, text, _rows_of(collector, row, length, len(batch), width), model_id=model_id)
        for row, (tokenized, text, length) in enumerate(zip(batch, texts, lengths))
    ]


def _rows_of(collector: dict, row: int, length: int, batch: int, width: int) -> dict:
    """The recorded router calls of one batch row, without its padding."""
    rows = {}
    for name, parts in collector.items():
        rows[name] = {}
        for part, calls in parts.items():
            if len(calls) != 1 or calls[0].shape[0] != batch * width:
                raise RuntimeError(
                    f"Router {name} recorded {[call.shape[0] for call in calls]} token rows for one batch of "
                    f"{batch} x {width} tokens; moeviz expects one call on the batch flattened to [batch * seq, ...]"
                )
            rows[name][part] = [calls[0].reshape(batch, width, -1)[row, :length]]
    return rows


# -- corpus runs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """What one call of `run_corpus` did."""

    run_dir: Path
    documents: int  # traced by this call
    skipped: int  # already in the run
    tokens: int  # traced by this call
    truncated: int  # documents cut at the token limit
    parts: int  # part files written by this call


def run_corpus(
    loaded: LoadedModel, documents: list[Document], run_dir: str | Path, *, batch_size: int = 8,
    max_tokens: int = DEFAULT_MAX_TOKENS, progress: bool = True,
) -> RunSummary:
    """Trace `documents` into the run directory `run_dir`, one part file per batch, with a
    progress bar on stderr.

    An existing run resumes: documents whose id is already in a part are skipped. A run made
    with another model or token limit is refused (RunError), as is a folder that holds other
    files, or a run another process is writing.
    """
    if batch_size < 1 or max_tokens < 1:
        raise ValueError(f"batch_size and max_tokens must be at least 1, got {batch_size} and {max_tokens}")
    run_dir = Path(run_dir)
    manifest = _manifest(loaded, max_tokens)
    with open_run(run_dir, manifest, documents) as (todo, next_part):
        tokens = truncated = parts = 0
        bar = tqdm(total=len(documents), initial=len(documents) - len(todo), unit="doc", desc="Tracing",
                   file=sys.stderr, disable=not progress, dynamic_ncols=True)
        with bar:
            for number, batch in enumerate(_length_sorted_batches(todo, batch_size), start=next_part):
                traces = trace_batch(loaded.model, loaded.tokenizer, [d.text for d in batch],
                                     model_id=loaded.model_id, max_tokens=max_tokens)
                write_part(run_dir / f"part-{number:05d}.parquet", _table(batch, traces))
                tokens += sum(trace.num_tokens for trace in traces)
                truncated += sum(trace.truncated for trace in traces)
                parts += 1
                bar.update(len(batch))
    return RunSummary(run_dir, len(todo), len(documents) - len(todo), tokens, truncated, parts)


def _manifest(loaded: LoadedModel, max_tokens: int) -> RunManifest:
    facts = routing_facts(loaded.model)
    return RunManifest(
        model_id=loaded.model_id, model_type=loaded.model.config.model_type, num_experts=facts.num_experts,
        top_k=facts.top_k, num_layers=facts.num_layers, layer_ids=facts.layer_ids, scoring=facts.scoring,
        router_class=facts.router_class, shared_experts=facts.shared_experts,
        encoder_layers=facts.encoder_layers, dtype=str(loaded.model.dtype).removeprefix("torch."),
        quantization=quantization_of(loaded.model), max_tokens=max_tokens,
    )


@contextmanager
def open_run(run_dir: Path, manifest: RunManifest, documents: list[Document]) -> Iterator[tuple[list[Document], int]]:
    """Open a run folder for writing, new or to resume: refuse a folder that is not a run, or a
    run of another model (`manifest`) or that another process is writing; remove what a killed
    run left half-written. Yields (the documents not yet in a finished part, the next part
    number) while holding the run's lock."""
    check_run_or_empty(run_dir)  # before creating anything in someone's folder
    with locked(run_dir):
        remove_killed_writes(run_dir)
        check_or_write_manifest(run_dir, manifest)
        done = done_documents(run_dir)
        todo = [document for document in documents if document.doc_id not in done]
        yield todo, max((int(path.stem.split("-")[1]) for path in part_paths(run_dir)), default=-1) + 1


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold the run's lock file: two processes appending to one run would trace documents
    twice. The kernel drops the lock when its process dies, even by SIGKILL."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"Another moeviz process is writing to {run_dir}; wait for it or stop it") from None
        yield


def check_run_or_empty(run_dir: Path) -> None:
    """A run folder is new, empty, or a run (it has a manifest, or only a killed run's files)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir} is a file; give a folder for the run")
    if not run_dir.is_dir() or (run_dir / MANIFEST_NAME).exists():
        return
    others = sorted(p.name for p in run_dir.iterdir() if p.name not in (".lock", f".{MANIFEST_NAME}.tmp"))
    if others:
        raise RunError(
            f"{run_dir} is not empty ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) and is not "
            "a moeviz run: choose a new or empty folder"
        )


def remove_killed_writes(run_dir: Path) -> None:
    """Temporary files a killed run left: a part or manifest it was writing, never renamed."""
    for path in [*run_dir.glob(".part-*.parquet.tmp"), *run_dir.glob(f".{MANIFEST_NAME}.tmp")]:
        path.unlink()


def check_or_write_manifest(run_dir: Path, manifest: RunManifest) -> None:
    if not (run_dir / MANIFEST_NAME).exists():
        _atomic_write(run_dir / MANIFEST_NAME, lambda tmp: tmp.write_text(manifest.to_json(), encoding="utf-8"))
        return
    differences = RunManifest.read(run_dir).differences(manifest)
    if differences:
        raise RunError(
            f"{run_dir} was made with another model, dtype or token limit ({'; '.join(differences)}, "
            "run vs now). Resume it with the same model and --max-tokens, or write to a new folder."
        )


def done_documents(run_dir: Path) -> set[str]:
    """Ids of the documents in the run's finished parts."""
    done: set[str] = set()
    for path in part_paths(run_dir):
        done.update(read_part(path, ["doc_id"])["doc_id"].unique().to_pylist())
    return done


def _length_sorted_batches(documents: list[Document], batch_size: int) -> Iterator[list[Document]]:
    """Batches of documents of similar length (in characters, a close proxy for tokens), so
    that little of each batch is padding."""
    window = batch_size * SORT_WINDOW
    for start in range(0, len(documents), window):
        chunk = sorted(documents[start:start + window], key=lambda document: len(document.text))
        for offset in range(0, len(chunk), batch_size):
            yield chunk[offset:offset + batch_size]


def _table(documents: list[Document], traces: list[RoutingTrace]) -> pa.Table:
    return pa.concat_tables(document_table(document, trace) for document, trace in zip(documents, traces))


def document_table(document: Document, trace: RoutingTrace) -> pa.Table:
    """One row per (token, MoE layer), token by token, each token's layers in order; null
    topk_weights for a trace with expert ids only (from a serving engine)."""
    tokens, layers = trace.num_tokens, len(trace.layer_ids)
    rows = tokens * layers
    ids = trace.topk_ids.transpose(1, 0, 2).reshape(rows, -1)  # [tokens * layers, k]
    offsets = pa.array(np.arange(0, ids.size + 1, ids.shape[1], dtype=np.int32))
    return pa.table({
        "doc_id": pa.repeat(pa.scalar(document.doc_id, pa.string()), rows),
        "domain": pa.repeat(pa.scalar(document.domain, pa.string()), rows),
        "position": np.repeat(np.arange(tokens, dtype=np.int32), layers),
        "token": pa.array(np.repeat(np.array(trace.tokens, dtype=object), layers), pa.string()),
        "token_id": np.repeat(np.asarray(trace.token_ids, dtype=np.int32), layers),
        "layer": np.tile(np.asarray(trace.layer_ids, dtype=np.int32), tokens),
        "topk_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.ravel().astype(np.int32))),
        "topk_weights": _weights_column(trace, offsets, rows),
    }, schema=ROW_SCHEMA)


def _weights_column(trace: RoutingTrace, offsets: pa.Array, rows: int) -> pa.Array:
    if trace.topk_weights is None:
        return pa.nulls(rows, pa.list_(pa.float32()))
    weights = trace.topk_weights.transpose(1, 0, 2).reshape(rows, -1)
    return pa.ListArray.from_arrays(offsets, pa.array(weights.ravel().astype(np.float32)))


def write_part(path: Path, table: pa.Table) -> None:
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _atomic_write(path: Path, write) -> None:
    """Write through a hidden temporary file renamed into place: the file appears whole or
    not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
