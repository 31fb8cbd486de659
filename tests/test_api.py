"""The notebook API: path, LoadedModel or model + tokenizer in, RoutingTrace out."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import moeviz
from moeviz.model.capture import trace_text as capture_trace_text


def test_trace_text_accepts_a_path_a_loaded_model_or_a_model_and_tokenizer(tmp_path, tiny_mixtral, tokenizer):
    tiny_mixtral.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    text = "The quick brown fox"
    expected = capture_trace_text(tiny_mixtral, tokenizer, text)

    from_path = moeviz.trace_text(str(tmp_path), text)
    from_loaded = moeviz.trace_text(moeviz.load_model(tmp_path), text)
    from_objects = moeviz.trace_text(tiny_mixtral, text, tokenizer=tokenizer)
    for trace in (from_path, from_loaded, from_objects):
        assert isinstance(trace, moeviz.RoutingTrace)
        np.testing.assert_array_equal(trace.topk_ids, expected.topk_ids)
    generated = moeviz.trace_text(tiny_mixtral, text, tokenizer=tokenizer, sampling=moeviz.Sampling(max_new_tokens=3))
    assert generated.num_tokens == expected.num_tokens + 3 and generated.generated_from == expected.num_tokens


def test_a_model_without_its_tokenizer_is_a_clear_error(tiny_mixtral):
    with pytest.raises(ValueError, match="tokenizer=tokenizer"):
        moeviz.trace_text(tiny_mixtral, "hello")


def test_trace_analysis_and_views_do_not_import_torch():
    """The floors under the model: every module of moeviz.analysis and moeviz.views, the trace and
    the run store open traces and runs on machines without torch."""
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import moeviz.analysis, moeviz.views, moeviz.trace, moeviz.runs.store
        for package in (moeviz.analysis, moeviz.views):
            for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
                importlib.import_module(module.name)
        print(sorted(name for name in sys.modules if name.startswith("moeviz.")), "torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'moeviz.analysis.policies'" in out and "'moeviz.views.policy_charts'" in out
    assert out.strip().endswith("False"), out
