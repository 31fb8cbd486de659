"""Routing policies against assignments computed by hand on small score matrices."""

import numpy as np
import pytest
from factories import make_trace

from moeviz.analysis import metrics, policies
from moeviz.model.capture import trace_text

# Six tokens, four experts; rows are router probabilities (each sums to 1). Expert 0 leads
# in four of six rows, so it overflows any capacity near the balanced share.
#            e0    e1    e2     e3
SKEWED = [
    [0.50, 0.25, 0.125, 0.125],  # t0  top-2: e0 e1
    [0.40, 0.10, 0.30, 0.20],    # t1         e0 e2
    [0.60, 0.20, 0.10, 0.10],    # t2         e0 e1
    [0.10, 0.20, 0.30, 0.40],    # t3         e3 e2
    [0.35, 0.05, 0.15, 0.45],    # t4         e3 e0
    [0.70, 0.05, 0.05, 0.20],    # t5         e0 e3
]


def _arrays(assignment):
    return assignment.expert_ids.tolist(), assignment.weights, assignment.dropped.tolist()


# -- top-k -------------------------------------------------------------------------------


def test_top_1_keeps_the_gate_probability_as_weight():
    ids, weights, dropped = _arrays(policies.top_k(SKEWED, 1))
    assert ids == [[0], [0], [0], [3], [3], [0]]
    # Switch: y = p_i(x) E_i(x), the first choice's probability itself
    np.testing.assert_allclose(weights[:, 0], [0.5, 0.4, 0.6, 0.4, 0.45, 0.7], rtol=1e-6)
    assert not np.any(dropped)


def test_top_2_renormalises_the_two_probabilities():
    assignment = policies.top_k(SKEWED, 2)
    assert assignment.expert_ids.tolist() == [[0, 1], [0, 2], [0, 1], [3, 2], [3, 0], [0, 3]]
    # g_i = p_i / (p_1 + p_2): .5/.75, .4/.7, .6/.8, .4/.7, .45/.8, .7/.9
    expected = [[2 / 3, 1 / 3], [4 / 7, 3 / 7], [3 / 4, 1 / 4], [4 / 7, 3 / 7], [9 / 16, 7 / 16], [7 / 9, 2 / 9]]
    np.testing.assert_allclose(assignment.weights, expected, rtol=1e-6)
    assert assignment.label == "top-2 (k = 2)"


def test_top_k_breaks_ties_towards_the_lower_expert():
    assert policies.top_k([[0.25, 0.25, 0.25, 0.25]], 2).expert_ids.tolist() == [[0, 1]]


# -- capacity ----------------------------------------------------------------------------


def test_capacity_of_1_drops_the_overflow_in_token_order():
    # C = ⌈0.5 · 1 · 6 / 4⌉ = 1 (no minimum). e0 queue t0 t1 t2 t5: keeps t0. e3 queue t3 t4: keeps t3.
    assignment = policies.top_k_capacity(SKEWED, 1, 0.5, min_capacity=1)
    assert assignment.capacity == 1
    assert assignment.dropped[:, 0].tolist() == [False, True, True, False, True, True]
    np.testing.assert_allclose(assignment.weights[:, 0], [0.5, 0, 0, 0.4, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(policies.expert_load(assignment), [1 / 6, 0, 0, 1 / 6])
    np.testing.assert_allclose(policies.dropped_load(assignment), [3 / 6, 0, 0, 1 / 6])
    assert policies.dropped_token_share(assignment) == pytest.approx(4 / 6)
    assert policies.unrouted_token_share(assignment) == pytest.approx(4 / 6)
    assert policies.experts_per_token(assignment).tolist() == [4, 2]


def test_capacity_in_score_order_keeps_the_most_confident_tokens():
    # Batch priority = highest probability: t5 .7, t2 .6, t0 .5, t4 .45, t1 .4, t3 .4 (ties
    # in token order). e0 queue t5 t2 t0 t1: keeps t5. e3 queue t4 t3: keeps t4.
    assignment = policies.top_k_capacity(SKEWED, 1, 0.5, order="score", min_capacity=1)
    assert assignment.dropped[:, 0].tolist() == [True, True, True, True, False, False]
    assert assignment.params == {"α": 0.5, "order": "score"}


@pytest.mark.parametrize(
    "order, dropped, load",
    [
        # C = ⌈1 · 2 · 6 / 4⌉ = 3 (no minimum); all first choices queue before any second choice.
        # slot 0 in token order: e0 gets t0 t1 t2 (full), t5 dropped; e3 gets t3 t4.
        # slot 1: e1 t0 t2, e2 t1 t3, e0 t4 dropped (full), e3 t5 (third place, kept).
        ("token", [[False, False], [False, False], [False, False], [False, False], [False, True], [True, False]],
         [3 / 6, 2 / 6, 2 / 6, 3 / 6]),
        # slot 0 in priority order t5 t2 t0 t4 t1 t3: e0 gets t5 t2 t0, t1 dropped; e3 t4 t3.
        # slot 1: e3 t5 (kept), e1 t2 t0, e0 t4 dropped, e2 t1 t3.
        ("score", [[False, False], [True, False], [False, False], [False, False], [False, True], [False, False]],
         [3 / 6, 2 / 6, 2 / 6, 3 / 6]),
    ],
)
def test_top_2_capacity_queues_first_choices_first(order, dropped, load):
    assignment = policies.top_k_capacity(SKEWED, 2, 1.0, order=order, min_capacity=1)
    assert assignment.capacity == 3
    assert assignment.dropped.tolist() == dropped
    np.testing.assert_allclose(policies.expert_load(assignment), load)
    assert policies.dropped_token_share(assignment) == pytest.approx(2 / 6)
    assert policies.unrouted_token_share(assignment) == 0


def test_a_dropped_assignment_leaves_the_other_weight_unchanged():
    # t1 in score order loses e0; its e2 weight stays 3/7 (GShard does not renormalise).
    weights = policies.top_k_capacity(SKEWED, 2, 1.0, order="score", min_capacity=1).weights
    np.testing.assert_allclose(weights[1], [0, 3 / 7], rtol=1e-6)


def test_capacity_defaults_to_deepspeed_sizing():
    # C = max(⌈1 · 1 · 6 / 4⌉, 4) = 4: e0's queue t0 t1 t2 t5 fits, nothing is dropped; the
    # papers' floor gave C = 1 and dropped 4 of 6 tokens.
    assignment = policies.top_k_capacity(SKEWED, 1, 1.0)
    assert assignment.capacity == 4 and not assignment.dropped.any()
    assert policies.sweep_capacity(policies.top_k(SKEWED, 2), 1.25) == 4  # ⌈3.75⌉ = 4
    assert policies.sweep_capacity(policies.top_k(SKEWED, 2), 2.0) == 6


def test_a_large_capacity_drops_nothing():
    assignment = policies.top_k_capacity(SKEWED, 2, 3.0)
    np.testing.assert_array_equal(assignment.expert_ids, policies.top_k(SKEWED, 2).expert_ids)
    assert not assignment.dropped.any()


def test_capacity_sweep_for_top_1_equals_metrics_dropped_token_share():
    # With one pick per token every queue order that keeps token order agrees with metrics.
    trace = make_trace([[[0], [0], [1], [0], [2], [0], [0], [3]]], num_experts=4)
    factors = [0.5, 1.0, 1.5, 2.0, 4.0]
    expected = [metrics.dropped_token_share(trace, alpha, min_capacity=1)[0] for alpha in factors]
    # C = ⌈α · 8 / 4⌉ = 1, 2, 3, 4, 8 (no minimum): e0 holds 5 tokens -> 4, 3, 2, 1, 0 dropped, e1-e3 hold 1
    np.testing.assert_allclose(expected, [4 / 8, 3 / 8, 2 / 8, 1 / 8, 0])
    sweep = policies.capacity_sweep(policies.model_routing(trace, 0), factors, min_capacity=1)
    np.testing.assert_allclose(sweep, expected)


# -- expert choice -----------------------------------------------------------------------


def test_expert_choice_gives_every_expert_exactly_c_tokens():
    # Top-2 tokens per expert column (ties to the earlier token):
    # e0 .7 t5, .6 t2;  e1 .25 t0, .2 t2 (t2 before t3);  e2 .3 t1, .3 t3;  e3 .45 t4, .4 t3.
    assignment = policies.expert_choice(SKEWED, 2)
    assert assignment.expert_ids.tolist() == [[1, -1], [2, -1], [0, 1], [3, 2], [3, -1], [0, -1]]
    np.testing.assert_allclose(
        assignment.weights, [[0.25, 0], [0.3, 0], [0.6, 0.2], [0.4, 0.3], [0.45, 0], [0.7, 0]], rtol=1e-6
    )
    np.testing.assert_allclose(policies.expert_load(assignment), [2 / 6] * 4)
    assert policies.load_cv(policies.expert_load(assignment)) == 0
    assert policies.experts_per_token(assignment).tolist() == [0, 4, 2]
    # Pairs shared with top-2: t0 e1, t1 e2, t2 e0 e1, t3 e3 e2, t4 e3, t5 e0 = 8 of 12
    assert policies.agreement(assignment, policies.top_k(SKEWED, 2)) == pytest.approx(8 / 12)


def test_expert_choice_leaves_some_tokens_without_an_expert():
    # C = 1: e0 t5, e1 t0, e2 t1 (tie with t3), e3 t4; t2 and t3 get none.
    assignment = policies.expert_choice(SKEWED, 1)
    assert assignment.expert_ids[:, 0].tolist() == [1, 2, -1, -1, 3, 0]
    assert policies.unrouted_token_share(assignment) == pytest.approx(2 / 6)
    assert policies.dropped_token_share(assignment) == 0


# -- hash routing ------------------------------------------------------------------------


def test_modulo_hash_ignores_the_scores():
    # Every score favours e0, yet expert = id mod 4: 0 1 2 5 7 10 -> 0 1 2 1 3 2.
    assignment = policies.hash_routing([0, 1, 2, 5, 7, 10], 4)
    assert assignment.expert_ids[:, 0].tolist() == [0, 1, 2, 1, 3, 2]
    assert assignment.weights.tolist() == [[1.0]] * 6
    assert policies.agreement(assignment, policies.top_k(np.tile([0.7, 0.1, 0.1, 0.1], (6, 1)), 1)) == pytest.approx(1 / 6)


def test_random_hash_is_splitmix64():
    # SplitMix64's first output from state 0 is 0xE220A8397B1DCDAF = 16294208416658607535,
    # whose last three digits are 535.
    assert policies.hash_routing([0], 1000, "random").expert_ids.tolist() == [[535]]


def test_random_hash_is_fixed_and_spreads_ids():
    ids = np.arange(4000)
    first = policies.hash_routing(ids, 4, "random").expert_ids[:, 0]
    np.testing.assert_array_equal(first, policies.hash_routing(ids, 4, "random").expert_ids[:, 0])
    assert (first != ids % 4).mean() > 0.5
    assert np.bincount(first, minlength=4).min() > 900  # about 1000 each


# -- bias balancing ----------------------------------------------------------------------


def test_bias_balancing_lowers_the_coefficient_of_variation():
    # Every token prefers e0 (.625 vs .375); k = 1, γ = .25, chunks of 2 tokens.
    # chunk 1: e0 e0, counts [2, 0], mean 1 -> b = [-.25, .25]; scores + b = [.375, .625]
    # chunk 2: e1 e1 -> b = [0, 0];  chunk 3: e0 e0 -> b = [-.25, .25].
    scores = np.tile([0.625, 0.375], (6, 1))
    balanced = policies.bias_balancing(scores, 1, 0.25, 2)
    assert balanced.expert_ids[:, 0].tolist() == [0, 0, 1, 1, 0, 0]
    np.testing.assert_allclose(balanced.bias, [-0.25, 0.25])
    # load [4/6, 2/6]: std 1/6 over mean 1/2 = 1/3; plain top-1 [1, 0]: std 1/2 over 1/2 = 1
    assert policies.load_cv(policies.expert_load(balanced)) == pytest.approx(1 / 3)
    assert policies.load_cv(policies.expert_load(policies.top_k(scores, 1))) == pytest.approx(1)


def test_bias_selects_but_does_not_weigh():
    # k = 2, γ = .25, one token per chunk, both tokens [.5, .3, .2].
    # t0: picks e0 e1; counts [1, 1, 0], mean 2/3 -> b = [-.25, -.25, .25]
    # t1: s + b = [.25, .05, .45] picks e2 and e0; weights from raw scores .5 and .2:
    #     5/7, 2/7 (the biased .25, .45 would give 5/14, 9/14); then b = [-.5, 0, 0].
    assignment = policies.bias_balancing([[0.5, 0.3, 0.2]] * 2, 2, 0.25, 1)
    assert assignment.expert_ids.tolist() == [[0, 1], [0, 2]]
    np.testing.assert_allclose(assignment.weights, [[5 / 8, 3 / 8], [5 / 7, 2 / 7]], rtol=1e-6)
    np.testing.assert_allclose(assignment.bias, [-0.5, 0, 0])


# -- comparison numbers ------------------------------------------------------------------


def test_balance_loss_counts_dropped_decisions():
    # Top-1 at C = 1 drops 4 tokens, but f counts decisions: f = [4/6, 0, 0, 2/6].
    # P = column means = [2.65, .85, 1.025, 1.475] / 6; E · Σ f·P = 4 · (10.6 + 2.95) / 36
    assignment = policies.top_k_capacity(SKEWED, 1, 0.5, min_capacity=1)
    assert policies.balance_loss(assignment, SKEWED) == pytest.approx(4 * (4 * 2.65 + 2 * 1.475) / 36)


def test_load_cv():
    assert policies.load_cv([1, 1, 1, 1]) == 0
    assert policies.load_cv([2, 0]) == pytest.approx(1)  # std 1, mean 1
    assert np.isnan(policies.load_cv([0, 0, 0]))


def test_model_routing_matches_metrics(tokenizer, tiny_mixtral):
    trace = trace_text(tiny_mixtral, tokenizer, "The quick brown fox jumps over the lazy dog.")
    for index, layer_id in enumerate(trace.layer_ids):
        model = policies.model_routing(trace, layer_id)
        np.testing.assert_allclose(policies.expert_load(model), metrics.expert_load(trace)[index])
        scores = policies.layer_scores(trace, layer_id)
        assert policies.balance_loss(model, scores) == pytest.approx(metrics.balance_loss(trace)[index], rel=1e-5)
        assert policies.agreement(model, model) == 1


@pytest.mark.parametrize("model_name", ["tiny_mixtral", "tiny_qwen2_moe"])
def test_top_k_with_the_model_k_is_the_model_selection(request, tokenizer, model_name):
    model = request.getfixturevalue(model_name)
    trace = trace_text(model, tokenizer, "def add(a, b):\n    return a + b\nWhat is 12 + 7? Answer: 19")
    for index, layer_id in enumerate(trace.layer_ids):
        replayed = policies.top_k(policies.layer_scores(trace, layer_id), trace.top_k)
        np.testing.assert_array_equal(replayed.expert_ids, trace.topk_ids[index])
        if model_name == "tiny_mixtral":  # Mixtral renormalises; Qwen2-MoE here does not
            np.testing.assert_allclose(replayed.weights, trace.topk_weights[index], rtol=1e-5)


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: policies.top_k(SKEWED, 0), "k must be between 1 and the 4 experts, got 0"),
        (lambda: policies.top_k(SKEWED, 5), "k must be between 1 and the 4 experts, got 5"),
        (lambda: policies.top_k([0.5, 0.5], 1), r"scores must be float\[tokens, experts\]"),
        (lambda: policies.top_k([[1.2, -0.3]], 1), "not logits"),
        (lambda: policies.top_k_capacity(SKEWED, 1, 0), "capacity_factor must be > 0"),
        (lambda: policies.top_k_capacity(SKEWED, 1, 1.0, order="random"), "order must be 'token' or 'score'"),
        (lambda: policies.expert_choice(SKEWED, 0), r"capacity C must be between 1 and the 6 tokens .*got 0"),
        (lambda: policies.expert_choice(SKEWED, 7), r"capacity C must be between 1 and the 6 tokens .*got 7"),
        (lambda: policies.hash_routing([1, 2], 4, "md5"), "method must be one of"),
        (lambda: policies.hash_routing([1, -2], 4), "non-negative integer ids"),
        (lambda: policies.bias_balancing(SKEWED, 2, 0, 2), "update_speed γ must be > 0"),
        (lambda: policies.bias_balancing(SKEWED, 2, 0.01, 0), "chunk_size must be at least 1"),
        (lambda: policies.limit_capacity(policies.top_k(SKEWED, 1), -1), "capacity must be >= 0"),
        (lambda: policies.limit_capacity(policies.top_k(SKEWED, 1), 1, [1.0]), r"priority must be float\[tokens\]"),
        (lambda: policies.balance_loss(policies.top_k(SKEWED, 1), [[0.5, 0.5]]), "scores has shape"),
        (lambda: policies.agreement(policies.top_k(SKEWED, 1), policies.top_k(SKEWED[:3], 1)), "different routings"),
    ],
)
def test_bad_parameters_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_an_empty_slot_cannot_carry_weight():
    with pytest.raises(ValueError, match="empty slot"):
        policies.Assignment("broken", 2, np.array([[-1]]), np.array([[0.5]]), np.array([[False]]))


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25, 2.0])
def test_metrics_capacity_drops_agree_with_the_policy_replay(capacity_factor):
    # The Analyse page's "dropped at 1.25" (metrics) and the Routing lab (policies) queue
    # assignments the same way: first choices of all tokens, then second choices.
    rng = np.random.default_rng(1)
    scores = rng.dirichlet(np.full(6, 0.3), size=40).astype(np.float32)
    real = policies.top_k(scores, 2)
    trace = make_trace(real.expert_ids[None], router_logits=np.log(scores)[None], topk_weights=real.weights[None])
    replay = policies.top_k_capacity(scores, 2, capacity_factor, order="token")
    assert metrics.dropped_token_share(trace, capacity_factor)[0] == pytest.approx(policies.dropped_token_share(replay))
