"""Fuzzing trace files: every mutated file either opens as a valid trace or raises the clear
TraceFileError, and neither opening it nor computing what the pages show from it takes memory
out of proportion to the file.

The bound, per file of n bytes, measured with tracemalloc (numpy reports its buffers to it):
- opening: at most LOAD_FACTOR · n + LOAD_SLACK. JSON costs Python up to ~20 times its bytes
  (`"a",` is 4 bytes of JSON and a 58-byte str plus an 8-byte pointer in Python); a file of
  one-character tokens measures 13-19 times its size, a file of router logits 1.1 times.
- the pages' metrics and the Compare layers matrix: at most CHART_FACTOR · n + CHART_SLACK.
  Scores are computed in float64 from float32 logits (5.5 times the file measured). The slack
  is what the header caps let a tiny file claim: moeviz.trace.MAX_EXPERTS and MAX_LAYERS
  (1,024 each) make co-activation and transitions E x E and the Compare layers matrix
  layers x E, 8 MB each; the largest claims measure ~34 MB
  (test_the_largest_claims_a_small_file_can_make_stay_within_the_slack).
Before the bounds, a 600-byte file could claim 10^5 layers x 10^5 experts (80 GB).
"""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from factories import make_trace

from moeviz.analysis import metrics
from moeviz.trace import (
    MAX_EXPERTS,
    MAX_LAYERS,
    MAX_TOP_K,
    RoutingTrace,
    TraceFileError,
)
from moeviz.views import charts

SEED = 13
CASES = 1000
LOAD_FACTOR, LOAD_SLACK = 24, 256 * 1024
CHART_FACTOR, CHART_SLACK = 8, 48 * 1024 * 1024

INTS = [0, 1, 2, 3, -1, 7, 8, 1023, 1024, 1025, 2**31, 2**53, 2**63, 10**5, -(2**63), 10**30]
OTHERS = [None, True, False, 1.5, float("nan"), "3", "", [], {}, [1], ["x"], [[0, 1]], "x" * 5000]
DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
          np.float16, np.float32, np.float64, np.bool_]


def split_file(data: bytes) -> tuple[dict, dict]:
    (length,) = struct.unpack("<Q", data[:8])
    arrays = safetensors.numpy.load(data)
    return json.loads(json.loads(data[8 : 8 + length])["__metadata__"]["fields"]), dict(sorted(arrays.items()))


def base_files() -> list[bytes]:
    """Valid traces of each kind: scores, ids only from an engine, an encoder-decoder model,
    and the version 1 fixture."""
    rng = np.random.default_rng(SEED)
    logits = rng.normal(size=(3, 12, 8)).astype(np.float32)
    scored = make_trace(np.argsort(-logits, axis=-1)[..., :2], router_logits=logits, layer_ids=[0, 1, 3],
                        tokens=["<s>", "Grüß", " →", " 7", "\n", " <b>", "x", "y", " z", "1", "2", "3"])
    ids = rng.integers(0, 16, size=(2, 9, 4))
    ids_only = make_trace(np.argsort(rng.random((2, 9, 16)), axis=-1)[..., :4], num_experts=16)
    fields, arrays = split_file(ids_only.to_bytes())
    fields.update(engine="vllm", shared_experts=1, generated_from=6)
    ids_only_file = write_file(fields, {"topk_ids": arrays["topk_ids"]})
    sigmoid = make_trace(ids[:, :5, :1] % 4, num_experts=4, scoring="sigmoid", layer_ids=[1, 3], num_layers=4)
    fields, arrays = split_file(sigmoid.to_bytes())
    fields.update(encoder_layers=2)
    encoder_decoder = write_file(fields, arrays)
    v1 = (Path(__file__).parent / "fixtures" / "trace_v1.safetensors").read_bytes()
    return [scored.to_bytes(), ids_only_file, encoder_decoder, v1]


SAFETENSORS_DTYPES = {"int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64", "uint8": "U8", "uint16": "U16",
                      "uint32": "U32", "uint64": "U64", "float16": "F16", "float32": "F32", "float64": "F64",
                      "bool": "BOOL"}


def write_file(fields: dict, arrays: dict, version: str = "2", file_format: str = "moeviz-trace") -> bytes:
    """A safetensors file, written here byte for byte the same on every run (safetensors' own
    writer orders the metadata keys differently from run to run, and the byte flips must hit
    the same places)."""
    header = {"__metadata__": {"format": file_format, "version": version, "fields": json.dumps(fields)}}
    offset, blobs = 0, []
    for name in sorted(arrays):
        blob = np.ascontiguousarray(arrays[name]).tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[arrays[name].dtype.name], "shape": list(arrays[name].shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs)


# -- mutations ---------------------------------------------------------------------------------


def hostile_value(rng):
    pool = INTS + OTHERS
    return pool[rng.integers(len(pool))]


def mutate_field(rng, fields: dict, arrays: dict) -> None:
    name = list(fields)[rng.integers(len(fields))] if rng.random() < 0.95 else "evil"
    value = fields.get(name)
    action = rng.integers(4)
    if action == 0 or value is None:
        fields[name] = hostile_value(rng)
    elif action == 1 and isinstance(value, bool | int):
        fields[name] = int(value) * int(rng.choice([0, 2, 10, 1000])) + int(rng.choice([-2, -1, 1, 2]))
    elif action == 1 and isinstance(value, list):
        mutate_list(rng, value)
    elif action == 1 and isinstance(value, str):
        fields[name] = [value * 1000, "", value + "\ud800", value + "\x00", value[::-1]][rng.integers(5)]
    elif action == 2:
        del fields[name]
    else:
        other = list(fields)[rng.integers(len(fields))]
        fields[name], fields[other] = fields[other], value


COUNTS = ("num_experts", "top_k", "num_layers", "input_token_count", "generated_from", "shared_experts",
          "encoder_layers")
NAMES = ("model_id", "model_type", "router_class", "quantization", "engine", "text")


def nudge_field(rng, fields: dict, arrays: dict) -> None:
    """A change a real file could plausibly hold: a count near its value or at a cap, another
    name, a token of another length."""
    action = rng.integers(3)
    if action == 0:
        name = COUNTS[rng.integers(len(COUNTS))]
        value = fields.get(name, 0)
        fields[name] = int(rng.choice([value - 1, value + 1, 2 * value, 0, 32, 33, 1023, 1024, 1025, 10**5]))
    elif action == 1:
        name = NAMES[rng.integers(len(NAMES))]
        fields[name] = ["Qwen/Qwen3-30B-A3B", "", "<script>alert(1)</script>", "é" * 4096, "x" * 4097][rng.integers(5)]
    elif isinstance(fields.get("tokens"), list) and fields["tokens"]:
        tokens = fields["tokens"]
        tokens[rng.integers(len(tokens))] = "ä" * int(rng.choice([0, 1, 1024, 1025]))


def mutate_list(rng, values: list) -> None:
    action = rng.integers(5)
    if action == 0 and values:
        values.pop(rng.integers(len(values)))
    elif action == 1:
        values.append(values[-1] if values and rng.random() < 0.5 else hostile_value(rng))
    elif action == 2 and values:
        values[rng.integers(len(values))] = hostile_value(rng)
    elif action == 3 and values:
        values[rng.integers(len(values))] = values[0]  # a repeat
    else:
        values.extend(values * int(rng.integers(1, 50)))


def mutate_array(rng, fields: dict, arrays: dict) -> None:
    if not arrays:
        arrays["topk_ids"] = np.zeros((1, 1, 1), np.int32)
        return
    name = list(arrays)[rng.integers(len(arrays))]
    array = arrays[name]
    action = rng.integers(7)
    if action == 0:
        del arrays[name]
    elif action == 1:
        arrays[name] = array.astype(DTYPES[rng.integers(len(DTYPES))])
    elif action == 2:
        axis = rng.integers(array.ndim)
        arrays[name] = np.take(array, np.arange(int(rng.integers(array.shape[axis]))), axis=axis)
    elif action == 3:
        axis = rng.integers(array.ndim)
        arrays[name] = np.concatenate([array, array], axis=axis)
    elif action == 4 and array.size:
        changed = array.copy()
        changed.flat[rng.integers(array.size)] = rng.choice([-1, 3, 4, 8, 16, 127, 1024, 2**31 - 1])
        arrays[name] = changed
    elif action == 5:
        arrays[name] = array.reshape(array.shape[0], -1) if rng.random() < 0.5 else array[..., None]
    else:
        arrays[["extra", "topk_ids", "router_logits"][rng.integers(3)]] = np.zeros((1, 2, 1), np.float32)


def mutate_bytes(rng, data: bytes) -> bytes:
    data = bytearray(data)
    (length,) = struct.unpack("<Q", data[:8])
    action = rng.integers(4)
    if action == 0:  # flip bytes, mostly in the header
        for _ in range(rng.integers(1, 9)):
            end = 8 + length if rng.random() < 0.7 else len(data)
            data[rng.integers(end)] ^= 1 << rng.integers(8)
    elif action == 1:
        del data[rng.integers(len(data)):]
    elif action == 2:
        data[:8] = struct.pack("<Q", max(0, length + int(rng.integers(-16, 17))))
    else:
        at = rng.integers(8, len(data))
        data[at:at] = bytes(rng.integers(0, 256, size=rng.integers(1, 16), dtype=np.uint8))
    return bytes(data)


def mutated_file(rng, bases: list[bytes]) -> tuple[bytes, str]:
    """One mutated file and what was done to it."""
    base = bases[rng.integers(len(bases))]
    fields, arrays = split_file(base)
    arrays = dict(arrays)
    version, file_format, done = "2", "moeviz-trace", []
    for _ in range(rng.integers(1, 3)):
        kind = rng.choice(["field", "field", "nudge", "nudge", "nudge", "array", "array", "version"])
        done.append(str(kind))
        if kind == "field":
            mutate_field(rng, fields, arrays)
        elif kind == "nudge":
            nudge_field(rng, fields, arrays)
        elif kind == "array":
            mutate_array(rng, fields, arrays)
        else:
            version = ["1", "2", "3", "0", "99", "x", "", "2 "][rng.integers(8)]
            file_format = "moeviz-trace" if rng.random() < 0.8 else "moeviz"
    data = write_file(fields, arrays, version, file_format)
    if rng.random() < 0.2:
        done.append("bytes")
        data = mutate_bytes(rng, data)
    return data, "+".join(done)


# -- what the pages compute ------------------------------------------------------------------


def page_metrics(trace: RoutingTrace) -> None:
    """The numbers and matrices the pages compute from a trace."""
    load = metrics.expert_load(trace)
    metrics.expert_load(trace, 1)
    metrics.repeat_chance(trace)
    metrics.dropped_token_share(trace, 1.25)
    metrics.capacity_drops(trace, 1.25)
    if trace.num_tokens >= 2:
        metrics.repeat_rates(trace)
        metrics.marginal_repeat_chance(trace)
    last = len(trace.layer_ids) - 1
    metrics.coactivation(trace, last)
    metrics.layer_transitions(trace, 0, last)
    charts.layer_load_heatmap(trace, load, metrics.uniform_load(trace))  # the Compare layers matrix
    if trace.has_logits:
        metrics.router_entropy(trace)
        metrics.balance_loss(trace)


def traced_peak(function, *args):
    """(result, peak bytes allocated above the start) of function(*args) under tracemalloc."""
    tracemalloc.reset_peak()
    start = tracemalloc.get_traced_memory()[0]
    result = function(*args)
    return result, tracemalloc.get_traced_memory()[1] - start


def open_file(data: bytes) -> RoutingTrace | TraceFileError:
    try:
        return RoutingTrace.from_bytes(data)
    except TraceFileError as error:
        return error


@pytest.fixture
def traced_memory():
    for data in base_files():  # Plotly builds its validators on first use: not the file's cost
        page_metrics(RoutingTrace.from_bytes(data))
    tracemalloc.start()
    yield
    tracemalloc.stop()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf and NaN scores are shown as they are
def test_mutated_files_open_or_are_refused_clearly_within_bounded_memory(traced_memory):
    rng = np.random.default_rng(SEED)
    bases = base_files()
    outcomes = {"opened": 0, "refused": 0}
    charted = set()  # memory depends on sizes only: chart each shape once
    for case in range(CASES):
        data, done = mutated_file(rng, bases)
        where = f"case {case} ({done}, {len(data)} bytes)"
        opened, peak = traced_peak(open_file, data)
        assert peak <= LOAD_FACTOR * len(data) + LOAD_SLACK, f"{where}: opening took {peak:,} bytes"
        if isinstance(opened, TraceFileError):
            outcomes["refused"] += 1
            message = str(opened)
            assert message.startswith("This ") and len(message) < 400, f"{where}: unclear error {message!r}"
            continue
        outcomes["opened"] += 1
        # checked before charting: a trace past the caps could ask for gigabytes
        assert 1 <= opened.top_k <= min(opened.num_experts, MAX_TOP_K) and opened.num_experts <= MAX_EXPERTS, where
        assert len(opened.layer_ids) <= opened.num_layers <= MAX_LAYERS, where
        shape = (opened.num_layers, opened.num_experts, opened.top_k, tuple(opened.layer_ids), opened.num_tokens,
                 opened.has_logits)
        if shape in charted:
            continue
        charted.add(shape)
        _, peak = traced_peak(page_metrics, opened)
        assert peak <= CHART_FACTOR * len(data) + CHART_SLACK, f"{where}: the pages' metrics took {peak:,} bytes"
    assert outcomes["opened"] >= 100 and outcomes["refused"] >= 500, outcomes


def test_the_largest_claims_a_small_file_can_make_stay_within_the_slack(traced_memory):
    """An ids-only file of one layer and two tokens claiming the caps: 1,024 experts, 1,024
    layers (the Compare layers matrix is 1,024 x 1,024), top-1."""
    fields, arrays = split_file(make_trace([[[0], [1]]]).to_bytes())
    fields.update(num_experts=MAX_EXPERTS, num_layers=MAX_LAYERS, layer_ids=[MAX_LAYERS - 1])
    data = write_file(fields, {"topk_ids": arrays["topk_ids"]})
    assert len(data) < 1000
    trace, peak = traced_peak(RoutingTrace.from_bytes, data)
    assert peak <= LOAD_SLACK
    _, peak = traced_peak(page_metrics, trace)
    matrix = MAX_LAYERS * MAX_EXPERTS * 8  # float64, 8 MB
    assert matrix <= peak <= CHART_SLACK


@pytest.mark.parametrize("tokens", [1, 64, 4096])
def test_a_json_heavy_file_stays_within_the_load_bound(traced_memory, tokens):
    """Many one-character tokens, the most Python objects per byte a valid file can hold."""
    trace = make_trace(np.zeros((1, tokens, 1), np.int32), tokens=["a"] * tokens, num_experts=1)
    fields, arrays = split_file(trace.to_bytes())
    data = write_file(fields, {"topk_ids": arrays["topk_ids"].astype(np.int8)})
    _, peak = traced_peak(RoutingTrace.from_bytes, data)
    assert peak <= LOAD_FACTOR * len(data) + LOAD_SLACK, f"{peak:,} bytes for {len(data):,}"
    assert math.isfinite(peak)
