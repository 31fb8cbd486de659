"""Interventions re-run the model: each against the plain model, a reference that uses the
family's own router code, or a selection worked out by hand, on tiny random models of every
family in tests/test_families.py.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_families import (
    FAMILIES,
    TEXT,
    applied_weights,
    build,
    trace_weights,
    traced_with_experts_inputs,
)

from moeviz.model.capture import find_routers, trace_text
from moeviz.analysis.metrics import expert_capacity
from moeviz.analysis import policies
from moeviz.model.interventions import (
    Intervention,
    POLICIES,
    InterventionRefused,
    RoutingPolicy,
    intervening,
    run_intervention,
)

TRACE_ARRAYS = ("topk_ids", "topk_weights", "router_logits")


def plain_logits(model, tokenizer, text: str = TEXT) -> torch.Tensor:
    """The model's logits from one ordinary forward pass, without moeviz."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    inputs = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.cat([torch.tensor([[getattr(model.config, "decoder_start_token_id", None) or model.config.pad_token_id]]), ids], 1)
    with torch.inference_mode():
        return model(**inputs, use_cache=False).logits


def traced(model, tokenizer, intervention: Intervention):
    """(trace, output logits) of TEXT with the intervention."""
    with intervening(model, intervention) as call:
        trace = trace_text(model, tokenizer, TEXT, all_logits=True)
    return trace, call.output_logits


def own_k(model) -> int:
    site = find_routers(model)[0]
    return getattr(site.module, "top_k", None) or getattr(site.block, "top_k", None) or 1


# -- nothing changed ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_no_intervention_is_the_plain_model(name, tokenizer):
    model = build(name)
    result = run_intervention(model, tokenizer, TEXT, Intervention())
    plain = trace_text(model, tokenizer, TEXT)
    for trace in (result.baseline, result.changed):
        for array in TRACE_ARRAYS:
            np.testing.assert_array_equal(getattr(trace, array), getattr(plain, array))
    logits = plain_logits(model, tokenizer)
    _, got = traced(model, tokenizer, Intervention())
    assert torch.equal(got, logits)
    # Log-probability of each actual next token, read from the plain logits.
    ids = tokenizer(TEXT)["input_ids"]
    start = 1 if model.config.is_encoder_decoder else 0
    expected = torch.log_softmax(logits[0, start:start + len(ids) - 1], -1)[torch.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_array_equal(result.baseline_logprobs, expected.numpy())
    np.testing.assert_array_equal(result.changed_logprobs, result.baseline_logprobs)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_rerouting_with_the_models_own_k_is_bitwise_the_router(name, tokenizer):
    """Re-running each family's selection with nothing changed gives exactly the router's own
    output: the re-implementation in REROUTES is the router's arithmetic."""
    model = build(name)
    layer_ids = [site.layer_id for site in find_routers(model)]
    trace, logits = traced(model, tokenizer, Intervention(top_k=dict.fromkeys(layer_ids, own_k(model))))
    plain = trace_text(model, tokenizer, TEXT)
    for array in TRACE_ARRAYS:
        np.testing.assert_array_equal(getattr(trace, array), getattr(plain, array))
    assert torch.equal(logits, plain_logits(model, tokenizer))


# -- ablation against the family's own code with one logit at -inf ----------------------------


@contextmanager
def logit_at_minus_infinity(router, expert: int):
    """The router's own forward, with `expert`'s logit set to -inf as it leaves F.linear: the
    reference for an ablation, computed by the family's own code (softmax, top-k, norm)."""
    module = __import__(type(router).__module__, fromlist=["F"])
    original = module.F

    class Patched:
        def __getattr__(self, name):
            return getattr(original, name)

        @staticmethod
        def linear(x, weight, *args):
            out = F.linear(x, weight, *args)
            return out.index_fill(-1, torch.tensor([expert]), float("-inf")) if weight is router.weight else out

    module.F = Patched()
    try:
        yield
    finally:
        module.F = original


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe"])
def test_ablation_equals_the_router_with_that_logit_at_minus_infinity(name, tokenizer):
    model = build(name)
    sites = find_routers(model)
    site = sites[1]  # a later MoE layer, so that earlier ones must stay unchanged
    baseline = trace_text(model, tokenizer, TEXT)
    index = baseline.layer_ids.index(site.layer_id)
    expert = int(np.bincount(baseline.first_choice[index]).argmax())  # the busiest: the change is real

    result = run_intervention(model, tokenizer, TEXT, Intervention(ablate={site.layer_id: [expert]}))
    with logit_at_minus_infinity(site.module, expert):
        reference = trace_text(model, tokenizer, TEXT)
        reference_logits = plain_logits(model, tokenizer)
    _, logits = traced(model, tokenizer, Intervention(ablate={site.layer_id: [expert]}))

    assert torch.equal(logits, reference_logits)
    changed = result.changed
    np.testing.assert_array_equal(changed.topk_ids, reference.topk_ids)
    np.testing.assert_array_equal(changed.topk_weights, reference.topk_weights)
    assert expert not in changed.topk_ids[index]
    assert expert in baseline.topk_ids[index]
    for array in TRACE_ARRAYS:  # layers before L, and L's own logits, are untouched
        np.testing.assert_array_equal(getattr(changed, array)[:index], getattr(baseline, array)[:index])
    np.testing.assert_array_equal(changed.router_logits[index], baseline.router_logits[index])
    assert (changed.topk_ids[index + 1:] != baseline.topk_ids[index + 1:]).any() or index + 1 == len(sites)
    assert not np.array_equal(result.changed_logprobs, result.baseline_logprobs)


def test_qwen2_ablation_renormalises_through_the_softmax(tokenizer):
    """Qwen2-MoE with norm_topk_prob=False weights a pick by its softmax probability over all
    experts: with one expert ablated the others' probabilities grow by 1 / (1 - p_e)."""
    model = build("qwen2_moe")
    layer = find_routers(model)[0].layer_id
    baseline = trace_text(model, tokenizer, TEXT)
    probs = torch.softmax(torch.from_numpy(baseline.router_logits[0]).double(), -1)
    expert = int(baseline.topk_ids[0, 0, 0])
    changed = run_intervention(model, tokenizer, TEXT, Intervention(ablate={layer: [expert]})).changed
    renormalised = probs / (1 - probs[:, expert:expert + 1])
    expected = np.take_along_axis(renormalised.numpy(), changed.topk_ids[0].astype(np.int64), -1)
    np.testing.assert_allclose(changed.topk_weights[0], expected, rtol=1e-5)


# -- forcing, k and capacity against selections worked out by hand -----------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_mixtral_forced_expert_takes_a_slot_and_the_best_other_the_rest(tokenizer):
    """Mixtral, k = 2, expert 4 forced at layer 0: every token takes 4 and its best other
    expert, weighted by their softmax probabilities renormalised over the two."""
    model = build("mixtral")
    changed = run_intervention(model, tokenizer, TEXT, Intervention(force={0: [4]})).changed
    probs = softmax(changed.router_logits[0])
    others = probs.copy()
    others[:, 4] = -1
    best = others.argmax(-1)
    expected = np.stack([probs[:, 4], probs[np.arange(len(best)), best]], -1)
    expected /= expected.sum(-1, keepdims=True)
    got = dict_of(changed, 0)
    assert all(4 in picks for picks in got)
    for token, picks in enumerate(got):
        assert picks == pytest.approx({4: expected[token, 0], int(best[token]): expected[token, 1]}, rel=1e-5)


def dict_of(trace, index: int) -> list[dict[int, float]]:
    return [dict(zip(map(int, ids), map(float, weights)))
            for ids, weights in zip(trace.topk_ids[index], trace.topk_weights[index])]


def test_forcing_onto_one_expert_with_k_1(tokenizer):
    """chuk-mlx's "all routing to one expert": force 2 and k = 1; Mixtral renormalises a
    single pick to weight 1."""
    model = build("mixtral")
    changed = run_intervention(model, tokenizer, TEXT, Intervention(force={1: [2]}, top_k=1)).changed
    assert changed.top_k == 1
    assert (changed.topk_ids[1] == 2).all() and (changed.topk_weights[1] == 1).all()
    np.testing.assert_array_equal(changed.topk_ids[0, :, 0], changed.router_logits[0].argmax(-1))


def test_mixtral_k_3_is_the_top_3_renormalised(tokenizer):
    model = build("mixtral")
    changed = run_intervention(model, tokenizer, TEXT, Intervention(top_k=3)).changed
    for index in range(len(changed.layer_ids)):
        probs = softmax(changed.router_logits[index])
        top = np.sort(probs, -1)[:, ::-1][:, :3]
        np.testing.assert_allclose(changed.topk_weights[index], top / top.sum(-1, keepdims=True), rtol=1e-5)
        np.testing.assert_array_equal(np.sort(changed.topk_ids[index], -1),
                                      np.sort(np.argsort(-probs, -1)[:, :3], -1))


def test_k_at_one_layer_only_pads_the_others_with_weight_zero(tokenizer):
    """k = 3 at layer 1 only: layers 0 and 2 keep their own top-2 (same output as the plain
    model up to layer 1) and show a third slot of weight 0."""
    model = build("mixtral")
    baseline = trace_text(model, tokenizer, TEXT)
    changed = run_intervention(model, tokenizer, TEXT, Intervention(top_k={1: 3})).changed
    assert changed.top_k == 3
    np.testing.assert_array_equal(changed.topk_ids[0, :, :2], baseline.topk_ids[0])
    np.testing.assert_array_equal(changed.topk_weights[0, :, :2], baseline.topk_weights[0])
    assert (changed.topk_weights[[0, 2], :, 2] == 0).all() and (changed.topk_weights[1, :, 2] > 0).all()


def test_deepseek_v3_forced_expert_joins_the_groups_choice(tokenizer):
    """DeepSeek-V3 (16 experts, 4 groups, 2 groups kept, k = 4, bias-free choice here): expert 0
    forced; the other 3 are the best by sigmoid score within the 2 best groups (top-2 sums) of
    the remaining experts; weights = sigmoid scores / their sum × 2.5."""
    model = build("deepseek_v3")
    changed = run_intervention(model, tokenizer, TEXT, Intervention(force={1: [0]})).changed
    scores = 1 / (1 + np.exp(-changed.router_logits[0].astype(np.float64)))
    for token in range(changed.num_tokens):
        choice = scores[token].copy()
        choice[0] = -np.inf
        groups = np.sort(choice.reshape(4, 4), -1)[:, -2:].sum(-1)
        kept = np.argsort(-groups, kind="stable")[:2]
        allowed = np.concatenate([np.arange(4 * g, 4 * g + 4) for g in kept])
        rest = allowed[np.argsort(-choice[allowed], kind="stable")[:3]]
        picks = np.concatenate([[0], rest])
        weights = 2.5 * scores[token, picks] / scores[token, picks].sum()
        assert dict_of(changed, 0)[token] == pytest.approx(dict(zip(picks.tolist(), weights.tolist())), rel=1e-5)


def gshard_drops(ids: np.ndarray, weights: np.ndarray, capacity: int) -> np.ndarray:
    """bool[tokens, k]: the assignments over capacity, by GShard's queue written out by hand:
    every token's first choice in token order, then every second choice, ..."""
    counts: dict[int, int] = {}
    dropped = np.zeros(ids.shape, dtype=bool)
    ranks = np.argsort(-weights, -1, kind="stable")
    for rank in range(ids.shape[1]):
        for token in range(ids.shape[0]):
            slot = ranks[token, rank]
            expert = int(ids[token, slot])
            counts[expert] = counts.get(expert, 0) + 1
            dropped[token, slot] = counts[expert] > capacity
    return dropped


def test_capacity_in_the_forward_drops_gshard_order_and_changes_the_output(tokenizer):
    model = build("mixtral")
    baseline = trace_text(model, tokenizer, TEXT)
    result = run_intervention(model, tokenizer, TEXT, Intervention(capacity_factor={0: 0.5}))
    changed = result.changed
    capacity = expert_capacity(baseline.num_tokens, 6, 2, 0.5)
    dropped = gshard_drops(baseline.topk_ids[0], baseline.topk_weights[0], capacity)
    assert dropped.any()
    np.testing.assert_array_equal(changed.topk_ids[0], baseline.topk_ids[0])
    np.testing.assert_array_equal(changed.topk_weights[0], np.where(dropped, 0, baseline.topk_weights[0]))
    assert not np.array_equal(result.changed_logprobs, result.baseline_logprobs)


def test_switch_capacity_factor_replaces_its_expert_capacity(tokenizer):
    model = build("switch_transformers")  # expert_capacity = 3
    tokens = len(tokenizer(TEXT)["input_ids"])
    baseline = trace_text(model, tokenizer, TEXT)
    changed = run_intervention(model, tokenizer, TEXT, Intervention(capacity_factor=1.5)).changed
    capacity = expert_capacity(tokens, 8, 1, 1.5)  # the first encoder layer: its call holds the text's tokens
    assert capacity > 3 and np.bincount(baseline.topk_ids[0, :, 0]).max() > capacity
    np.testing.assert_array_equal(changed.topk_ids[0], baseline.topk_ids[0])
    np.testing.assert_array_equal(changed.topk_weights[0, :, 0] > 0,
                                  ~gshard_drops(baseline.topk_ids[0], baseline.topk_weights[0], capacity)[:, 0])


# -- Routing-lab policies in the forward pass ----------------------------------------------------


def test_expert_choice_gives_each_expert_its_c_best_tokens_weighted_by_their_scores(tokenizer):
    """Zhou et al. 2022, eq. 1, at Mixtral's layer 0 (6 experts, c = k = 2): each expert takes
    the C = ⌈2·T/6⌉ tokens whose softmax probability for it is highest; a token's weights are
    those probabilities, not renormalised; a token no expert chose gets nothing."""
    model = build("mixtral")
    result = run_intervention(model, tokenizer, TEXT, Intervention(policy={0: RoutingPolicy("expert choice")}))
    changed = result.changed
    tokens = changed.num_tokens
    capacity = -(-2 * tokens // 6)
    probs = softmax(changed.router_logits[0])
    expected = np.zeros_like(probs)
    for expert in range(6):
        best = np.argsort(-probs[:, expert], kind="stable")[:capacity]
        expected[best, expert] = probs[best, expert]
    got = np.zeros_like(probs)
    np.put_along_axis(got, changed.topk_ids[0].astype(np.int64), changed.topk_weights[0], axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert changed.top_k == 6 and ((got > 0).sum(0) == capacity).all()
    assert ((got > 0).sum(1) != 2).any()  # tokens get different numbers of experts
    np.testing.assert_array_equal(changed.router_logits[0], result.baseline.router_logits[0])
    assert not np.allclose(changed.router_logits[1:], result.baseline.router_logits[1:])  # later layers re-ran
    assert not np.array_equal(result.changed_logprobs, result.baseline_logprobs)


def test_expert_choice_leaves_ablated_experts_out(tokenizer):
    model = build("mixtral")
    policy = RoutingPolicy("expert choice", experts_per_token=1)
    changed = run_intervention(model, tokenizer, TEXT, Intervention(policy={1: policy}, ablate={1: [3]})).changed
    used = changed.topk_weights[1] > 0
    counts = np.bincount(changed.topk_ids[1][used], minlength=6)
    capacity = -(-changed.num_tokens // 6)
    assert counts[3] == 0 and (np.delete(counts, 3) == capacity).all()


def test_hash_routing_sends_each_token_to_its_id_mod_e_with_weight_1(tokenizer):
    """Roller et al. 2021: one expert per token from its id, at every layer; Mixtral weighs a
    lone pick 1 (its softmax renormalised over the one)."""
    model = build("mixtral")
    for method in policies.HASH_METHODS:
        changed = run_intervention(model, tokenizer, TEXT, Intervention(policy=RoutingPolicy("hash", hash_method=method))).changed
        expected = policies.hash_routing(changed.token_ids, 6, method).expert_ids[:, 0]
        assert changed.top_k == 1
        for layer in range(len(changed.layer_ids)):
            np.testing.assert_array_equal(changed.topk_ids[layer, :, 0], expected)
            assert (changed.topk_weights[layer] == 1).all()
    assert (np.array(changed.token_ids) % 6 != expected).any()  # the random hash is not the modulo


def test_bias_balancing_in_the_forward_selects_as_the_routing_lab_and_weighs_as_mixtral(tokenizer):
    """DeepSeek-V3's bias balancing over the tokens in chunks of 4, γ = 0.05: the same sets as
    the Routing lab replays on the same scores; the weights Mixtral's softmax renormalised
    over each set."""
    model = build("mixtral")
    policy = RoutingPolicy("bias balancing", update_speed=0.05, chunk_size=4)
    result = run_intervention(model, tokenizer, TEXT, Intervention(policy={2: policy}))
    changed = result.changed
    probs = softmax(changed.router_logits[2])
    replay = policies.bias_balancing(probs, 2, 0.05, 4)
    plain = policies.top_k(probs, 2)
    assert not np.array_equal(np.sort(replay.expert_ids, 1), np.sort(plain.expert_ids, 1))  # the bias moved picks
    np.testing.assert_array_equal(np.sort(changed.topk_ids[2], 1), np.sort(replay.expert_ids, 1))
    picked = np.take_along_axis(probs, changed.topk_ids[2].astype(np.int64), 1)
    np.testing.assert_allclose(changed.topk_weights[2], picked / picked.sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_array_equal(changed.topk_ids[:2], result.baseline.topk_ids[:2])


def test_deepseek_v3_bias_balancing_weighs_the_set_by_its_own_formula(tokenizer):
    """Sigmoid scores select (with the policy's bias, not the router's own); the weights are the
    router's: unbiased sigmoid scores of the set, normalised, × routed_scaling_factor."""
    model = build("deepseek_v3")
    changed = run_intervention(model, tokenizer, TEXT, Intervention(policy={1: RoutingPolicy("bias balancing")})).changed
    index = changed.layer_ids.index(1)
    scores = 1 / (1 + np.exp(-changed.router_logits[index].astype(np.float64)))
    replay = policies.bias_balancing(scores, changed.top_k, 0.01, 16)
    np.testing.assert_array_equal(np.sort(changed.topk_ids[index], 1), np.sort(replay.expert_ids, 1))
    picked = np.take_along_axis(scores, changed.topk_ids[index].astype(np.int64), 1)
    router = find_routers(model)[0].module
    np.testing.assert_allclose(changed.topk_weights[index],
                               picked / picked.sum(1, keepdims=True) * router.routed_scaling_factor, rtol=1e-5)


POLICY_REFUSED = {
    ("phimoe", "expert choice"): "exactly two experts",
    ("phimoe", "hash"): "sparsemixer",
    ("phimoe", "bias balancing"): "sparsemixer",
    ("llama4", "expert choice"): "Llama 4",
    ("switch_transformers", "expert choice"): "one-hot top-1",
    ("switch_transformers", "hash"): "encoder-decoder",
}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_runs_each_policy_or_says_why_not(name, policy, tokenizer):
    model, baseline, index, layer = at_last_moe_layer(name, tokenizer)
    intervention = Intervention(policy={layer: RoutingPolicy(policy, update_speed=0.05, chunk_size=2)})
    changed = run_or_refused(model, tokenizer, intervention, POLICY_REFUSED.get((name, policy)))
    if changed is None:
        return
    ids, weights = changed.topk_ids[index], changed.topk_weights[index]
    used = weights > 0
    if policy == "expert choice":
        tokens = changed.num_tokens + (1 if changed.layer_stacks[index] == "decoder" and model.config.is_encoder_decoder else 0)
        capacity = expert_capacity(tokens, changed.num_experts, baseline.top_k, 1.0, min_capacity=1)
        assert (np.bincount(ids[used], minlength=changed.num_experts) == capacity).all()
    elif policy == "hash":
        np.testing.assert_array_equal(ids[:, 0], np.array(changed.token_ids) % changed.num_experts)
    elif not model.config.is_encoder_decoder:  # Switch's decoder router also sees the start token
        replay = policies.bias_balancing(changed.router_probs[index], baseline.top_k, 0.05, 2)
        np.testing.assert_array_equal(np.sort(ids[:, :baseline.top_k], 1), np.sort(replay.expert_ids, 1))
        assert used.any(-1).all()
    np.testing.assert_array_equal(changed.topk_ids[:index, :, :1], baseline.topk_ids[:index, :, :1])


@pytest.mark.parametrize("intervention, message", [
    (Intervention(policy={0: RoutingPolicy("hash")}, ablate={0: [1]}), r"does not combine with ablate"),
    (Intervention(policy={0: RoutingPolicy("bias balancing")}, force={0: [1]}), r"cannot take forced experts"),
    (Intervention(policy={0: RoutingPolicy("expert choice")}, capacity_factor=1.0), r"its own capacity C"),
    (Intervention(policy={0: RoutingPolicy("expert choice", experts_per_token=7)}), r"c = 7 .* exceeds the 6"),
])
def test_policy_mistakes_are_explained_before_the_model_runs(intervention, message, tokenizer):
    model = build("mixtral")
    with pytest.raises(ValueError, match=message):
        run_intervention(model, tokenizer, TEXT, intervention)


@pytest.mark.parametrize("arguments, message", [
    (dict(name="top-3"), r"one of expert choice, hash, bias balancing"),
    (dict(name="hash", hash_method="md5"), r"The hash is one of modulo, random"),
    (dict(name="bias balancing", update_speed=0.0), r"γ must be a number > 0"),
    (dict(name="bias balancing", chunk_size=0), r"chunk_size >= 1"),
    (dict(name="expert choice", experts_per_token=float("nan")), r"c must be a number > 0"),
])
def test_policy_parameters_are_checked(arguments, message):
    with pytest.raises(ValueError, match=message):
        RoutingPolicy(**arguments)


# -- every family: done exactly, or refused with its reason ------------------------------------

REFUSED = {
    ("phimoe", "force"): "sparsemixer",
    ("phimoe", "top_k"): "exactly two experts",
    ("llama4", "top_k"): "Llama 4",
    ("switch_transformers", "top_k"): "one-hot top-1",
}


def interventions_for(model, layer: int, baseline, index: int) -> dict[str, Intervention]:
    first = baseline.first_choice[index]
    busiest = int(np.bincount(first, minlength=baseline.num_experts).argmax())
    idlest = int(np.bincount(baseline.topk_ids[index].ravel(), minlength=baseline.num_experts).argmin())
    return {
        "ablate": Intervention(ablate={layer: [busiest]}),
        "force": Intervention(force={layer: [idlest]}),
        "top_k": Intervention(top_k=baseline.top_k + 1 if baseline.top_k < 4 else baseline.top_k + 2),
        "bias": Intervention(bias={layer: {idlest: 5.0}}),
        "capacity": Intervention(capacity_factor={layer: 0.5}),
    }


@pytest.mark.parametrize("kind", ["ablate", "force", "top_k", "bias", "capacity"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_does_each_intervention_or_says_why_not(name, kind, tokenizer):
    model, baseline, index, layer = at_last_moe_layer(name, tokenizer)
    intervention = interventions_for(model, layer, baseline, index)[kind]
    changed = run_or_refused(model, tokenizer, intervention, REFUSED.get((name, kind)))
    if changed is None:
        return
    ids, weights = changed.topk_ids[index], changed.topk_weights[index]
    used = weights > 0
    if kind == "ablate":
        expert = intervention.ablate[layer][0]
        assert not (used & (ids == expert)).any() and (baseline.topk_ids[index] == expert).any()
    elif kind == "force":
        expert = intervention.force[layer][0]
        has = (used & (ids == expert)).any(-1)
        # Switch sends every token to the forced expert, which keeps its capacity (3) of them, the
        # decoder start token (not in the trace) first.
        assert has.sum() == 2 if name == "switch_transformers" else has.all()
    elif kind == "top_k":
        assert changed.top_k == intervention.top_k and (weights > 0).all(-1).mean() > 0.9
    elif kind == "bias":
        expert = next(iter(intervention.bias[layer]))
        assert (used & (ids == expert)).sum() > (baseline.topk_ids[index] == expert).sum()
    else:
        tokens = changed.num_tokens + (1 if changed.layer_stacks[index] == "decoder" and model.config.is_encoder_decoder else 0)
        capacity = expert_capacity(tokens, changed.num_experts, changed.top_k, 0.5)
        assert np.bincount(ids[used], minlength=changed.num_experts).max() <= capacity
        over = np.bincount(baseline.topk_ids[index].ravel(), minlength=changed.num_experts).max() > capacity
        assert (~used).any() == over  # tokens are turned away exactly when an expert had more than C
    if kind != "top_k":  # the others change only the last MoE layer
        np.testing.assert_array_equal(changed.topk_ids[:index], baseline.topk_ids[:index])


def at_last_moe_layer(name: str, tokenizer):
    """(tiny model of family `name`, its plain trace of TEXT, index and number of its last MoE
    layer (Switch: its last decoder layer))."""
    model = build(name)
    baseline = trace_text(model, tokenizer, TEXT)
    index = len(baseline.layer_ids) - 1
    return model, baseline, index, baseline.layer_ids[index]


def run_or_refused(model, tokenizer, intervention: Intervention, refusal: str | None):
    """The trace of TEXT with `intervention`, after checking that each experts module received
    exactly that routing; or, when `refusal` says why the family cannot do it, None after
    checking that it is refused with that reason and the model type named."""
    if refusal is not None:
        with pytest.raises(InterventionRefused, match=rf"{model.config.model_type}.*{refusal}"):
            run_intervention(model, tokenizer, TEXT, intervention)
        return None
    with intervening(model, intervention):
        changed, received = traced_with_experts_inputs(model, tokenizer)
    assert_experts_received_the_trace(model, changed, received)
    return changed


def assert_experts_received_the_trace(model, trace, received):
    """What each experts module received equals the trace (as in tests/test_families.py)."""
    for position, layer_id in enumerate(trace.layer_ids):
        args, block_in = received[trace.layer_label(layer_id)]
        expected = trace_weights(trace, position)
        if len(args) == 1:  # Llama 4: every token once per expert, scaled by its weight
            hidden = block_in.reshape(-1, block_in.shape[-1])
            assert torch.equal(args[0], hidden.repeat(trace.num_experts, 1) * expected.T.reshape(-1, 1))
            continue
        got = applied_weights(args, trace.num_experts)
        if trace.layer_stacks[position] == "decoder" and model.config.is_encoder_decoder:
            got = got[1:]
        assert torch.equal(got, expected), trace.layer_label(layer_id)


# -- refusals and mistakes ---------------------------------------------------------------------


@pytest.mark.parametrize("intervention, message", [
    (Intervention(ablate={5: [0]}), r"Layer 5 has no MoE router: this model's MoE layers are 0, 1, 2"),
    (Intervention(ablate={0: [6]}),
     r"At layer 0 of mixtral \(MixtralTopKRouter\), cannot ablate expert 6: experts are numbered 0 to 5"),
    (Intervention(ablate={0: [0, 1, 2, 3, 4]}), r"5 of 6 experts are ablated, leaving fewer than the k = 2"),
    (Intervention(force={0: [1, 2, 3]}), r"3 experts are forced but a token takes only k = 2"),
    (Intervention(force={0: [1]}, ablate={0: [1]}), r"expert 1 is both forced and ablated"),
    (Intervention(top_k=7), r"top_k must lie between 1 and the 6 experts; got 7"),
    (Intervention(capacity_factor=0.0), r"capacity_factor must be a number > 0"),
    (Intervention(bias={0: [1.0, 2.0]}), r"a bias needs one value per expert \(6\); got 2"),
    (Intervention(bias={0: {1: float("inf")}}), r"a bias must be finite; to remove an expert, ablate it"),
])
def test_mistakes_are_explained_before_the_model_runs(intervention, message, tokenizer):
    model = build("mixtral")
    with pytest.raises(ValueError, match=message):
        run_intervention(model, tokenizer, TEXT, intervention)
    assert all(not site.module._forward_hooks for site in find_routers(model))


def test_hooks_are_removed_after_a_failing_forward(tokenizer):
    """DeepSeek-V3 (4 groups of 4, top-4 from the 2 best groups by top-2 sum): with 2 experts
    left in group 0 and 1 in each other group, only group 0 scores finitely, and the second
    group chosen holds 1 expert: 3 < k = 4. The forward pass stops with a readable error."""
    model = build("deepseek_v3")
    ablate = [0, 1, 4, 5, 6, 8, 9, 10, 12, 13, 14]
    with pytest.raises(ValueError, match=r"could not fill its 4 slots without an ablated expert"):
        run_intervention(model, tokenizer, TEXT, Intervention(ablate={1: ablate}))
    assert all(not site.module._forward_hooks for site in find_routers(model))
    assert not model._forward_hooks


def test_grouped_router_refuses_a_k_beyond_its_groups(tokenizer):
    model = build("glm4_moe")  # 8 experts in 2 groups, 1 group kept
    with pytest.raises(InterventionRefused, match=r"glm4_moe \(Glm4MoeTopkRouter\), top_k can be at most 4: "
                                                   r"the router picks from its best 1 groups of 4 experts; got 5"):
        run_intervention(model, tokenizer, TEXT, Intervention(top_k=5))


def test_describe():
    intervention = Intervention(ablate={1: [3, 5]}, force={2: [0]}, top_k=1, bias={1: {2: -1.5}},
                                capacity_factor={3: 1.25})
    assert intervention.describe() == ("ablate layer 1: 3, 5 · force layer 2: 0 · top-1 at every MoE layer · "
                                       "bias layer 1: 2 -1.5 · capacity factor 1.25 at layer 3")
    assert Intervention().describe() == "no intervention" and Intervention().empty
    assert Intervention(policy=RoutingPolicy("hash")).describe() == "hash (token id mod E) at every MoE layer"
    assert Intervention(policy={2: RoutingPolicy("bias balancing", update_speed=0.001, chunk_size=8)}).describe() == (
        "bias balancing (γ = 0.001, every 8 tokens) at layer 2")
    assert not Intervention(policy=RoutingPolicy("expert choice")).empty


# -- one shared model, many threads --------------------------------------------------------------


def test_ten_threads_with_different_interventions_each_get_their_own(tokenizer):
    model = build("mixtral")
    interventions = [Intervention(), Intervention(ablate={0: [0]}), Intervention(ablate={1: [3]}),
                     Intervention(force={2: [5]}), Intervention(top_k=1), Intervention(top_k=3),
                     Intervention(bias={0: {2: 4.0}}), Intervention(capacity_factor=0.5),
                     Intervention(policy=RoutingPolicy("hash")), Intervention(policy={1: RoutingPolicy("expert choice")})]
    alone = [run_intervention(model, tokenizer, TEXT, how) for how in interventions]
    barrier = threading.Barrier(len(interventions))
    results, errors = [None] * len(interventions), []

    def work(i):
        try:
            barrier.wait()
            for _ in range(3):
                results[i] = run_intervention(model, tokenizer, TEXT, interventions[i])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(interventions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    plain = trace_text(model, tokenizer, TEXT)
    np.testing.assert_array_equal(results[0].changed.topk_ids, plain.topk_ids)
    for got, expected in zip(results, alone):
        for array in TRACE_ARRAYS:
            np.testing.assert_array_equal(getattr(got.changed, array), getattr(expected.changed, array))
            np.testing.assert_array_equal(getattr(got.baseline, array), getattr(plain, array))
        np.testing.assert_array_equal(got.changed_logprobs, expected.changed_logprobs)
    assert len({r.changed_logprobs.tobytes() for r in results}) == len(interventions)
    assert all(not site.module._forward_hooks for site in find_routers(model)) and not model._forward_hooks
