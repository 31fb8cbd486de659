"""`moeviz corpus --server` and `moeviz trace --server` against a small loopback HTTP server that
answers as vLLM or SGLang would, with the routing of the real tiny model."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from moeviz import cli
from moeviz.model.capture import trace_text
from moeviz.model.loading import LoadedModel
from moeviz.runs import store as runs
from moeviz.runs.corpus import Document, run_corpus
from moeviz.runs.engine_client import (
    ServerError,
    ServerOptions,
    run_corpus_on_server,
    trace_on_server,
)
from moeviz.runs.engines import served_model
from moeviz.runs.store import part_paths, read_part
from moeviz.trace import RoutingTrace
from tests.test_engines import numpy2base64, sglang_payload, vllm_rows

DOCUMENTS = [
    Document("fox", "english", "The quick brown fox jumps over the lazy dog."),
    Document("add", "code", "def add(a, b):\n    return a + b\n"),
    Document("fuchs", "german", "Der schnelle braune Fuchs springt über den faulen Hund."),
    Document("sum", "math", "What is 12 + 7? Answer: 19"),
    Document("dog", "english", "The lazy dog sleeps."),
]
SAMPLED = 7  # the token the fake engine "samples" after each prompt


class FakeEngine(BaseHTTPRequestHandler):
    """Answers /v1/models, /v1/completions (vLLM) and /generate (SGLang) with the routing of the
    prompt ids it is sent, looked up in `routing`, serialized as the engines do (the builders of
    tests/test_engines.py, re-implemented from their code); `mode` breaks it on purpose."""

    routing: ClassVar[dict[tuple, RoutingTrace]] = {}
    mode = "ok"  # "ok", "error" (HTTP 500), "no routing", "fail fuchs" (500 for one document),
    # "flaky" (500 for the first request), "reject" (HTTP 400)
    requests = 0

    def log_message(self, *args):
        pass

    def answer(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.answer(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    def do_POST(self):
        type(self).requests += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ids = body.get("prompt") if self.path == "/v1/completions" else body.get("input_ids")
        local = self.routing[tuple(ids)]
        if self.mode == "error" or (self.mode == "fail fuchs" and local.text.startswith("Der")) or (
                self.mode == "flaky" and type(self).requests == 1):
            return self.answer(500, {"error": "CUDA out of memory"})
        if self.mode == "reject":
            return self.answer(400, {"error": "unknown field return_routed_experts"})
        truth = np.concatenate([local.topk_ids.transpose(1, 0, 2), np.zeros((1, len(local.layer_ids), local.top_k),
                                                                           dtype=np.int64)])  # + the sampled token
        if self.path == "/v1/completions":  # vLLM >= 0.22, completion/serving.py, return_token_ids
            choice = {"index": 0, "text": "x", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                      "prompt_token_ids": ids, "token_ids": [SAMPLED], "routed_experts": None}
            if self.mode != "no routing":
                choice["routed_experts"] = numpy2base64(
                    vllm_rows(truth, local.layer_ids, local.num_layers, local.num_experts))
            return self.answer(200, {"object": "text_completion", "model": "tiny", "choices": [choice]})
        meta = {"id": "x", "finish_reason": {"type": "length", "length": 1}, "prompt_tokens": len(ids),
                "completion_tokens": 1, "cached_tokens": 0}  # SGLang 0.5.23 /generate
        if self.mode != "no routing":
            meta["routed_experts"], _ = sglang_payload(truth, local.layer_ids, local.num_layers)
        self.answer(200, {"text": "x", "output_ids": [SAMPLED], "meta_info": meta})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_mixtral, tokenizer):
    folder = tmp_path_factory.mktemp("served")
    tiny_mixtral.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(tiny_mixtral, tokenizer):
    FakeEngine.routing = {}
    for document in DOCUMENTS:
        local = trace_text(tiny_mixtral, tokenizer, document.text)
        FakeEngine.routing[tuple(local.token_ids)] = local
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeEngine)  # loopback only
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def healthy_server():
    FakeEngine.mode, FakeEngine.requests = "ok", 0
    yield
    FakeEngine.mode = "ok"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_mixtral, tokenizer):
    run = tmp_path_factory.mktemp("local-run")
    run_corpus(LoadedModel(tiny_mixtral, tokenizer, "tiny", "cpu"), DOCUMENTS, run, batch_size=2, progress=False)
    return run


@pytest.fixture(scope="module")
def local_rows(local_run):
    return rows_of(local_run)


def rows_of(run) -> pa.Table:
    table = pa.concat_tables(read_part(path) for path in part_paths(run))
    return table.sort_by([("doc_id", "ascending"), ("position", "ascending"), ("layer", "ascending")])


ID_COLUMNS = ["doc_id", "domain", "position", "token", "token_id", "layer", "topk_ids"]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_corpus_on_a_server_writes_the_local_rows(engine, server, model_dir, local_run, local_rows, tmp_path,
                                                   capsys):
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"id": d.doc_id, "domain": d.domain, "text": d.text}) for d in DOCUMENTS]
    corpus.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    status = cli.main(["corpus", str(corpus), "-o", str(run), "--server", server, "--engine", engine,
                       "--model", str(model_dir), "--batch-size", "2", "--concurrency", "2"])
    assert status == 0, capsys.readouterr().err
    assert "traced 5 documents" in capsys.readouterr().out
    rows = rows_of(run)
    assert rows.select(ID_COLUMNS).equals(local_rows.select(ID_COLUMNS))
    assert rows["topk_weights"].null_count == len(rows)  # engines report ids only
    assert FakeEngine.requests == len(DOCUMENTS)
    opened = runs.read_run(run)  # as the app's Corpus run page opens it
    assert opened.manifest.dtype == f"served by {engine}" and opened.documents == len(DOCUMENTS)
    for domain, load in runs.domain_loads(opened).items():
        np.testing.assert_allclose(load, runs.domain_loads(runs.read_run(local_run))[domain])


def test_server_errors_are_retried_then_reported_and_the_run_resumes(server, model_dir, local_rows, tmp_path):
    served = served_model(model_dir, model_id="tiny")
    options = ServerOptions(server, "vllm", concurrency=2, retries=1, backoff=0.01)
    FakeEngine.mode = "fail fuchs"
    run = tmp_path / "run"
    with pytest.raises(ServerError, match=r"'fuchs'.*HTTP 500.*CUDA out of memory.*after 2 attempts.*run the same "
                                          r"command again to resume"):
        run_corpus_on_server(served, options, DOCUMENTS, run, batch_size=2, progress=False)
    assert set(rows_of(run)["doc_id"].to_pylist()) == {"fox", "add", "sum"}  # complete documents only

    FakeEngine.mode, FakeEngine.requests = "ok", 0
    summary = run_corpus_on_server(served, options, DOCUMENTS, run, batch_size=2, progress=False)
    assert (summary.documents, summary.skipped) == (2, 3) and FakeEngine.requests == 2
    assert rows_of(run).select(ID_COLUMNS).equals(local_rows.select(ID_COLUMNS))


@pytest.mark.parametrize("engine, message", [
    ("vllm", "no routed_experts: start the server with --enable-return-routed-experts"),
    ("sglang", "no meta_info.routed_experts: start the server with --enable-return-routed-experts"),
])
def test_a_response_without_routing_gives_a_clear_message(engine, message, server, model_dir, tmp_path, capsys):
    FakeEngine.mode = "no routing"
    status = cli.main(["trace", DOCUMENTS[0].text, "--server", server, "--engine", engine, "--model", str(model_dir)])
    assert status == 1
    assert message in capsys.readouterr().err


def test_trace_on_a_server_writes_an_ids_only_trace_file(server, model_dir, tiny_mixtral, tokenizer, tmp_path, capsys):
    path = tmp_path / "fox.safetensors"
    status = cli.main(["trace", DOCUMENTS[0].text, "--server", server, "--engine", "sglang",
                       "--model", str(model_dir), "-o", str(path)])
    assert status == 0, capsys.readouterr().err
    assert "Expert ids only, as sglang reported them" in capsys.readouterr().out
    trace, local = RoutingTrace.load(path), trace_text(tiny_mixtral, tokenizer, DOCUMENTS[0].text)
    np.testing.assert_array_equal(trace.topk_ids, local.topk_ids)
    assert (trace.tokens, trace.offsets, trace.text) == (local.tokens, local.offsets, local.text)
    assert trace.engine == "sglang" and not trace.has_logits and not trace.generated


def test_server_without_engine_is_a_usage_error(model_dir, capsys):
    assert cli.main(["trace", "hi", "--server", "http://127.0.0.1:9", "--model", str(model_dir)]) == 2
    assert "--server needs --engine" in capsys.readouterr().err


def test_the_corpus_run_page_opens_a_run_traced_on_a_server(server, model_dir, tmp_path):
    run = tmp_path / "run"
    served = served_model(model_dir, model_id="tiny")
    run_corpus_on_server(served, ServerOptions(server, "sglang"), DOCUMENTS, run, batch_size=2, progress=False)
    app = AppTest.from_file(str(Path(cli.__file__).parent.parent / "app_pages" / "corpus_run.py"), default_timeout=120)
    app.run()
    app.text_input(key="corpus_run_path").set_value(str(run)).run()
    assert not app.exception and not app.error
    assert any("5 documents" in c.value and "english: 2 documents" in c.value for c in app.caption)
    charts = [json.loads(chart.proto.spec) for chart in app.get("plotly_chart")]
    loads = runs.domain_loads(runs.read_run(run), 1)
    bars = {bar["name"]: bar["y"] for bar in charts[0]["data"] if bar["type"] == "bar"}
    assert list(bars) == list(loads)


def test_a_failed_request_is_retried_and_a_rejected_one_is_not(server, model_dir):
    served = served_model(model_dir, model_id="tiny")
    options = ServerOptions(server, "sglang", retries=2, backoff=0.01)
    FakeEngine.mode = "flaky"
    trace = trace_on_server(served, options, DOCUMENTS[1].text)
    assert FakeEngine.requests == 2 and trace.tokens == FakeEngine.routing[tuple(trace.token_ids)].tokens
    FakeEngine.mode, FakeEngine.requests = "reject", 0
    with pytest.raises(ServerError, match="answered HTTP 400: .*unknown field return_routed_experts"):
        trace_on_server(served, options, DOCUMENTS[1].text)
    assert FakeEngine.requests == 1
