"""The moeviz command line, run as a user runs it: subprocesses with real arguments, their
output and files checked against the library; errors as one line and an exit status."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moeviz import cli
from moeviz.analysis import metrics
from moeviz.model.capture import DEFAULT_MAX_TOKENS, trace_text
from moeviz.model.generation import Sampling, trace_generation
from moeviz.model.loading import describe_model, estimate_memory, load_model
from moeviz.model.planning import format_bytes
from moeviz.trace import RoutingTrace

REPO = Path(__file__).resolve().parent.parent
ENV = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TEXT = "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As the subprocesses (OMP_NUM_THREADS=1): same arithmetic, and fast on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_mixtral, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-mixtral")
    tiny_mixtral.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moeviz", *map(str, args)], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def moeviz(*args) -> subprocess.CompletedProcess:
    return finished(start(*args))


@pytest.fixture(scope="module")
def model_commands(tmp_path_factory, model_dir):
    """`trace` and `info` started together: each spends most of its time importing torch, and
    on a shared machine two imports overlap well."""
    folder = tmp_path_factory.mktemp("commands")
    prompt, output = folder / "prompt.txt", folder / "out.safetensors"
    prompt.write_text(TEXT, encoding="utf-8")
    processes = {
        "trace": start("trace", "--file", prompt, "--model", model_dir, "-o", output,
                       "--generate", 4, "--temperature", 0.8, "--seed", 3, "--max-tokens", 64),
        "info": start("info", "--model", model_dir),
        "nf4": start("trace", TEXT, "--model", model_dir, "--quantization", "nf4", "--device", "cpu",
                     "--dtype", "float32", "-o", folder / "nf4.safetensors"),
    }
    yield processes, output, folder / "nf4.safetensors"
    for process in processes.values():
        if process.poll() is None:  # a test failed before reading it
            process.kill()
            process.communicate()


# -- the commands ----------------------------------------------------------------------------


def test_trace_of_a_file_with_generation_writes_the_trace_and_prints_its_summary(model_commands, loaded):
    processes, output, _ = model_commands
    done = finished(processes["trace"])
    assert done.returncode == 0, done.stderr

    expected = trace_generation(loaded.model, loaded.tokenizer, TEXT, Sampling(4, 0.8, 3),
                                model_id=loaded.model_id, max_tokens=64)
    saved = RoutingTrace.load(output)
    assert saved.tokens == expected.tokens and saved.generated_from == expected.generated_from
    np.testing.assert_array_equal(saved.topk_ids, expected.topk_ids)
    np.testing.assert_allclose(saved.topk_weights, expected.topk_weights, atol=1e-6)
    assert done.stdout == cli.summary_table(expected) + f"\nTrace written to {output}\n"
    assert "4 of the tokens were generated" in done.stdout


def test_trace_loads_the_model_as_the_flags_say(model_commands, model_dir):
    processes, _, output = model_commands
    done = finished(processes["nf4"])
    assert done.returncode == 0, done.stderr
    saved = RoutingTrace.load(output)
    assert saved.quantization == "nf4"
    nf4 = load_model(model_dir, quantization="nf4")
    expected = trace_text(nf4.model, nf4.tokenizer, TEXT)
    np.testing.assert_array_equal(saved.topk_ids, expected.topk_ids)


def test_info_describes_the_model_and_its_memory_estimate(model_commands, loaded, model_dir):
    done = finished(model_commands[0]["info"])
    assert done.returncode == 0, done.stderr
    facts = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    facts = {name.strip(): value.strip() for name, value in facts.items()}
    plan = estimate_memory(model_dir)  # sizes from shapes; free memory is the machine's, measured apart
    free = re.fullmatch(r"([\d,.]+ [MG]iB), 10% kept for activations", facts.pop("Free memory (cpu)"))
    assert free, done.stdout
    assert facts == describe_model(loaded).rows() | {
        "Full precision (float32)": format_bytes(plan.full_bytes),
        "4-bit (NF4)": f"{format_bytes(plan.nf4_bytes)} ({format_bytes(plan.nf4_peak_bytes)} while loading)",
        "Weights storage auto picks": "full precision",
    }
    assert (facts["Family"], facts["Routed experts"], facts["Top-k"]) == ("mixtral", "6", "2")
    assert facts["MoE layers"] == "layer 0, layer 1, layer 2" and facts["Scoring function"] == "softmax"
    assert (facts["Size"], facts["Quantization"]) == (f"{loaded.footprint_bytes / 2**20:.1f} MiB", "none")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(server: subprocess.Popen, port: int, seconds: float = 120) -> None:
    """Wait until the app that `server` started answers Streamlit's health check on `port`."""
    deadline, health = time.monotonic() + seconds, None
    while health != "ok" and server.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                health = response.read().decode()
        except OSError:
            time.sleep(0.2)
    assert health == "ok", server.stderr.read() if server.poll() is not None else "no answer"


def listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on `port`, from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if state == "0A" and int(local_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_serve_starts_the_app_on_localhost_with_the_model(model_dir):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moeviz", "serve", "--port", str(port), "--model", str(model_dir),
                               "--quantization", "nf4", "--dtype", "float32"],
                              env=ENV | {"MOEVIZ_DEVICE": "cpu"}, cwd=REPO.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_serving(server, port)
        assert listening_addresses(port) == {"127.0.0.1"}
        # The process became Streamlit (exec): signals reach the server, no orphan is left.
        command = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        assert [b"-m", b"streamlit", b"run", str(REPO / "app.py").encode()] == command[1:5]
        environment = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
        assert f"MOEVIZ_MODEL={model_dir}".encode() in environment
        for setting in (b"MOEVIZ_QUANTIZATION=nf4", b"MOEVIZ_DEVICE=cpu", b"MOEVIZ_DTYPE=float32"):
            assert setting in environment  # the sidebar starts from these (tests/test_planning.py)
    finally:
        server.terminate()
        server.communicate(timeout=30)
    assert server.returncode in (0, -15)


def test_help_and_console_script():
    script = Path(sys.executable).parent / "moeviz"
    assert script.exists(), "the `moeviz` command is missing: run scripts/setup.sh (pip install -e .)"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, env=ENV, timeout=60)
    assert done.returncode == 0
    for command in ("trace", "corpus", "serve", "info", "exit status"):
        assert command in done.stdout
    assert cli.MAX_TOKENS == DEFAULT_MAX_TOKENS


# -- errors: one line on stderr, no traceback, exit status 2 (usage) or 1 (failure) -----------


@pytest.mark.parametrize("args, status, message", [
    (["trace", "--file", "{tmp}/missing.txt"], 2, "moeviz trace: error: no text file at {tmp}/missing.txt"),
    (["trace", "--file", "{tmp}/latin1.txt"], 1, "moeviz trace: {tmp}/latin1.txt is not UTF-8 text"),
    (["trace", "hello", "--seed", "3"], 2, "--temperature and --seed only apply with --generate N"),
    (["trace", "hello", "-o", "{tmp}/no/such/folder/t.safetensors"], 2, "no folder {tmp}/no/such/folder"),
    (["corpus", "{tmp}/missing", "-o", "{tmp}/run"], 2, "moeviz corpus: error: no corpus at {tmp}/missing"),
    (["trace", "hello", "--max-tokens", "0"], 2, "argument --max-tokens: must be at least 1, got 0"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (["info", "--quantization", "int3"], 2, "argument --quantization: invalid choice: 'int3'"),
    (["trace", "hi", "--server", "http://127.0.0.1:9", "--engine", "vllm", "--quantization", "nf4", "--dtype", "float16"],
     2, "moeviz trace: error: --quantization, --dtype do not apply with --server: the server loads the model"),
])
def test_usage_errors_and_bad_files_exit_before_loading_a_model(tmp_path, args, status, message):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    started = time.monotonic()
    done = moeviz(*[arg.format(tmp=tmp_path) for arg in args])
    assert (done.returncode, done.stdout) == (status, "")
    assert message.format(tmp=tmp_path) in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(("moeviz", "usage")) and time.monotonic() - started < 30


@pytest.mark.parametrize("variable", ["MOEVIZ_QUANTIZATION", "MOEVIZ_DEVICE", "MOEVIZ_DTYPE"])
def test_a_bad_environment_default_is_a_usage_error(monkeypatch, capsys, variable):
    monkeypatch.setenv(variable, "int3")
    assert cli.main(["info"]) == 2
    assert f"moeviz info: error: ${variable} is 'int3'; choose one of auto, " in capsys.readouterr().err


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("args, message", [
    (["info", "--model", "{dense}"], "moeviz info: This model (llama) has no MoE routers"),
    (["trace", "hello", "--model", "{tmp}/no-model"], "moeviz trace: No model directory at '{tmp}/no-model'"),
    (["corpus", "{tmp}/bad.jsonl", "-o", "{tmp}/run", "--model", "{model}"], "bad.jsonl, line 2 is not valid JSON"),
    (["corpus", "{tmp}/good.jsonl", "-o", "{tmp}", "--model", "{model}"], "is not empty"),
])
def test_failures_are_one_line_with_status_1(capsys, tmp_path, model_dir, dense_dir, args, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "good.jsonl").write_text('{"text": "fine"}\n')
    fill = dict(tmp=tmp_path, dense=dense_dir, model=model_dir)
    assert cli.main([arg.format(**fill) for arg in args]) == 1
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert out == "" and len(lines) == 1 and message.format(**fill) in lines[0] and "Traceback" not in err


def test_summary_table_values_are_the_metrics_of_the_trace(tiny_mixtral, tokenizer):
    trace = trace_text(tiny_mixtral, tokenizer, TEXT, max_tokens=16)
    lines = cli.summary_table(trace).splitlines()
    assert lines[0].startswith(f"{trace.model_id} (mixtral): 16 tokens, 3 MoE layers of 3, 6 experts, top-2")
    assert "only the first 16 were traced" in lines[1]
    load, uniform = metrics.expert_load(trace, 1), 1 / 6
    entropy, balance = metrics.router_entropy(trace).mean(axis=1), metrics.balance_loss(trace)
    same_first = metrics.repeat_rates(trace).same_first
    rows = [line for line in lines if re.match(r"layer \d", line)]
    assert len(rows) == 3
    for i, row in enumerate(rows):
        cells = row.split()
        assert cells[:2] == ["layer", str(i)]
        assert cells[2:4] == [f"{load[i].max():.3f}", f"({load[i].max() / uniform:.2f}x)"]
        assert cells[4:6] == [f"{load[i].min():.3f}", f"({load[i].min() / uniform:.2f}x)"]
        assert cells[6:] == [f"{entropy[i]:.3f}", f"{balance[i]:.3f}", f"{same_first[i]:.3f}"]
