"""benchmarks/gpu_check.py, the GPU acceptance command, in its CPU smoke form: so that the
script that only runs on someone's GPU cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moeviz.model.loading import BUNDLED_MODEL

ROOT = BUNDLED_MODEL.parent.parent


def test_gpu_check_smoke_run_on_the_cpu_meets_its_bounds(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--layers", "1", "--small",
         "--rounds", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    figures = json.loads(out.with_suffix(".json").read_text())
    assert figures["device"] == "cpu" and figures["layers"] == 1 and figures["failures"] == []
    assert figures["nf4_bytes"] == figures["planned_bytes"] > 0  # the 4-bit model weighs what was planned
    assert 0 < figures["load_peak_bytes"] <= figures["load_peak_bound"]
    assert len(figures["first_choice_agreement_per_layer"]) == 1
    assert 0.8 <= figures["first_choice_agreement_per_layer"][0] <= 1
    for name in ("prefill_512_tokens_per_s_bf16", "prefill_2048_tokens_per_s_nf4", "decode_tokens_per_s_bf16",
                 "decode_tokens_per_s_nf4", "capture_overhead_nf4", "load_seconds"):
        assert figures[name] > 0, name
    assert figures["cuda_tests"] == "not run (no GPU)"
    table = out.with_suffix(".md").read_text()
    assert "| 4-bit bytes / planned_bytes |" in table and "| bounds | all met |" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the full check is what runs")
def test_gpu_check_without_a_gpu_says_how_to_run_the_smoke_check(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert "--device cpu --layers 1 --small" in result.stderr
