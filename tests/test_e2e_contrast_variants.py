"""The Contrast and Compare variants pages in a real browser: the values they plot are the
library's (`moeviz.analysis.contrast`, `moeviz.intervene`, `moeviz.compare_variants`)."""

from __future__ import annotations

import numpy as np
import pytest
from test_e2e_browser import app_limit, browser, expected_trace, model, server, tab  # noqa: F401 (fixtures)

import moeviz
from moeviz.analysis import contrast
from moeviz.model.interventions import Intervention
from moeviz.model.loading import load_model
from moeviz.ui import default_model_source, presets

pytestmark = pytest.mark.e2e


def test_contrast_page_plots_the_risk_differences_and_the_effect_of_one_click(tab, model):  # noqa: F811
    tab.open("contrast")
    traces = [[expected_trace(model, presets()[name]) for name in names] for names in (["python", "c"],
                                                                                        ["english", "german"])]
    expected = contrast.contrast(*traces)
    figures = tab.figures()
    (heatmap,) = figures["contrast_heatmap"]
    np.testing.assert_allclose(np.asarray(heatmap["z"], dtype=float).reshape(expected.risk_difference.shape),
                               expected.risk_difference, atol=1e-12)
    (top,) = figures["contrast_top"]
    ranking = expected.ranking().head(12)
    np.testing.assert_allclose(np.asarray(top["y"], dtype=float), ranking["risk_difference"], atol=1e-12)
    np.testing.assert_allclose(np.asarray(top["error_y"]["array"], dtype=float),
                               ranking["ci_high"] - ranking["risk_difference"], atol=1e-12)

    tab.act(lambda: tab.page.locator(".st-key-contrast_ablate button").click())
    ablate = contrast.top_experts(expected, 3, "A", per_layer=expected.num_experts - expected.top_k)
    assert tab.subheaders()[-1] == Intervention(ablate=ablate).describe()
    means = []
    for names in (["python", "c"], ["english", "german"]):
        results = [moeviz.intervene(model, presets()[n], ablate=ablate, max_tokens=app_limit(model)) for n in names]
        means.append(contrast.set_effect([r.baseline_logprobs for r in results],
                                         [r.changed_logprobs for r in results]).mean_delta_logprob)
    (bars,) = tab.figures()["contrast_effect"]
    assert list(bars["x"]) == ["Set A", "Set B"]
    np.testing.assert_allclose(np.asarray(bars["y"], dtype=float), means, atol=1e-9)
    assert means[0] < means[1]  # the experts set A uses more matter more to set A
    tab.screenshot("contrast")


def test_compare_variants_page_plots_the_agreement_of_full_precision_and_nf4(tab, model):  # noqa: F811
    tab.open("compare_variants")
    nf4 = load_model(default_model_source(), quantization="nf4")
    expected = moeviz.compare_variants(model, nf4, presets()["english"], max_tokens=app_limit(model))
    figures = tab.figures()
    first, overlap = figures["variants_agreement"]
    np.testing.assert_allclose(np.asarray(first["y"], dtype=float), expected.first_choice_agreement, atol=1e-12)
    np.testing.assert_allclose(np.asarray(overlap["y"], dtype=float), expected.topk_overlap, atol=1e-12)
    (delta,) = figures["variants_delta"]
    np.testing.assert_allclose(np.asarray(delta["y"], dtype=float), expected.delta_logprobs, atol=1e-5)
    layer = expected.a.layer_ids[0]
    differs = np.flatnonzero(expected.first_choice_differs[0] & expected.counted)
    shown = tab.page.locator(".moeviz-differs").evaluate_all("spans => spans.map(s => +s.dataset.position)")
    assert shown == differs.tolist()
    assert f"at layer {layer}" in tab.page.locator(".moeviz-legend").inner_text()
    tab.screenshot("compare-variants")
