"""Corpus runs: the Parquet rows equal each document traced alone; a run killed with SIGKILL
resumes without duplicates; runs read back into per-domain load, JS divergence and repeat
rates; the Corpus run page shows them."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from streamlit.testing.v1 import AppTest

from moeviz import cli
from moeviz.analysis import metrics
from moeviz.model.capture import trace_text
from moeviz.model.loading import load_model
from moeviz.runs.corpus import CorpusError, Document, read_documents, run_corpus, trace_batch
from moeviz.runs import store as runs

REPO = Path(__file__).resolve().parent.parent
MAX_TOKENS = 24  # some documents are longer: the cut is part of what must match
WORDS = {
    "prose": "the quick brown fox jumps over lazy dog and runs far away into night".split(),
    "code": "def return if else for in range self import class lambda ( ) : = + [ ]".split(),
    "math": "what is 12 + 7 ? answer 19 3 * 4 = 12 solve for x 2x - 5".split(),
}
PER_DOMAIN = 70


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a shared 2-core machine torch's
    spinning threads make each forward pass tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory, tiny_mixtral, tokenizer):
    return save(tiny_mixtral, tokenizer, tmp_path_factory.mktemp("tiny-mixtral"))


@pytest.fixture(scope="module")
def loaded(mixtral_dir):
    return load_model(mixtral_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """210 documents of 1 to 40 words in three domain folders."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for domain, words in WORDS.items():
        (folder / domain).mkdir()
        for number in range(PER_DOMAIN):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
            (folder / domain / f"doc-{number:03d}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def documents(corpus) -> list[Document]:
    return read_documents(corpus)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, loaded, documents) -> Path:
    path = tmp_path_factory.mktemp("runs") / "run"
    summary = run_corpus(loaded, documents, path, batch_size=8, max_tokens=MAX_TOKENS, progress=False)
    assert (summary.documents, summary.skipped, summary.parts) == (210, 0, 27)
    return path


@pytest.fixture(scope="module")
def alone(loaded, documents) -> dict:
    """Each document traced by itself, as `moeviz trace` would."""
    return {d.doc_id: trace_text(loaded.model, loaded.tokenizer, d.text, max_tokens=MAX_TOKENS) for d in documents}


def rows(run_dir: Path) -> pd.DataFrame:
    return pa.concat_tables(pq.read_table(p) for p in runs.part_paths(run_dir)).to_pandas()


# -- rows equal traces of single documents --------------------------------------------------


def test_run_rows_equal_each_document_traced_alone(run_dir, documents, alone):
    table = rows(run_dir)
    assert len(documents) >= 200 and table.domain.nunique() == 3
    assert set(table.doc_id) == {d.doc_id for d in documents}
    assert any(trace.truncated for trace in alone.values())
    domains = {d.doc_id: d.domain for d in documents}
    for doc_id, group in table.groupby("doc_id"):
        trace = alone[doc_id]
        group = group.sort_values(["position", "layer"])
        layers, tokens = len(trace.layer_ids), trace.num_tokens
        assert len(group) == layers * tokens
        assert (group.domain == domains[doc_id]).all()
        np.testing.assert_array_equal(group.position, np.repeat(np.arange(tokens), layers))
        np.testing.assert_array_equal(group.layer, np.tile(trace.layer_ids, tokens))
        assert list(group.token[::layers]) == trace.tokens
        assert list(group.token_id[::layers]) == trace.token_ids
        ids = np.stack(group.topk_ids.to_numpy()).reshape(tokens, layers, -1).transpose(1, 0, 2)
        weights = np.stack(group.topk_weights.to_numpy()).reshape(tokens, layers, -1).transpose(1, 0, 2)
        np.testing.assert_array_equal(ids, trace.topk_ids)
        np.testing.assert_allclose(weights, trace.topk_weights, rtol=0, atol=1e-5)


def test_parquet_schema_and_manifest(run_dir, loaded):
    schema = pq.read_schema(runs.part_paths(run_dir)[0])
    assert schema.names == runs.ROW_SCHEMA.names
    assert schema.field("topk_ids").type == pa.list_(pa.int32())
    assert schema.field("topk_weights").type == pa.list_(pa.float32())
    manifest = json.loads((run_dir / "run.json").read_text())
    assert (manifest["format"], manifest["version"]) == ("moeviz-corpus-run", 1)
    assert (manifest["model_type"], manifest["num_experts"], manifest["top_k"], manifest["layer_ids"]) == (
        "mixtral", 6, 2, [0, 1, 2])
    assert (manifest["dtype"], manifest["quantization"], manifest["max_tokens"]) == ("float32", "none", MAX_TOKENS)
    assert manifest["model_id"] == loaded.model_id


def test_batches_of_a_model_with_dense_layers_and_shared_experts_equal_single_texts(tokenizer, tiny_qwen2_moe):
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS["prose"]) for _ in range(rng.randint(1, 30))) for _ in range(12)]
    batched = trace_batch(tiny_qwen2_moe, tokenizer, texts)
    for text, trace in zip(texts, batched):
        expected = trace_text(tiny_qwen2_moe, tokenizer, text)
        assert trace.layer_ids == expected.layer_ids == [1, 3] and trace.tokens == expected.tokens
        np.testing.assert_array_equal(trace.topk_ids, expected.topk_ids)
        np.testing.assert_allclose(trace.topk_weights, expected.topk_weights, rtol=0, atol=1e-5)
        np.testing.assert_allclose(trace.router_logits, expected.router_logits, rtol=0, atol=1e-4)


# -- killed and resumed -----------------------------------------------------------------------


def moeviz(*args: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "moeviz", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_run_killed_with_sigkill_resumes_without_duplicates(capsys, tmp_path, mixtral_dir, corpus, documents, run_dir):
    run = tmp_path / "run"
    args = ["corpus", str(corpus), "-o", str(run), "--model", str(mixtral_dir), "--max-tokens", str(MAX_TOKENS)]
    first = moeviz(*args, "--batch-size", "1")
    deadline = time.monotonic() + 120
    while not runs.part_paths(run) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert first.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = set(rows(run).doc_id)
    assert 0 < len(done) < len(documents)

    # Rerun the same command line (in this process: a second torch import would double the time).
    assert cli.main([*args, "--batch-size", "8"]) == 0
    out, err = capsys.readouterr()
    assert f"{len(done)} were already done" in out and f"traced {len(documents) - len(done)} documents" in out
    assert "Tracing" in err  # the progress bar
    table = rows(run)
    assert not table.duplicated(["doc_id", "position", "layer"]).any()
    assert set(table.doc_id) == {d.doc_id for d in documents}
    assert not list(run.glob(".*.tmp"))
    # The same routing as the run that was never interrupted.
    key = ["doc_id", "position", "layer"]
    resumed = table.sort_values(key).reset_index(drop=True)
    whole = rows(run_dir).sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(resumed.drop(columns=["topk_ids", "topk_weights"]),
                                  whole.drop(columns=["topk_ids", "topk_weights"]))
    np.testing.assert_array_equal(np.stack(resumed.topk_ids), np.stack(whole.topk_ids))


def test_resume_skips_done_documents_and_removes_a_killed_write(tmp_path, loaded, documents):
    run = tmp_path / "run"
    killed_at_start = tmp_path / "killed-at-start"
    killed_at_start.mkdir()
    (killed_at_start / ".run.json.tmp").write_text("{")
    run_corpus(loaded, documents[:1], killed_at_start, max_tokens=MAX_TOKENS, progress=False)
    assert not (killed_at_start / ".run.json.tmp").exists() and runs.read_run(killed_at_start).documents == 1

    run_corpus(loaded, documents[:5], run, max_tokens=MAX_TOKENS, progress=False)
    (run / ".part-00001.parquet.tmp").write_bytes(b"half a part")
    summary = run_corpus(loaded, documents[:9], run, batch_size=2, max_tokens=MAX_TOKENS, progress=False)
    assert (summary.documents, summary.skipped, summary.parts) == (4, 5, 2)
    assert [p.name for p in runs.part_paths(run)] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert not (run / ".part-00001.parquet.tmp").exists()
    assert sorted(set(rows(run).doc_id)) == sorted(d.doc_id for d in documents[:9])


def test_resume_with_another_model_or_token_limit_is_refused(tmp_path, loaded, documents, tiny_qwen2_moe, tokenizer):
    run = tmp_path / "run"
    run_corpus(loaded, documents[:3], run, max_tokens=MAX_TOKENS, progress=False)
    qwen = load_model(save(tiny_qwen2_moe, tokenizer, tmp_path / "qwen"))
    with pytest.raises(runs.RunError, match=r"another model, dtype or token limit.*'mixtral' vs 'qwen2_moe'"):
        run_corpus(qwen, documents, run, max_tokens=MAX_TOKENS, progress=False)
    with pytest.raises(runs.RunError, match=r"max_tokens: 24 vs 48"):
        run_corpus(loaded, documents, run, max_tokens=48, progress=False)
    assert len(runs.part_paths(run)) == 1


def test_a_folder_that_is_not_a_run_or_is_being_written_is_refused(tmp_path, loaded, documents):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(runs.RunError, match="not empty.*notes.txt.*not a moeviz run"):
        run_corpus(loaded, documents[:2], tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # nothing written there
    with pytest.raises(runs.RunError, match="notes.txt is a file"):
        run_corpus(loaded, documents[:2], tmp_path / "notes.txt", progress=False)
    run = tmp_path / "run"
    run.mkdir()
    with (run / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(runs.RunError, match="Another moeviz process is writing"):
            run_corpus(loaded, documents[:2], run, progress=False)


# -- reading documents ----------------------------------------------------------------------


def test_folder_ids_are_relative_paths_and_domains_first_folders(tmp_path):
    (tmp_path / "code" / "py").mkdir(parents=True)
    (tmp_path / "code" / "py" / "a.txt").write_text("def f(): pass")
    (tmp_path / "top.txt").write_text("no domain")
    (tmp_path / "code" / "notes.md").write_text("not a .txt file")
    assert read_documents(tmp_path) == [
        Document("code/py/a.txt", "code", "def f(): pass"),
        Document("top.txt", None, "no domain"),
    ]


def test_jsonl_ids_default_to_line_numbers_and_domain_is_optional(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = ['{"text": "first"}', "", '{"text": "second", "id": "b", "domain": "math"}', '{"text": "third", "id": 7}']
    path.write_text("\n".join(lines) + "\n")
    assert read_documents(path) == [
        Document("1", None, "first"), Document("b", "math", "second"), Document("7", None, "third"),
    ]


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"text": "broken"'], r"docs.jsonl, line 2 is not valid JSON"),
    (['{"id": 1}'], r"line 1 has no \"text\" field"),
    (['{"text": 5}'], r"line 1 has a \"text\" that is a int"),
    (['["text"]'], r"line 1 is a JSON list; expected an object"),
    (['{"text": "a", "id": "x"}', '{"text": "b", "id": "x"}'], r"line 2: id 'x' was already used on line 1"),
    (['{"text": "a", "domain": 3}'], r"\"domain\" must be a string"),
    (['{"text": "  "}'], r"line 1 has an empty \"text\""),
])
def test_bad_jsonl_lines_are_named(tmp_path, lines, message):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=message):
        read_documents(path)


def test_bad_corpus_paths_and_files(tmp_path):
    with pytest.raises(CorpusError, match="No corpus at"):
        read_documents(tmp_path / "missing")
    (tmp_path / "docs.csv").write_text("text\nhello\n")
    with pytest.raises(CorpusError, match="neither a folder of .txt files nor a .jsonl file"):
        read_documents(tmp_path / "docs.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="holds no documents"):
        read_documents(empty)
    (empty / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match="latin1.txt is not UTF-8 text"):
        read_documents(empty)


# -- analysis of a run ------------------------------------------------------------------------


def test_domain_loads_equal_loads_of_all_tokens_of_the_domain(run_dir, documents, alone):
    run = runs.read_run(run_dir)
    assert list(run.domains) == ["code", "math", "prose"] and run.documents == len(documents)
    for picks in (1, 2):
        loads = runs.domain_loads(run, picks)
        for domain, load in loads.items():
            traces = [alone[d.doc_id] for d in documents if d.domain == domain]
            tokens = sum(t.num_tokens for t in traces)
            expected = sum(metrics.expert_load(t, picks) * t.num_tokens for t in traces) / tokens
            np.testing.assert_allclose(load, expected)
            np.testing.assert_allclose(load.sum(axis=1), picks)
    loads = runs.domain_loads(run)
    np.testing.assert_allclose(runs.domain_js_matrix(loads, 2), metrics.load_js_matrix([l[2] for l in loads.values()]))


def test_domain_repeat_rates_count_pairs_within_documents(run_dir, documents, alone):
    rates = runs.domain_repeat_rates(runs.read_run(run_dir))
    for domain, rate in rates.items():
        traces = [alone[d.doc_id] for d in documents if d.domain == domain and alone[d.doc_id].num_tokens >= 2]
        pairs = sum(t.num_tokens - 1 for t in traces)
        for name in ("same_first", "first_in_topk", "any_shared"):
            expected = sum(getattr(metrics.repeat_rates(t), name) * (t.num_tokens - 1) for t in traces) / pairs
            np.testing.assert_allclose(getattr(rate, name), expected)


def write_run(path: Path, documents: dict[str, tuple[str | None, list[list[int]]]]) -> Path:
    """A one-layer, top-2-of-4 run by hand: {doc_id: (domain, [[first, second], ...])}."""
    path.mkdir()
    manifest = runs.RunManifest("hand-built", "mixtral", 4, 2, 1, [0], "softmax", "MixtralTopKRouter", 0, 0,
                                "float32", "none", 16)
    (path / "run.json").write_text(manifest.to_json())
    records = [
        {"doc_id": doc_id, "domain": domain, "position": p, "token": f"t{p}", "token_id": p, "layer": 0,
         "topk_ids": picks, "topk_weights": [0.6, 0.4]}
        for doc_id, (domain, tokens) in documents.items() for p, picks in enumerate(tokens)
    ]
    pq.write_table(pa.Table.from_pylist(records, schema=runs.ROW_SCHEMA), path / "part-00000.parquet")
    return path


def test_repeats_across_a_document_boundary_are_not_counted(tmp_path):
    # a ends on expert 1 and b starts on it: end to end that pair would be a repeat.
    run = runs.read_run(write_run(tmp_path / "run", {
        "a": ("x", [[0, 2], [1, 3]]), "b": ("x", [[1, 2], [2, 0]]), "c": (None, [[3, 0]]),
    }))
    assert list(run.domains) == ["x", runs.NO_DOMAIN]
    rates = runs.domain_repeat_rates(run)
    assert list(rates) == ["x"]  # one-token documents have no pairs
    np.testing.assert_allclose(rates["x"].same_first, [0.0])
    np.testing.assert_allclose(rates["x"].any_shared, [0.5])  # (0,2)->(1,3) no; (1,2)->(2,0) yes
    np.testing.assert_allclose(runs.domain_loads(run, 1)["x"], [[0.25, 0.5, 0.25, 0.0]])


def test_damaged_runs_are_reported(tmp_path):
    with pytest.raises(runs.RunError, match="No corpus run at"):
        runs.read_run(tmp_path / "missing")
    with pytest.raises(runs.RunError, match="has no run.json"):
        runs.read_run(tmp_path)
    run = write_run(tmp_path / "run", {"a": ("x", [[0, 1], [1, 2]])})
    (run / "part-00001.parquet").write_bytes((run / "part-00000.parquet").read_bytes())
    with pytest.raises(runs.RunError, match="do not form whole documents"):
        runs.read_run(run)
    (run / "part-00001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(runs.RunError, match="part-00001.parquet is not a readable part"):
        runs.read_run(run)
    (run / "run.json").write_text("{}")
    with pytest.raises(runs.RunError, match="not a readable moeviz run manifest"):
        runs.read_run(run)


# -- the Corpus run page --------------------------------------------------------------------


def test_corpus_run_page_shows_loads_js_and_repeat_rates_of_the_run(run_dir):
    app = AppTest.from_file(str(REPO / "app_pages" / "corpus_run.py"), default_timeout=120)
    app.run()
    assert not app.exception and app.info
    app.text_input(key="corpus_run_path").set_value(str(run_dir)).run()
    assert not app.exception and not app.error
    run = runs.read_run(run_dir)
    assert any("210 documents" in c.value and "code: 70 documents" in c.value for c in app.caption)

    loads_spec, js_spec, repeats_spec = (json.loads(c.proto.spec) for c in app.get("plotly_chart"))
    loads = runs.domain_loads(run, 1)
    bars = {bar["name"]: decode(bar["y"]) for bar in loads_spec["data"] if bar["type"] == "bar"}
    assert list(bars) == list(loads)
    for domain, load in loads.items():
        np.testing.assert_allclose(bars[domain], load[0])
    np.testing.assert_allclose(decode(js_spec["data"][0]["z"]), runs.domain_js_matrix(loads, 0))
    rates = runs.domain_repeat_rates(run)
    lines = {line["name"]: decode(line["y"]) for line in repeats_spec["data"]}
    np.testing.assert_allclose(lines["code"], rates["code"].same_first)

    app.select_slider[0].set_value(2).run()
    bars = {bar["name"]: decode(bar["y"]) for bar in json.loads(app.get("plotly_chart")[0].proto.spec)["data"]
            if bar["type"] == "bar"}
    np.testing.assert_allclose(bars["math"], loads["math"][2])

    app.text_input(key="corpus_run_path").set_value(str(run_dir.parent / "missing")).run()
    assert not app.exception and any("No corpus run at" in e.value for e in app.error)


def decode(value):
    """Plotly writes numpy arrays as {"dtype", "bdata"} (base64) in figure JSON."""
    if isinstance(value, dict):
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        return array.reshape([int(n) for n in str(value["shape"]).split(",")]) if "shape" in value else array
    return np.asarray(value, dtype=float)
