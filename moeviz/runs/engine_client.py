"""Send text to a running vLLM or SGLang server with routing enabled, and read the experts it
used back into RoutingTraces and corpus runs (`moeviz trace --server`, `moeviz corpus --server`).

Texts are tokenized here, with the model's own tokenizer and token limit, and sent as token ids,
so the server routes exactly the tokens the local path would: to vLLM's `/v1/completions` with
`return_token_ids` (the record in `choices[0].routed_experts`, token ids on the choice), to
SGLang's `/generate` with `return_routed_experts` (the record in `meta_info`, with its
`routed_experts_dtype` when SGLang says it). `moeviz.runs.engines` reads both, per version. Requests run concurrently, at most
`ServerOptions.concurrency` at a time; a connection error, a timeout or a 5xx answer is retried
with exponential backoff, a 4xx answer is not. A corpus run is written as `moeviz.runs.corpus` writes
one (a manifest, then one part per batch of complete documents), with `topk_weights` null: the
engines report expert ids only. Documents whose request failed are left out of the parts, so
running the command again resumes with them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from moeviz.model.capture import DEFAULT_MAX_TOKENS
from moeviz.model.tokens import tokenize
from moeviz.runs.corpus import Document, RunSummary, document_table, open_run, write_part
from moeviz.runs.engines import EngineRecordError, ServedModel, sglang_response_trace, vllm_response_trace
from moeviz.runs.store import RunManifest
from moeviz.trace import RoutingTrace

ENGINES = ("vllm", "sglang")


class ServerError(ValueError):
    """A server that did not answer with routing, with a message that says what to do."""


@dataclass(frozen=True)
class ServerOptions:
    url: str  # e.g. http://gpu-box:8000
    engine: str  # "vllm" or "sglang"
    concurrency: int = 4  # requests in flight at once
    retries: int = 3  # further attempts after a failed one
    timeout: float = 300.0  # seconds per request
    backoff: float = 1.0  # seconds before the first retry, doubled each time

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.concurrency < 1 or self.retries < 0:
            raise ValueError(f"concurrency must be >= 1 and retries >= 0, got {self.concurrency} and {self.retries}")


def trace_on_server(served: ServedModel, options: ServerOptions, text: str, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                    max_new_tokens: int = 0, temperature: float = 0.0) -> RoutingTrace:
    """The routing the server used for `text` (cut at `max_tokens` tokens), and for
    `max_new_tokens` tokens it generates after it (0: the text alone)."""
    if served.tokenizer is None:
        raise ServerError("the model folder has no tokenizer: moeviz tokenizes texts before sending them")
    tokenized = tokenize(served.tokenizer, text, max_tokens)
    trace = _Client(options, served).trace(tokenized.ids, text=text, max_new_tokens=max_new_tokens,
                                           temperature=temperature)
    return dataclasses.replace(trace, input_token_count=max(tokenized.input_token_count, trace.num_tokens))


class _Client:
    """One server: the request for each engine, retries, and the response read into a trace."""

    def __init__(self, options: ServerOptions, served: ServedModel):
        self.options, self.served = options, served
        self.url = options.url.rstrip("/")
        self._model_name = None

    def trace(self, ids: list[int], *, text: str, max_new_tokens: int = 0, temperature: float = 0.0) -> RoutingTrace:
        # Engines sample at least one token; a trace of the text alone leaves it out (`_prompt_only`).
        new_tokens = max(max_new_tokens, 1)
        if self.options.engine == "vllm":
            body = {"model": self.model_name(), "prompt": ids, "max_tokens": new_tokens, "temperature": temperature,
                    "return_token_ids": True}
            response = self.post("/v1/completions", body)  # generated ids: the choice's token_ids
            trace = self.read(vllm_response_trace, response, prompt_ids=ids, text=text)
        else:
            body = {"input_ids": ids, "return_routed_experts": True,
                    "sampling_params": {"max_new_tokens": new_tokens, "temperature": temperature}}
            response = self.post("/generate", body)
            if isinstance(response, list) and len(response) == 1:
                response = response[0]
            trace = self.read(sglang_response_trace, response, prompt_ids=ids, text=text)
        return trace if max_new_tokens else _prompt_only(trace, len(ids), text)

    def read(self, reader, response, **kwargs) -> RoutingTrace:
        if not isinstance(response, dict):
            raise ServerError(f"{self.url} answered with a JSON {type(response).__name__}, not an object")
        try:
            return reader(self.served, response, **kwargs)
        except EngineRecordError as error:
            raise ServerError(f"{self.url} ({self.options.engine}): {error}") from None

    def model_name(self) -> str:
        """The served model's name, which OpenAI-compatible requests must give: the first of /v1/models."""
        if self._model_name is None:
            listing = self.request("GET", "/v1/models")
            try:
                self._model_name = listing["data"][0]["id"]
            except (KeyError, IndexError, TypeError):
                raise ServerError(
                    f"{self.url}/v1/models lists no model; is this an OpenAI-compatible server?"
                ) from None
        return self._model_name

    def post(self, path: str, body: dict):
        return self.request("POST", path, body)

    def request(self, method: str, path: str, body: dict | None = None):
        """The JSON answer; retried on connection errors, timeouts and 5xx answers."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        for attempt in range(self.options.retries + 1):
            request = urllib.request.Request(self.url + path, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.options.timeout) as answer:
                    return json.loads(answer.read())
            except urllib.error.HTTPError as error:
                detail = error.read()[:300].decode("utf-8", "replace")
                problem = f"{method} {self.url}{path} answered HTTP {error.code}: {detail}"
                if error.code < 500:
                    raise ServerError(problem) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                problem = f"{method} {self.url}{path} failed: {getattr(error, 'reason', error)}"
            except json.JSONDecodeError:
                raise ServerError(f"{method} {self.url}{path} did not answer with JSON") from None
            if attempt < self.options.retries:
                time.sleep(self.options.backoff * 2**attempt)
        raise ServerError(f"{problem} (after {self.options.retries + 1} attempts)")


def _prompt_only(trace: RoutingTrace, prompt_tokens: int, text: str) -> RoutingTrace:
    """`trace` of the text alone, without the token an engine samples before it answers (SGLang
    may record its routing), and with the whole text even when the token limit cut it."""
    return dataclasses.replace(
        trace, tokens=trace.tokens[:prompt_tokens], token_ids=trace.token_ids[:prompt_tokens],
        offsets=trace.offsets[:prompt_tokens], topk_ids=trace.topk_ids[:, :prompt_tokens], generated_from=-1,
        input_token_count=-1, text=text,
    )


# -- corpus runs --------------------------------------------------------------------------------


def run_corpus_on_server(
    served: ServedModel, options: ServerOptions, documents: list[Document], run_dir: str | Path, *,
    batch_size: int = 8, max_tokens: int = DEFAULT_MAX_TOKENS, progress: bool = True,
) -> RunSummary:
    """Trace `documents` on the server into the run directory `run_dir`, as
    `moeviz.runs.corpus.run_corpus` does locally: one part file per batch of documents, resumable.

    The documents of a batch are sent concurrently (at most `options.concurrency` at once). When
    a request still fails after its retries, the batch's finished documents are written, and a
    ServerError says how many are left: run again to resume with them.
    """
    if served.tokenizer is None:
        raise ServerError("the model folder has no tokenizer: moeviz tokenizes texts before sending them")
    if batch_size < 1 or max_tokens < 1:
        raise ValueError(f"batch_size and max_tokens must be at least 1, got {batch_size} and {max_tokens}")
    run_dir = Path(run_dir)
    manifest = server_manifest(served, options.engine, max_tokens)
    client = _Client(options, served)
    with open_run(run_dir, manifest, documents) as (todo, next_part):
        tokens = truncated = parts = 0
        bar = tqdm(total=len(documents), initial=len(documents) - len(todo), unit="doc",
                   desc=f"Tracing on {options.engine}", file=sys.stderr, disable=not progress, dynamic_ncols=True)
        with bar, ThreadPoolExecutor(max_workers=options.concurrency) as pool:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                tokenized = [tokenize(served.tokenizer, d.text, max_tokens) for d in batch]
                futures = [pool.submit(client.trace, t.ids, text=d.text) for d, t in zip(batch, tokenized)]
                finished, failures = [], []
                for document, tokens_of, future in zip(batch, tokenized, futures):
                    try:
                        finished.append((document, future.result(), tokens_of))
                    except ServerError as error:
                        failures.append((document, error))
                if finished:
                    table = pa.concat_tables(document_table(d, t) for d, t, _ in finished)
                    write_part(run_dir / f"part-{next_part + parts:05d}.parquet", table)
                    parts += 1
                    tokens += sum(t.num_tokens for _, t, _ in finished)
                    truncated += sum(k.input_token_count > len(k.ids) for _, _, k in finished)
                    bar.update(len(finished))
                if failures:
                    left = len(todo) - start - len(finished)
                    document, error = failures[0]
                    raise ServerError(
                        f"document {document.doc_id!r}: {error}. {len(documents) - len(todo) + start + len(finished)} documents are in "
                        f"{run_dir}, {left} are not: run the same command again to resume with them"
                    )
    return RunSummary(run_dir, len(todo), len(documents) - len(todo), tokens, truncated, parts)


def server_manifest(served: ServedModel, engine: str, max_tokens: int) -> RunManifest:
    """The manifest of a run traced on a server: the model's facts from its config; the weights'
    dtype and quantization are the server's, unknown here, so the run says which engine it was."""
    facts = served.facts
    return RunManifest(
        model_id=served.model_id, model_type=served.model_type, num_experts=facts.num_experts, top_k=facts.top_k,
        num_layers=facts.num_layers, layer_ids=list(facts.layer_ids), scoring=facts.scoring,
        router_class=facts.router_class, shared_experts=facts.shared_experts, encoder_layers=facts.encoder_layers,
        dtype=f"served by {engine}", quantization=f"served by {engine}", max_tokens=max_tokens,
    )
