"""Routing metrics against values computed by hand on small traces."""

import math

import numpy as np
import pytest
from factories import make_trace

from moeviz.analysis import metrics

LN2, LN3 = math.log(2), math.log(3)

# Two layers, six tokens, four experts, top-2; slot 0 is the first choice.
#            t0      t1      t2      t3      t4      t5
SKEWED = [
    [[0, 1], [0, 2], [0, 1], [3, 0], [0, 3], [2, 1]],  # layer 0: expert 0 in 5 of 6 tokens
    [[1, 2], [2, 3], [3, 0], [0, 1], [1, 2], [2, 3]],  # layer 1
]


@pytest.fixture
def skewed():
    return make_trace(SKEWED, num_experts=4)


def one_token(logits, topk=(0, 1), scoring="softmax"):
    """One layer, one token, four experts, with the given router logits."""
    return make_trace([[list(topk)]], router_logits=[[logits]], scoring=scoring)


# -- load --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "choices, expected",
    [
        # layer 0 counts over both slots: e0 t0-t4 = 5, e1 t0,t2,t5 = 3, e2 t1,t5 = 2, e3 t3,t4 = 2
        # layer 1: e0 t2,t3 = 2, e1 t0,t3,t4 = 3, e2 t0,t1,t4,t5 = 4, e3 t1,t2,t5 = 3;  / 6 tokens
        (None, [[5 / 6, 3 / 6, 2 / 6, 2 / 6], [2 / 6, 3 / 6, 4 / 6, 3 / 6]]),
        (2, [[5 / 6, 3 / 6, 2 / 6, 2 / 6], [2 / 6, 3 / 6, 4 / 6, 3 / 6]]),
        # first choices: layer 0 = 0,0,0,3,0,2; layer 1 = 1,2,3,0,1,2
        (1, [[4 / 6, 0, 1 / 6, 1 / 6], [1 / 6, 2 / 6, 2 / 6, 1 / 6]]),
    ],
)
def test_expert_load(skewed, choices, expected):
    np.testing.assert_allclose(metrics.expert_load(skewed, choices), expected)


@pytest.mark.parametrize("choices, expected", [(None, 0.5), (2, 0.5), (1, 0.25)])  # choices / 4
def test_uniform_load(skewed, choices, expected):
    assert metrics.uniform_load(skewed, choices) == expected


@pytest.mark.parametrize("function", [metrics.expert_load, metrics.uniform_load])
@pytest.mark.parametrize("choices", [0, 3])
def test_choices_out_of_range(skewed, function, choices):
    with pytest.raises(ValueError, match="choices must be between 1 and top_k = 2"):
        function(skewed, choices)


def test_expert_load_needs_a_token():
    empty = make_trace(np.zeros((1, 0, 2)), num_experts=4)
    with pytest.raises(ValueError, match="need at least 1 token, this trace has 0"):
        metrics.expert_load(empty)


# -- router entropy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "logits, scoring, expected",
    [
        # uniform router: log2(4) = 2 bits
        ([0, 0, 0, 0], "softmax", 2.0),
        # sigmoid(0) = 1/2 each, normalised to 1/4 each: 2 bits
        ([0, 0, 0, 0], "sigmoid", 2.0),
        # softmax([ln2, 0, 0, -inf]) = [2, 1, 1, 0] / 4 = [1/2, 1/4, 1/4, 0]:
        # 1/2·1 + 1/4·2 + 1/4·2 + 0 = 1.5 bits
        ([LN2, 0, 0, -np.inf], "softmax", 1.5),
        # sigmoid(±ln3) = 3/4, 1/4 -> [3/4, 3/4, 1/4, 1/4] / 2 = [3/8, 3/8, 1/8, 1/8]:
        # 2·3/8·log2(8/3) + 2·1/8·3 = 3 - 3/4·log2(3) = 1.8112781 bits
        # (the raw scores would give 1.6226)
        ([LN3, LN3, -LN3, -LN3], "sigmoid", 1.8112781),
    ],
)
def test_router_entropy(logits, scoring, expected):
    entropy = metrics.router_entropy(one_token(logits, scoring=scoring))
    assert entropy.shape == (1, 1)
    assert entropy[0, 0] == pytest.approx(expected, abs=1e-6)


def test_router_entropy_of_a_uniform_router_is_log2_experts(skewed):
    # zero logits everywhere: every token of both layers has 2 bits = log2(4)
    np.testing.assert_allclose(metrics.router_entropy(skewed), np.full((2, 6), 2.0))


# -- balance loss ------------------------------------------------------------------------


def test_balance_loss_of_a_balanced_trace_is_k():
    # t0 picks {0, 1}, t1 picks {2, 3}: f = [1/2, 1/2, 1/2, 1/2] = k/E.
    # probs t0 = [.4, .4, .1, .1], t1 = [.1, .1, .4, .4]: P = [1/4, 1/4, 1/4, 1/4].
    # 4 · 4 · (1/2 · 1/4) = 2 = k
    logits = np.log([[[0.4, 0.4, 0.1, 0.1], [0.1, 0.1, 0.4, 0.4]]])
    trace = make_trace([[[0, 1], [2, 3]]], router_logits=logits)
    np.testing.assert_allclose(metrics.balance_loss(trace), [2.0], rtol=1e-6)


def test_balance_loss_of_a_uniform_router_is_k_whatever_the_load(skewed):
    # P_i = 1/4, so E · sum_i f_i · 1/E = sum_i f_i = k = 2 on both layers
    np.testing.assert_allclose(metrics.balance_loss(skewed), [2.0, 2.0], rtol=1e-6)


@pytest.mark.parametrize(
    "logits, scoring, expected",
    [
        # both tokens pick {0, 1}: f = [1, 1, 0, 0]; probs [1/2, 1/4, 1/4, 0] for both tokens.
        # 4 · (1 · 1/2 + 1 · 1/4) = 3
        ([LN2, 0, 0, -np.inf], "softmax", 3.0),
        # normalised sigmoid scores [3/8, 3/8, 1/8, 1/8]: 4 · (3/8 + 3/8) = 3 (raw scores: 6)
        ([LN3, LN3, -LN3, -LN3], "sigmoid", 3.0),
        # router sure of expert 0: P = [1, 0, 0, 0]: 4 · 1 = 4 = E, the maximum
        ([0, -np.inf, -np.inf, -np.inf], "softmax", 4.0),
    ],
)
def test_balance_loss_of_a_skewed_trace(logits, scoring, expected):
    trace = make_trace([[[0, 1], [0, 1]]], router_logits=[[logits, logits]], scoring=scoring)
    np.testing.assert_allclose(metrics.balance_loss(trace), [expected], rtol=1e-6)


# -- capacity ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, experts, k, capacity_factor, min_capacity, expected",
    [
        (6, 4, 2, 1.0, 1, 3),  # 1 · 2 · 6 / 4 = 3
        (6, 4, 2, 0.5, 1, 2),  # 0.5 · 12 / 4 = 1.5 -> 2
        (6, 4, 2, 1.25, 1, 4),  # 1.25 · 12 / 4 = 3.75 -> 4
        (10, 8, 1, 1.0, 1, 2),  # 10 / 8 = 1.25 -> 2
        (2048, 8, 2, 1.0, 4, 512),  # 4096 / 8
        (3, 8, 1, 1.0, 1, 1),  # 3 / 8 -> 1: rounding down gave 0, every assignment overflowed
        (6, 4, 2, 1.0, 4, 4),  # 3 is below DeepSpeed's minimum of 4
        (20, 256, 8, 1.25, 4, 4),  # issue 13: 1.25 · 8 · 20 / 256 = 0.78 -> 1 -> the minimum, 4
        (90, 3, 1, 1.1, 1, 33),  # 1.1 · 90 / 3 is 33.00000000000001 in floats: exactly 33
        (100, 4, 2, 1.15, 1, 58),  # 1.15 · 200 / 4 = 57.5 -> 58
    ],
)
def test_expert_capacity(tokens, experts, k, capacity_factor, min_capacity, expected):
    """DeepSpeed's `_capacity` (deepspeed/moe/sharded_moe.py): ceil(T / E · α · k), at least
    min_capacity (4 by default in deepspeed.moe.layer.MoE)."""
    assert metrics.expert_capacity(tokens, experts, k, capacity_factor, min_capacity) == expected


def test_expert_capacity_defaults_to_deepspeed_minimum_of_4():
    assert metrics.MIN_CAPACITY == 4
    assert metrics.expert_capacity(6, 4, 2, 1.0) == 4
    assert metrics.expert_capacity(2048, 8, 2, 1.25) == 640


def test_a_short_text_on_a_many_expert_model_drops_nothing_it_need_not():
    """Issue 13: 20 tokens on a 256-expert top-8 model. floor(1.25 · 8 · 20 / 256) = 0 showed
    every token dropped. With C = 4: when token t picks experts 8t .. 8t+7 (160 distinct
    experts, one assignment each) nothing is dropped; when every token picks experts 0..7, each
    of those experts receives 20 assignments, keeps t0..t3 and drops the other 16 tokens."""
    spread = make_trace([[list(range(8 * t, 8 * t + 8)) for t in range(20)]], num_experts=256)
    assert metrics.trace_capacity(spread, 1.25) == 4
    assert metrics.dropped_token_share(spread, 1.25).tolist() == [0.0]
    assert metrics.capacity_drops(spread, 1.25).sum() == 0
    crowded = make_trace([[list(range(8))] * 20], num_experts=256)
    np.testing.assert_allclose(metrics.dropped_token_share(crowded, 1.25), [16 / 20])
    np.testing.assert_array_equal(metrics.capacity_drops(crowded, 1.25)[0], [16] * 8 + [0] * 248)


@pytest.mark.parametrize("capacity_factor", [0, -1.0])
def test_expert_capacity_rejects_non_positive_factor(capacity_factor):
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        metrics.expert_capacity(6, 4, 2, capacity_factor)
    with pytest.raises(ValueError, match="min_capacity must be >= 0"):
        metrics.expert_capacity(6, 4, 2, 1.0, min_capacity=-1)


@pytest.mark.parametrize(
    "capacity_factor, drops, token_share",
    [
        # C = 3. Layer 0: expert 0 gets 5 -> 2 dropped, in queue order t0 t1 t2 | t3 t4,
        # so tokens t3, t4 lose one expert: 2/6. Layer 1: expert 2 gets 4 -> 1 dropped
        # (queue t0 t1 t4 | t5): 1/6.
        (1.0, [[2, 0, 0, 0], [0, 0, 1, 0]], [2 / 6, 1 / 6]),
        # C = ⌈0.25 · 12 / 4⌉ = 1: every expert keeps its first assignment. Drops = counts - 1.
        # First choices queue first. Layer 0 keeps e0 t0, e3 t3, e2 t5 (first choices), then
        # e1 t0 (second) -> only t0 keeps both: 5/6. Layer 1 keeps e1 t0, e2 t1, e3 t2, e0 t3,
        # all first choices, so every second choice is dropped: 6/6.
        (0.25, [[4, 2, 1, 1], [1, 2, 3, 2]], [5 / 6, 6 / 6]),
        # C = 6 >= every count: nothing dropped
        (2.0, [[0, 0, 0, 0], [0, 0, 0, 0]], [0, 0]),
    ],
)
def test_capacity_drops(skewed, capacity_factor, drops, token_share):
    # min_capacity 1: these small cases check the queue at C = 1 and 3, under DeepSpeed's minimum of 4.
    np.testing.assert_array_equal(metrics.capacity_drops(skewed, capacity_factor, min_capacity=1), drops)
    np.testing.assert_allclose(metrics.dropped_token_share(skewed, capacity_factor, min_capacity=1), token_share)


@pytest.mark.parametrize("function", [metrics.capacity_drops, metrics.dropped_token_share])
def test_capacity_functions_reject_non_positive_factor(skewed, function):
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        function(skewed, 0.0)


# -- repeat rates ------------------------------------------------------------------------


def test_repeat_rates(skewed):
    rates = metrics.repeat_rates(skewed)
    # Layer 0, pairs (t0,t1) (t1,t2) (t2,t3) (t3,t4) (t4,t5):
    #   same first:        0=0  0=0  0≠3  3≠0  0≠2          -> 2/5
    #   first in top-k:    0∈{0,1} 0∈{0,2} 3∉{0,1} 0∈{3,0} 2∉{0,3} -> 3/5
    #   any shared:        yes yes {0} {0,3} none            -> 4/5
    # Layer 1: first choices 1,2,3,0,1,2 never repeat -> 0, but each is in the previous
    #   token's top-2 ({1,2}∋2, {2,3}∋3, {3,0}∋0, {0,1}∋1, {1,2}∋2) -> 1, so shared -> 1.
    np.testing.assert_allclose(rates.same_first, [2 / 5, 0])
    np.testing.assert_allclose(rates.first_in_topk, [3 / 5, 1])
    np.testing.assert_allclose(rates.any_shared, [4 / 5, 1])


@pytest.mark.parametrize(
    "experts, k, same_first, first_in_topk, any_shared",
    [
        # E = 4, k = 2: 1/4, 2/4, 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6
        (4, 2, 1 / 4, 2 / 4, 5 / 6),
        # Mixtral, E = 8, k = 2: 1/8, 2/8, 1 - C(6,2)/C(8,2) = 1 - 15/28 = 13/28 ≈ 0.464
        (8, 2, 1 / 8, 2 / 8, 13 / 28),
        # top-1: all three are "same expert": 1/8, 1/8, 1 - C(7,1)/C(8,1) = 1/8
        (8, 1, 1 / 8, 1 / 8, 1 / 8),
    ],
)
def test_repeat_chance(experts, k, same_first, first_in_topk, any_shared):
    trace = make_trace(np.zeros((2, 3, k)) + np.arange(k), num_experts=experts)
    chance = metrics.repeat_chance(trace)
    np.testing.assert_allclose(chance.same_first, [same_first, same_first])
    np.testing.assert_allclose(chance.first_in_topk, [first_in_topk, first_in_topk])
    np.testing.assert_allclose(chance.any_shared, [any_shared, any_shared])


def test_marginal_repeat_chance(skewed):
    # first-choice shares q: layer 0 [4, 0, 1, 1] / 6 -> (16 + 0 + 1 + 1) / 36 = 1/2
    #                        layer 1 [1, 2, 2, 1] / 6 -> (1 + 4 + 4 + 1) / 36 = 5/18
    np.testing.assert_allclose(metrics.marginal_repeat_chance(skewed), [1 / 2, 5 / 18])


@pytest.mark.parametrize("function", [metrics.repeat_rates, metrics.marginal_repeat_chance])
def test_repeat_metrics_need_two_tokens(function):
    with pytest.raises(ValueError, match="need at least 2 tokens, this trace has 1"):
        function(make_trace([[[0, 1]]], num_experts=4))


# -- expert pairs ------------------------------------------------------------------------


def test_coactivation(skewed):
    # Layer 0 top-2 sets: {0,1} {0,2} {0,1} {0,3} {0,3} {1,2}
    # pairs: 0-1 twice, 0-2 once, 0-3 twice, 1-2 once; diagonal = counts 5, 3, 2, 2
    expected = [
        [5, 2, 1, 2],
        [2, 3, 1, 0],
        [1, 1, 2, 0],
        [2, 0, 0, 2],
    ]
    np.testing.assert_array_equal(metrics.coactivation(skewed, 0), expected)


def test_layer_transitions(skewed):
    # first choices, layer 0 -> layer 1: 0->1, 0->2, 0->3, 3->0, 0->1, 2->2
    expected = [
        [0, 2, 1, 1],
        [0, 0, 0, 0],
        [0, 0, 1, 0],
        [1, 0, 0, 0],
    ]
    np.testing.assert_array_equal(metrics.layer_transitions(skewed, 0, 1), expected)
    np.testing.assert_array_equal(metrics.layer_transitions(skewed, 1, 0), np.transpose(expected))
    # a layer to itself: first-choice counts 4, 0, 1, 1 on the diagonal
    np.testing.assert_array_equal(metrics.layer_transitions(skewed, 0, 0), np.diag([4, 0, 1, 1]))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda t: metrics.coactivation(t, 2), "layer_index 2"),
        (lambda t: metrics.coactivation(t, -1), "layer_index -1"),
        (lambda t: metrics.layer_transitions(t, 5, 0), "from_index 5"),
        (lambda t: metrics.layer_transitions(t, 0, 2), "to_index 2"),
    ],
)
def test_layer_index_out_of_range(skewed, call, name):
    with pytest.raises(ValueError, match=rf"{name} is out of range: .* 2 MoE layers, so use 0\.\.1"):
        call(skewed)


# -- Jensen-Shannon divergence -----------------------------------------------------------


@pytest.mark.parametrize(
    "p, q, expected",
    [
        ([0.2, 0.3, 0.5], [0.2, 0.3, 0.5], 0.0),  # identical
        ([1, 2, 3], [2, 4, 6], 0.0),  # identical once normalised
        ([1, 0], [0, 1], 1.0),  # disjoint: p/m = 2 where p > 0, so each KL = 1 bit
        ([2, 0, 0], [0, 3, 5], 1.0),  # disjoint, unnormalised
        # p = [1/2, 1/2], q = [1, 0], m = [3/4, 1/4]:
        # KL(p‖m) = 1/2·log2(2/3) + 1/2·log2(2) ; KL(q‖m) = log2(4/3)
        # JS = (3 - 3/2·log2 3) / 2 = 3/2 - 3/4·log2 3 = 0.3112781
        ([1, 1], [1, 0], 0.3112781),
    ],
)
def test_js_divergence(p, q, expected):
    assert metrics.js_divergence(p, q) == pytest.approx(expected, abs=1e-7)
    assert metrics.js_divergence(q, p) == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize(
    "p, q, message",
    [
        ([1, 0], [1, 0, 0], r"same shape, got \(2,\) and \(3,\)"),
        ([1, -1], [1, 0], "p has negative or non-finite entries"),
        ([1, 0], [np.nan, 1], "q has negative or non-finite entries"),
        ([0, 0], [1, 0], "p is all zeros"),
        ([1, 0], [0, 0], "q is all zeros"),
    ],
)
def test_js_divergence_rejects_bad_input(p, q, message):
    with pytest.raises(ValueError, match=message):
        metrics.js_divergence(p, q)


def test_load_js_matrix():
    # a and its double are identical (0); both are disjoint from b (1);
    # c = [1, 1] vs a = [1, 0] is the 0.3112781 computed above; c vs b the same by symmetry
    a, double_a, b, c = [1, 0], [2, 0], [0, 1], [1, 1]
    s = 0.3112781
    expected = [
        [0, 0, 1, s],
        [0, 0, 1, s],
        [1, 1, 0, s],
        [s, s, s, 0],
    ]
    np.testing.assert_allclose(metrics.load_js_matrix([a, double_a, b, c]), expected, atol=1e-7)


def test_load_js_matrix_of_layer_loads(skewed):
    # identical rows give 0; the two layers' loads differ, so the off-diagonal is positive
    load = metrics.expert_load(skewed)
    matrix = metrics.load_js_matrix([load[0], load[1], load[0]])
    assert matrix[0, 2] == matrix[2, 0] == 0
    assert matrix[0, 1] == matrix[1, 0] > 0


# -- invariants on a random trace --------------------------------------------------------


def switch_capacity_loop(topk_ids, num_experts, capacity):
    """The GShard capacity rule run as the plain loop it describes: every token's first choice
    in token order, then every second choice, ... Returns (drops int[layers, experts],
    dropped bool[layers, tokens])."""
    layers, tokens, k = topk_ids.shape
    drops = np.zeros((layers, num_experts), dtype=int)
    dropped = np.zeros((layers, tokens), dtype=bool)
    for layer in range(layers):
        kept = np.zeros(num_experts, dtype=int)
        for slot in range(k):
            for t in range(tokens):
                expert = topk_ids[layer, t, slot]
                if kept[expert] < capacity:
                    kept[expert] += 1
                else:
                    drops[layer, expert] += 1
                    dropped[layer, t] = True
    return drops, dropped


@pytest.fixture
def random_trace():
    rng = np.random.default_rng(0)
    layers, tokens, experts, k = 3, 200, 8, 3
    # skewed logits so that some experts overflow
    logits = rng.normal(size=(layers, tokens, experts)) + np.linspace(0, 2, experts)
    topk = np.argsort(-logits, axis=-1)[..., :k]
    return make_trace(topk, router_logits=logits, layer_ids=[1, 3, 5])


def test_invariants_on_a_random_trace(random_trace):
    trace = random_trace
    layers, tokens, experts, k = 3, trace.num_tokens, trace.num_experts, trace.top_k
    for choices in range(1, k + 1):
        np.testing.assert_allclose(metrics.expert_load(trace, choices).sum(axis=1), choices)
    load = metrics.expert_load(trace)
    for index in range(layers):
        pairs = metrics.coactivation(trace, index)
        np.testing.assert_array_equal(pairs, pairs.T)
        np.testing.assert_allclose(np.diag(pairs), load[index] * tokens)
        # each token adds k to the rows of its k experts (its own diagonal included)
        np.testing.assert_array_equal(pairs.sum(axis=1), k * np.diag(pairs))
        for other in range(layers):
            assert metrics.layer_transitions(trace, index, other).sum() == tokens
    entropy = metrics.router_entropy(trace)
    assert entropy.shape == (layers, tokens)
    assert (entropy >= 0).all() and (entropy <= math.log2(experts) + 1e-6).all()
    assert ((metrics.balance_loss(trace) > 0) & (metrics.balance_loss(trace) <= experts)).all()
    rates = metrics.repeat_rates(trace)
    assert (rates.same_first <= rates.first_in_topk).all()
    assert (rates.first_in_topk <= rates.any_shared).all()


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25, 2.0])
def test_capacity_matches_the_switch_loop(random_trace, capacity_factor):
    trace = random_trace
    capacity = metrics.expert_capacity(trace.num_tokens, trace.num_experts, trace.top_k, capacity_factor)
    drops, dropped = switch_capacity_loop(trace.topk_ids, trace.num_experts, capacity)
    np.testing.assert_array_equal(metrics.capacity_drops(trace, capacity_factor), drops)
    np.testing.assert_allclose(metrics.dropped_token_share(trace, capacity_factor), dropped.mean(axis=1))


# -- special tokens ----------------------------------------------------------------------

# One layer, top-1, three experts. Ids 0 (<s>) and 1 (</s>) are special; </s> sits mid-text.
#                 <s>  a    </s> b    c
WITH_SPECIALS = [[[0], [1], [0], [1], [2]]]


@pytest.fixture
def with_specials():
    return make_trace(WITH_SPECIALS, num_experts=3, tokens=["<s>", "a", "</s>", "b", "c"],
                      token_ids=[0, 5, 1, 6, 7], special_ids=[0, 1], generated_from=3)


def test_special_mask_comes_from_the_tokenizers_special_ids(with_specials):
    np.testing.assert_array_equal(with_specials.special, [True, False, True, False, False])
    np.testing.assert_array_equal(metrics.counted_tokens(with_specials), [False, True, False, True, True])
    assert metrics.counted_tokens(with_specials, include_special=True).all()


def test_counted_trace_leaves_special_tokens_out_of_load(with_specials):
    kept = metrics.counted(with_specials)
    assert kept.tokens == ["a", "b", "c"] and kept.token_ids == [5, 6, 7]
    assert kept.offsets == [with_specials.offsets[i] for i in (1, 3, 4)] and kept.text == with_specials.text
    assert kept.generated_from == 1 and kept.tokens[kept.generated_from] == "b"  # b was the first generated
    assert not kept.truncated
    # First choices of a, b, c: experts 1, 1, 2. With <s> and </s> (expert 0) counted: 2, 2, 1 of 5.
    np.testing.assert_allclose(metrics.expert_load(kept), [[0, 2 / 3, 1 / 3]])
    np.testing.assert_allclose(metrics.expert_load(metrics.counted(with_specials, True)), [[2 / 5, 2 / 5, 1 / 5]])


def test_counted_trace_drops_generated_marker_when_no_generated_token_is_left():
    trace = make_trace([[[0], [1], [0]]], token_ids=[5, 6, 1], special_ids=[1], generated_from=2)
    assert metrics.counted(trace).generated_from == -1 and not metrics.counted(trace).generated


def test_repeat_rates_never_pair_across_a_left_out_token(with_specials):
    # All 4 pairs: (<s>,a) 0/1, (a,</s>) 1/0, (</s>,b) 0/1, (b,c) 1/2: no repeat.
    np.testing.assert_allclose(metrics.repeat_rates(with_specials).same_first, [0.0])
    np.testing.assert_array_equal(metrics.counted_pairs(with_specials), [False, False, False, True])
    # Only (b, c) counts; bridging </s> would have added (a, b), both expert 1, and reported 50%.
    np.testing.assert_allclose(metrics.repeat_rates(with_specials, include_special=False).same_first, [0.0])
    np.testing.assert_allclose(metrics.repeat_rates(metrics.counted(with_specials)).same_first, [0.5])


def test_trace_without_special_ids_counts_every_token(skewed):
    assert not skewed.special.any() and metrics.counted(skewed) is skewed


def test_special_ids_survive_a_file_and_old_files_without_them_still_open(with_specials):
    import json

    import safetensors.numpy

    from moeviz.trace import RoutingTrace

    again = RoutingTrace.from_bytes(with_specials.to_bytes())
    assert again.special_ids == [0, 1]
    np.testing.assert_array_equal(again.special, with_specials.special)

    data = with_specials.to_bytes()
    meta = json.loads(json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])["__metadata__"]["fields"])
    del meta["special_ids"], meta["stop_reason"]  # as written before these fields existed
    old = safetensors.numpy.save({"topk_ids": with_specials.topk_ids, "topk_weights": with_specials.topk_weights,
                                  "router_logits": with_specials.router_logits},
                                 metadata={"format": "moeviz-trace", "version": "1", "fields": json.dumps(meta)})
    opened = RoutingTrace.from_bytes(old)
    assert opened.special_ids == [] and not opened.special.any() and opened.stop_reason == ""


# -- transition concentration ------------------------------------------------------------


def test_transition_concentration_by_hand():
    # Earlier expert 0 sends 3 tokens to 0 and 1 to 1; expert 1 sends 2 to 1: 5 of 6 follow
    # their expert's main path. The later layer's largest share is 3 / 6.
    assert metrics.transition_concentration([[3, 1], [0, 2]]) == pytest.approx((5 / 6, 1 / 2))
    # A permutation is fully concentrated, whatever the ids: ids are not compared.
    assert metrics.transition_concentration([[0, 2], [3, 0]]) == pytest.approx((1.0, 3 / 5))
    with pytest.raises(ValueError, match="non-empty"):
        metrics.transition_concentration([[0, 0], [0, 0]])
