"""The expert atlas against small hand-worked examples, and a run read out of core against
the same traces in memory."""

from __future__ import annotations

import json

import numpy as np
import pytest
from factories import make_trace

from moeviz.analysis import atlas
from moeviz.cli import main
from moeviz.model.loading import BUNDLED_MODEL
from moeviz.runs.corpus import Document, document_table, write_part
from moeviz.runs.store import RunManifest
from moeviz.trace import RoutingTrace
from moeviz.views import atlas_charts, charts

# Four tokens of one layer, 4 experts, top-2; token ids 0 ("a"), 1 ("b"), 0 ("a"), 3 ("c").
IDS = [[[0, 1], [0, 1], [2, 3], [0, 2]]]


def hand_trace(ids=IDS, tokens=("a", "b", "a", "c"), token_ids=(0, 1, 0, 3), **options) -> RoutingTrace:
    trace = make_trace(ids, num_experts=4, tokens=list(tokens), **options)
    return RoutingTrace(**{**trace.__dict__, "token_ids": list(token_ids)})


# -- per-layer balance -----------------------------------------------------------------------


def test_maxvio_cv_and_jain_of_a_hand_worked_load():
    """counts [6, 2, 2, 2]: mean 3, so MaxVio = (6 - 3) / 3 = 1 (arXiv 2408.15664: "(max_i Load_i
    - mean Load_i) / mean Load_i"); std = sqrt((9 + 1 + 1 + 1) / 4) = sqrt(3), CV = sqrt(3) / 3;
    Jain = (Σx)² / (n Σx²) = 144 / (4 · 48) = 0.75."""
    counts = np.array([6, 2, 2, 2])
    assert atlas.maxvio(counts) == pytest.approx(1.0)
    assert atlas.coefficient_of_variation(counts) == pytest.approx(np.sqrt(3) / 3)
    assert atlas.jain_index(counts) == pytest.approx(0.75)
    assert atlas.jain_index([5, 5, 5, 5]) == pytest.approx(1.0)
    assert atlas.jain_index([8, 0, 0, 0]) == pytest.approx(0.25)  # 1/n: one expert takes all
    assert atlas.maxvio([8, 0, 0, 0]) == pytest.approx(3.0)  # E - 1


def test_dead_experts_are_below_one_percent_of_the_uniform_load():
    """800 assignments over 4 experts: uniform 200, 1% of it 2; counts 1 and 0 are dead, 2 is not."""
    assert atlas.dead_experts([399, 398, 2, 1]) == [3]
    assert atlas.dead_experts([400, 399, 1, 0]) == [2, 3]


# -- OLMoE Eq. 6, 7, 8 -------------------------------------------------------------------------


def test_coactivation_is_eq6_and_asymmetric():
    """OLMoE Eq. 6: N_{Ei,Ej} / N_{Ei}. Tokens {0,1} {0,1} {2,3} {0,2}: N_0 = 3, N_1 = 2, N_2 = 2,
    N_3 = 1; together (0,1) = 2, (0,2) = 1, (2,3) = 1. So 0 -> 1 is 2/3 but 1 -> 0 is 2/2."""
    layer = atlas.trace_atlas({"x": hand_trace()}).layers[0]
    np.testing.assert_array_equal(layer.counts, [3, 2, 2, 1])
    expected = np.array([[0, 2 / 3, 1 / 3, 0], [1, 0, 0, 0], [1 / 2, 0, 0, 1 / 2], [0, 0, 1, 0]])
    np.testing.assert_allclose(layer.coactivation, expected)
    assert layer.experts[0].partners == [(1, pytest.approx(2 / 3)), (2, pytest.approx(1 / 3))]


def test_domain_share_is_eq7():
    """OLMoE Eq. 7: N_{Ei,D} / N_D. Domain "code" (the four tokens above) sends 3 of its 4 tokens
    to expert 0; domain "prose" (two tokens, {1,2} {1,3}) sends none to expert 0 and 2 of 2 to 1."""
    prose = hand_trace([[[1, 2], [1, 3]]], tokens=("d", "e"), token_ids=(5, 6))
    result = atlas.trace_atlas({"code": hand_trace(), "prose": prose})
    cards = result.layers[0].experts
    assert result.domains == {"code": 4, "prose": 2}
    assert cards[0].domain_share == {"code": 0.75, "prose": 0.0}
    assert cards[1].domain_share == {"code": 0.5, "prose": 1.0}
    assert cards[3].domain_share == {"code": 0.25, "prose": 0.5}
    np.testing.assert_allclose(atlas.domain_specialization([[3, 0]], [4, 2]), [[0.75, 0.0]])


def test_top_tokens_are_eq8_sorted_by_count_then_id():
    """OLMoE Eq. 8: N_{x,Ei} / N_x. Token id 0 ("a") occurs twice: expert 0 takes one of them
    (share 1/2), expert 2 the other; id 1 once, to experts 0 and 1."""
    cards = atlas.trace_atlas({"x": hand_trace()}).layers[0].experts
    assert [(t.token_id, t.token, t.count, t.share) for t in cards[0].top_tokens] == [
        (0, "a", 1, 0.5), (1, "b", 1, 1.0), (3, "c", 1, 1.0)]
    assert [(t.token_id, t.count, t.share) for t in cards[2].top_tokens] == [(0, 1, 0.5), (3, 1, 1.0)]
    assert atlas.vocabulary_specialization(1, 2) == 0.5


# -- local routing consistency (arXiv 2505.16056) --------------------------------------------------


def test_srp_of_hand_worked_segments():
    """n = 2: segments (t0 t1) (t1 t2) (t2 t3) count experts [2,2,0,0] [1,1,1,1] [1,0,2,1]; hist =
    [3, 6, 3], acts 12. j=0: 2·12 / (24 + 12) = 2/3; j=1: 2·12 / (18 + 12) = 0.8; j=2: 2·6 /
    (6 + 12) = 2/3; SRP = 0.8. n = 4: one segment [3,2,2,1]: best j = 2, 2·7 / (12 + 8) = 0.7."""
    stretch = atlas.stretches(np.ones(4, dtype=bool))
    windows = atlas.window_counts(np.array(IDS[0]), stretch, 2, 4)
    np.testing.assert_array_equal(windows.T, [[2, 2, 0, 0], [1, 1, 1, 1], [1, 0, 2, 1]])
    np.testing.assert_array_equal(atlas.segment_match_counts(windows, 2), [3, 6, 3])
    assert atlas.srp([3, 6, 3], 2) == pytest.approx(0.8)
    assert atlas.srp([0, 1, 2, 1, 0], 4) == pytest.approx(0.7)
    segments = atlas.trace_atlas({"x": hand_trace()}).segments
    np.testing.assert_allclose(segments.srp[0, :2], [0.8, 0.7])
    np.testing.assert_array_equal(segments.segments[0], [3, 1, 0, 0, 0, 0])
    assert np.isnan(segments.srp[0, 2])  # no segment of 8 tokens


def test_sch_of_hand_worked_segments():
    """Cache of m = 1 expert: n = 2, the segments' largest counts 2 + 1 + 2 = 5 of k·n·3 = 12
    activations; n = 4: 3 of 8."""
    segments = atlas.trace_atlas({"x": hand_trace()}, cache_size=1).segments
    np.testing.assert_allclose(segments.sch[0, :2], [5 / 12, 3 / 8])
    assert atlas.sch(5, 3, 2, 2) == pytest.approx(5 / 12)


def test_chance_levels_of_uniform_routing():
    """E = 4, k = 2, n = 2: an expert's count is Binomial(2, 1/2), hist ∝ [1/4, 1/2, 1/4]; the
    best threshold j = 1 gives 2·1 / (1.5 + 1) = 0.8. A cache as large as all experts hits all."""
    assert atlas.srp_chance(4, 2, 2) == pytest.approx(0.8)
    assert atlas.sch_chance(4, 2, 8, 4) == pytest.approx(1.0)
    assert 2 / 8 < atlas.sch_chance(8, 2, 64, 2) < 0.5  # 2 of 8 experts hold a bit over their 1/4


def test_sorting_network_matches_a_sort():
    rng = np.random.default_rng(0)
    for experts in (3, 8, 13, 64, 70):
        windows = rng.integers(0, 9, (experts, 300)).astype(np.int8)
        for cache in (1, 2, experts - 1):
            assert atlas.sch_hits(windows, cache) == np.sort(windows, axis=0)[-cache:].sum()


def test_segments_stay_within_stretches():
    """An excluded token (False) and a break split the tokens: segments never straddle them."""
    stretch = atlas.stretches(np.array([True, True, False, True, True, True]), np.array([0, 0, 0, 0, 0, 1], bool))
    np.testing.assert_array_equal(stretch, [0, 0, -1, 1, 1, 2])
    ids = np.array([[0, 1]] * 6)
    assert atlas.window_counts(ids, stretch, 2, 4).shape == (4, 2)  # (t0 t1) and (t3 t4) only


# -- which tokens count ----------------------------------------------------------------------------


def test_masked_and_phase_tokens_are_left_out():
    trace = hand_trace()
    masked = atlas.trace_atlas({"x": trace}, counted={"x": np.array([False, True, True, True])})
    np.testing.assert_array_equal(masked.layers[0].counts, [2, 1, 2, 1])
    assert masked.excluded_tokens == 1
    generated = RoutingTrace(**{**trace.__dict__, "generated_from": 2})
    only = atlas.trace_atlas({"x": generated}, phase="generated")
    np.testing.assert_array_equal(only.layers[0].counts, [1, 0, 2, 1])
    assert only.has_generated and only.layers[0].tokens == 2
    prompt = atlas.trace_atlas({"x": generated}, phase="prefill")
    np.testing.assert_array_equal(prompt.segments.segments[0], [1, 0, 0, 0, 0, 0])  # t0 t1 only


def test_special_token_ids_of_the_bundled_tokenizer():
    assert atlas.special_token_ids(BUNDLED_MODEL) == {0, 1, 2, 3}  # <s> </s> <unk> <pad>
    assert atlas.special_token_ids(BUNDLED_MODEL / "no-such-folder") == frozenset()


def test_traces_of_two_models_are_refused():
    other = make_trace([[[0, 1]]], num_experts=6)
    with pytest.raises(ValueError, match="another model"):
        atlas.trace_atlas({"x": hand_trace(), "y": other})


# -- runs, out of core -------------------------------------------------------------------------------


def write_run(folder, traces: dict[str, RoutingTrace], domain_of: dict[str, str]):
    first = next(iter(traces.values()))
    manifest = RunManifest(first.model_id, first.model_type, first.num_experts, first.top_k, first.num_layers,
                           first.layer_ids, first.scoring, first.router_class, 0, 0, "float32", "none", 64)
    folder.mkdir()
    (folder / "run.json").write_text(manifest.to_json(), encoding="utf-8")
    for number, (name, trace) in enumerate(traces.items()):
        write_part(folder / f"part-{number:05d}.parquet", document_table(Document(name, domain_of[name], ""), trace))
    return folder


def test_a_run_gives_the_atlas_of_its_traces(tmp_path):
    rng = np.random.default_rng(0)
    traces = {}
    for name, length in (("a", 40), ("b", 75)):
        ids = np.stack([rng.permutation(6)[:2] for _ in range(2 * length)]).reshape(2, length, 2)
        trace = make_trace(ids, num_experts=6, topk_weights=rng.random((2, length, 2)), layer_ids=[1, 3])
        traces[name] = RoutingTrace(**{**trace.__dict__, "token_ids": list(rng.integers(0, 9, length))})
    domain_of = {"a": "code", "b": "prose"}
    run = write_run(tmp_path / "run", traces, domain_of)
    excluded = frozenset({0})
    ours = atlas.run_atlas(run, excluded_token_ids=excluded)
    reference = atlas.trace_atlas(traces, domain_of, counted={n: atlas.counted_mask(t, excluded) for n, t in traces.items()})
    assert ours.layer_ids == [1, 3] and ours.score_kind == "mixing weight"
    assert ours.domains == reference.domains and ours.excluded_tokens == reference.excluded_tokens > 0
    for mine, theirs in zip(ours.layers, reference.layers):
        np.testing.assert_array_equal(mine.counts, theirs.counts)
        np.testing.assert_allclose(mine.coactivation, theirs.coactivation)
        assert [c.top_tokens for c in mine.experts] == [c.top_tokens for c in theirs.experts]
        assert [c.domain_share for c in mine.experts] == [c.domain_share for c in theirs.experts]
    np.testing.assert_allclose(ours.segments.srp, reference.segments.srp, equal_nan=True)
    np.testing.assert_allclose(ours.segments.sch, reference.segments.sch, equal_nan=True)
    best = ours.layers[0].experts[0].contexts[0]
    assert best.tokens[best.focus] == traces[best.doc].tokens[best.position]


def test_cli_prints_the_atlas_as_json(tmp_path, capsys):
    """code.safetensors: ids 4 5 4 6 as above; prose.safetensors: ids 4 5 with {1,2} {1,3}. Expert 0
    takes 3 of the 12 assignments; of its tokens (ids 4, 5, 6, once each) id 4 comes first, and it
    has 1 of id 4's 3 occurrences (Eq. 8)."""
    files = []
    for name, ids in (("code", IDS), ("prose", [[[1, 2], [1, 3]]])):
        files.append(str(hand_trace(ids, tokens=("a", "b", "a", "c")[: len(ids[0])],
                                    token_ids=(4, 5, 4, 6)[: len(ids[0])]).save(tmp_path / f"{name}.safetensors")))
    assert main(["atlas", *files, "--json", "--top", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    layer = result["layers"][0]
    assert layer["layer"] == 0 and layer["dead_experts"] == []
    assert layer["maxvio"] == pytest.approx(atlas.maxvio([3, 4, 3, 2]))  # 12 assignments, mean 3
    first = layer["experts"][0]
    assert first == {"expert": 0, "load_share": 0.25, "top_tokens": [{"token_id": 4, "token": "a", "count": 1,
                     "share": 1 / 3}], "domain_share": {"code": 0.75, "prose": 0.0}}


def test_cli_refuses_a_run_and_trace_files_together(tmp_path, capsys):
    trace_file = hand_trace().save(tmp_path / "x.safetensors")
    assert main(["atlas", str(tmp_path), str(trace_file)]) == 2
    assert "not both" in capsys.readouterr().err


# -- figures ---------------------------------------------------------------------------------------


def test_charts_plot_the_atlas_values():
    result = atlas.trace_atlas({"x": hand_trace(tokens=("<s>", "b", "<s>", "c"))})
    card = result.layers[0].experts[0]
    figure = atlas_charts.top_tokens_chart(card, 0.5)
    assert list(figure.data[0].x) == [0.5, 1.0, 1.0]
    table = charts.figure_table(figure)
    assert table.token.tolist() == ["<s>", "b", "c"] and "series" not in table  # the chance line is no series
    assert (table["chance k/E"] == 0.5).all()
    srp = atlas_charts.segment_chart(result.segments, ["layer 0"], "srp")
    assert srp.data[0].y[:2] == (0.8, 0.7) and srp.data[-1].name == "chance"
    assert atlas_charts.expert_table(result.layers[0], 0.5)["load share"].tolist() == [0.375, 0.25, 0.25, 0.125]


def test_context_html_escapes_token_text():
    context = atlas.Context("doc <1>", 1, 0.9, ["<script>", "alert(1)", "</script>"], 1)
    markup = atlas_charts.context_html(context)
    assert "<script>" not in markup and "&lt;script&gt;" in markup
    assert '<mark class="moeviz-focus" style="background:#ffd54f;padding:0 2px">alert(1)</mark>' in markup
