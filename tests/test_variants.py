"""Two variants of one model on the same text (`moeviz.analysis.variants`, `moeviz.compare_variants`,
the Compare variants page): hand-worked agreement, a model against itself, the bundled model in
float32 against NF4 (real bitsandbytes on the CPU), and tokenizers that disagree refused."""

from __future__ import annotations

import re

import numpy as np
import plotly.io as pio
import pytest
from factories import make_trace
from test_app import limit, run_page, token_counts
from test_routing_lab_page import values
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import moeviz
from moeviz import cli
from moeviz.analysis import effects
from moeviz.analysis.variants import TokenizationMismatch, VariantComparison
from moeviz.model.capture import trace_text
from moeviz.model.interventions import Intervention, run_intervention
from moeviz.model.loading import BUNDLED_MODEL, LoadedModel, load_model
from moeviz.ui import presets
from moeviz.views import charts, variant_charts

PAGE = "app_pages/compare_variants.py"
TOKENS = ["<s>", "<b>", " a", "\n"]


def hand_worked(include_special: bool = False) -> VariantComparison:
    # Layer 0: first choices 0, 2, 1 against 1, 2, 1; shared experts 2, 1, 1 of k = 2.
    # Layer 1: first choices all 0; shared 2, 2, 1. BOS (special) differs everywhere.
    a = make_trace([[[0, 1], [0, 1], [2, 3], [1, 2]], [[0, 1], [0, 1], [0, 1], [0, 1]]], tokens=TOKENS,
                   num_experts=4, special_ids=[0])
    b = make_trace([[[3, 2], [1, 0], [2, 1], [1, 3]], [[3, 2], [0, 1], [0, 1], [0, 3]]], tokens=TOKENS,
                   num_experts=4, special_ids=[0])
    return VariantComparison(a, b, np.array([-1.0, -2.0, -3.0]), np.array([-1.5, -2.0, -1.0]), include_special)


def test_agreement_hand_worked():
    comparison = hand_worked()
    np.testing.assert_allclose(comparison.first_choice_agreement, [2 / 3, 1.0])
    np.testing.assert_allclose(comparison.topk_overlap, [4 / 6, 5 / 6])
    np.testing.assert_array_equal(comparison.delta_logprobs, [-0.5, 0.0, 2.0])
    counted_too = hand_worked(include_special=True)  # BOS shares no expert
    np.testing.assert_allclose(counted_too.first_choice_agreement, [2 / 4, 3 / 4])
    np.testing.assert_allclose(counted_too.topk_overlap, [4 / 8, 5 / 8])


def test_disagreement_view_marks_counted_tokens_whose_first_choice_differs_and_escapes_them():
    html = variant_charts.disagreement_view_html(hand_worked(), 0)
    assert re.findall(r'class="moeviz-token moeviz-differs" data-position="(\d+)"', html) == ["1"]
    assert 'moeviz-left-out" data-position="0"' in html  # BOS differs but is not counted
    assert "<b>" not in html.replace('<br>', "") and "&lt;b&gt;" in html
    assert 'title="A: experts 0, 1 · B: experts 1, 0"' in html
    assert "1 of 3 tokens at layer 0" in html


def test_charts_read_back_with_named_columns_and_integer_ids():
    comparison = hand_worked()
    table = charts.figure_table(variant_charts.agreement_chart(comparison))
    assert list(table.columns) == ["series", "layer", "share"]
    assert str(table["layer"].dtype) == "Int64"
    assert table["series"].tolist() == ["first-choice agreement"] * 2 + ["top-2 overlap"] * 2
    np.testing.assert_allclose(table["share"], [2 / 3, 1.0, 4 / 6, 5 / 6])
    table = charts.figure_table(variant_charts.delta_logprob_chart(comparison))
    assert table["position"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(table["Δ_log_p"], [-0.5, 0.0, 2.0])


def test_different_tokens_layers_or_predictions_are_refused():
    a = make_trace([[[0, 1], [1, 2]]], token_ids=[5, 6], tokens=["x", "y"])
    b = make_trace([[[0, 1], [1, 2]]], token_ids=[5, 7], tokens=["x", "z"])
    with pytest.raises(TokenizationMismatch, match=r"split this text differently \(2 and 2 tokens; at position 1: "
                                                    r"'y' \(id 6\) against 'z' \(id 7\)\)"):
        VariantComparison(a, b, np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match="These models route differently"):
        VariantComparison(a, make_trace([[[0, 1], [1, 2]]], token_ids=[5, 6], num_experts=8), np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match="one log-probability per predicted token, 1"):
        VariantComparison(a, a, np.zeros(2), np.zeros(2))


# -- the library door on real models ----------------------------------------------------------------

TEXT = "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b"


def test_a_model_compared_with_itself_agrees_everywhere(tiny_mixtral, tokenizer):
    loaded = LoadedModel(model=tiny_mixtral, tokenizer=tokenizer, model_id="tiny", device="cpu")
    comparison = moeviz.compare_variants(loaded, loaded, TEXT)
    np.testing.assert_array_equal(comparison.first_choice_agreement, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(comparison.topk_overlap, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(comparison.delta_logprobs, np.zeros(comparison.a.num_tokens - 1))
    assert not comparison.first_choice_differs.any()


def other_tokenizer() -> PreTrainedTokenizerFast:
    """A real BPE tokenizer trained on other text: it splits TEXT into other ids."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["Lorem ipsum dolor sit amet, consectetur adipiscing elit."] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_mismatched_tokenizers_are_refused_before_either_model_runs(tiny_mixtral, tokenizer):
    a = LoadedModel(model=tiny_mixtral, tokenizer=tokenizer, model_id="tiny", device="cpu")
    b = LoadedModel(model=None, tokenizer=other_tokenizer(), model_id="other", device="cpu")  # None: cannot run
    with pytest.raises(TokenizationMismatch, match="tokenizers split this text differently"):
        moeviz.compare_variants(a, b, TEXT)


@pytest.fixture(scope="module")
def full_and_nf4():
    return load_model(BUNDLED_MODEL, quantization="none"), load_model(BUNDLED_MODEL, quantization="nf4")


def test_bundled_model_in_float32_against_nf4(full_and_nf4):
    full, nf4 = full_and_nf4
    assert (full.quantization, nf4.quantization, full.model.dtype.is_floating_point) == ("none", "nf4", True)
    text = presets()["english"]
    comparison = moeviz.compare_variants(full, nf4, text, max_tokens=160)
    # The two routings, captured on their own, and the agreement counted token by token.
    traces = [trace_text(m.model, m.tokenizer, text, model_id=m.model_id, max_tokens=160) for m in (full, nf4)]
    np.testing.assert_array_equal(comparison.a.topk_ids, traces[0].topk_ids)
    np.testing.assert_array_equal(comparison.b.topk_ids, traces[1].topk_ids)
    counted = [p for p in range(traces[0].num_tokens) if traces[0].token_ids[p] not in traces[0].special_ids]
    for layer in range(len(traces[0].layer_ids)):
        ids_a, ids_b = traces[0].topk_ids[layer], traces[1].topk_ids[layer]
        first = sum(ids_a[p, 0] == ids_b[p, 0] for p in counted) / len(counted)
        shared = sum(len(set(ids_a[p]) & set(ids_b[p])) for p in counted) / (len(counted) * traces[0].top_k)
        assert comparison.first_choice_agreement[layer] == pytest.approx(first, abs=1e-12)
        assert comparison.topk_overlap[layer] == pytest.approx(shared, abs=1e-12)
    baselines = [run_intervention(m.model, m.tokenizer, text, Intervention(),
                                  max_tokens=160).baseline_logprobs for m in (full, nf4)]
    np.testing.assert_allclose(comparison.delta_logprobs, baselines[1].astype(np.float64) - baselines[0], atol=1e-6)
    assert np.abs(comparison.delta_logprobs).max() > 1e-3  # 4-bit weights change the predictions


# -- the page ---------------------------------------------------------------------------------------


def test_page_shows_the_comparison_of_the_library(full_and_nf4, tmp_path, tiny_mixtral, tokenizer):
    app = run_page(PAGE)
    nf4 = full_and_nf4[1]
    default = load_model(BUNDLED_MODEL)  # the sidebar's "auto" storage: full precision for the bundled model
    text = presets()["english"]
    expected = moeviz.compare_variants(default, nf4, text, max_tokens=limit(default))
    shown = {m.label: m.value for m in app.metric}
    assert shown["First-choice agreement"] == f"{expected.first_choice_agreement.mean():.1%}"
    assert shown["Top-2 overlap"] == f"{expected.topk_overlap.mean():.1%}"
    assert shown["Mean Δ log p (B − A)"] == f"{expected.delta_logprobs.mean():+.4f}"
    assert shown["Perplexity B (A)"] == f"{effects.perplexity(expected.logprobs_b):.3f}"
    assert any("model B: " in c.value and "4-bit (NF4)" in c.value for c in app.caption)
    assert token_counts(app) == [int(expected.counted.sum())]

    figures = [pio.from_json(e.proto.spec) for e in app.get("plotly_chart")]
    agreement = next(f for f in figures if f.layout.title.text.startswith("How often model B"))
    np.testing.assert_allclose(values(agreement.data[0].y), expected.first_choice_agreement, atol=1e-12)
    np.testing.assert_allclose(values(agreement.data[1].y), expected.topk_overlap, atol=1e-12)
    view = next(e.proto.body for e in app.get("html") if "moeviz-token-view" in e.proto.body)
    layer = expected.a.layer_ids[0]
    differs = expected.first_choice_differs[0] & expected.counted
    assert [int(p) for p in re.findall(r'moeviz-differs" data-position="(\d+)"', view)] == list(np.flatnonzero(differs))
    assert f"at layer {layer}" in view

    app.text_area(key="variants_text").set_value("<s>").run()  # BOS, and BOS typed: nothing to count
    assert any("only special tokens" in i.value for i in app.info) and not app.metric

    tiny_mixtral.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    app.text_area(key="variants_text").set_value(text).run()
    app.radio(key="variants_b").set_value("another local model or checkpoint").run()
    app.text_input(key="variants_b_source").set_value(str(tmp_path)).run()
    assert not app.exception, [e.message for e in app.exception]
    assert [e.value for e in app.error if "tokenizers split this text differently" in e.value]


# -- the command line --------------------------------------------------------------------------------


def test_cli_prints_the_summary_of_the_library_result(tmp_path, tiny_mixtral, tokenizer, capsys):
    tiny_mixtral.save_pretrained(tmp_path / "a")
    tokenizer.save_pretrained(tmp_path / "a")
    assert cli.main(["variants", TEXT, "--model", str(tmp_path / "a"), "--quantization-b", "none"]) == 0
    out = capsys.readouterr().out
    loaded = LoadedModel(model=tiny_mixtral, tokenizer=tokenizer, model_id="tiny", device="cpu")
    expected = cli.variants_summary(moeviz.compare_variants(loaded, loaded, TEXT), "a (full precision)",
                                    "a (full precision)")  # the model id: the folder's name
    assert out.strip() == expected
    assert "  layer 0   100.0%  100.0%" in out and "(B - A) +0.0000" in out

    other_tokenizer().save_pretrained(tmp_path / "b")
    tiny_mixtral.save_pretrained(tmp_path / "b")
    assert cli.main(["variants", TEXT, "--model", str(tmp_path / "a"), "--model-b", str(tmp_path / "b")]) == 1
    assert "tokenizers split this text differently" in capsys.readouterr().err

