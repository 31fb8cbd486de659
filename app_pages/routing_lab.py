"""Routing lab: replay other routing policies on the router scores the model computed."""

import numpy as np
import pandas as pd
import streamlit as st

from moeviz.analysis import policies
from moeviz.analysis.metrics import expert_capacity
from moeviz.ui import (
    CAPACITY_RULE,
    CHUNK_SIZES,
    HASHES,
    UPDATE_SPEEDS,
    counted,
    enough_tokens,
    layer_picker,
    router_scores_shown,
    show_figure,
    trace_from_source,
)
from moeviz.views import policy_charts

POLICIES = ("Top-k", "Top-k with capacity", "Expert choice", "Hash", "Bias balancing (DeepSeek-V3)")
DROP_ORDERS = {"token order (Switch, GShard)": "token", "score order (batch prioritized routing, V-MoE)": "score"}
SWEEP_FACTORS = np.round(np.arange(0.5, 3.0 + 1e-9, 0.05), 2)
REFERENCE_FACTORS = (1.25, 2.0)  # capacity factors Switch Transformers compares (Table 1)


def chosen_policy(trace, scores) -> policies.Assignment:
    """The policy and parameter widgets, and the assignment they ask for."""
    name = st.selectbox("Policy", POLICIES, index=1, key="lab_policy")
    experts, tokens = trace.num_experts, trace.num_tokens
    if name in ("Top-k", "Top-k with capacity", "Bias balancing (DeepSeek-V3)"):
        k = st.slider("k: experts per token", 1, experts, trace.top_k, key=f"lab_k-{experts}")
    if name == "Top-k":
        return policies.top_k(scores, k)
    if name == "Top-k with capacity":
        alpha = st.slider(f"Capacity factor α ({CAPACITY_RULE})", 0.5, 3.0, 1.25, 0.05, key="lab_alpha")
        order = st.radio("Drop order", list(DROP_ORDERS), horizontal=True, key="lab_order")
        return policies.top_k_capacity(scores, k, alpha, DROP_ORDERS[order])
    if name == "Expert choice":
        balanced = min(expert_capacity(tokens, experts, trace.top_k, 1.0, min_capacity=1), tokens)
        capacity = st.slider("C: tokens per expert", 1, tokens, balanced, key=f"lab_capacity-{tokens}",
                             help=f"{balanced} = ⌈k·T/E⌉ gives about as many assignments as the model's top-{trace.top_k}.")
        return policies.expert_choice(scores, capacity)
    if name == "Hash":
        method = st.radio("Hash", list(HASHES), horizontal=True, key="lab_hash")
        return policies.hash_routing(trace.token_ids, experts, HASHES[method])
    speed = st.select_slider("Bias update speed γ", UPDATE_SPEEDS, value=0.01, key="lab_gamma")
    chunk = st.select_slider("Tokens per bias update (a batch)", CHUNK_SIZES, value=16, key="lab_chunk")
    return policies.bias_balancing(scores, k, speed, chunk)


def summary_table(model, policy, scores) -> pd.DataFrame:
    """The comparison numbers, one column per routing."""
    def column(assignment):
        cv = policies.load_cv(policies.expert_load(assignment))
        return [
            "—" if np.isnan(cv) else f"{cv:.3f}",
            f"{policies.balance_loss(assignment, scores):.3f}",
            f"{policies.dropped_token_share(assignment):.1%}",
            f"{policies.unrouted_token_share(assignment):.1%}",
            f"{policies.agreement(assignment, model):.1%}",
            "—" if assignment.capacity is None else str(assignment.capacity),
        ]

    rows = ["load CV (std / mean, 0 = balanced)", "balance loss E·Σ f·P (f: choices, dropped ones too)",
            "tokens with an assignment dropped",
            "tokens with no expert", "model's (token, expert) pairs kept", "capacity C (tokens per expert)"]
    return pd.DataFrame({model.policy: column(model), policy.label: column(policy)}, index=rows)


st.title("Routing lab")
st.info(
    "This replays the routing decision only: each policy picks experts from the router scores this "
    "model computed for the text. The model's outputs are not recomputed, and later layers still see "
    "the hidden states of the model's own routing. To run expert choice, hash or bias balancing inside "
    "the forward pass and see what it does to the predictions, use Intervene."
)
choice = st.session_state.get("model_choice")
trace = trace_from_source(choice, "lab_text", default_preset="english")
if (trace is not None and enough_tokens(trace)
        and router_scores_shown(trace, "The routing lab replays policies on router scores: it")):
    trace = counted(trace)  # policies route the tokens the statistics count
    layer = layer_picker(trace, "lab_layer")
    scores = policies.layer_scores(trace, layer)
    model = policies.model_routing(trace, layer)
    if trace.scoring == "sigmoid":
        st.caption("This model scores experts with a sigmoid: policies select from those scores without the "
                   "model's learnt bias or group limits, so top-k can differ from the model's own choice.")
    policy = chosen_policy(trace, scores)

    st.subheader(f"{policy.label} against the model · {trace.layer_label(layer)}")
    st.table(summary_table(model, policy, scores))
    st.caption("The balance loss scores what the router chose: its f counts every choice, dropped ones too, as "
               "Switch Transformers' auxiliary loss (eq. 4) is computed before capacity is applied. Capacity "
               "drops leave it unchanged; the rows below it show what the drops cost.")
    if policy.bias is not None:
        show_figure(policy_charts.bias_chart(policy.bias), "lab_bias")

    left, right = st.columns(2)
    with left:
        show_figure(policy_charts.policy_load_chart(model, policy), "lab_load")
    with right:
        show_figure(policy_charts.experts_per_token_chart(model, policy), "lab_experts_per_token")

    st.subheader("Tokens coloured by their first routed expert")
    st.caption("Dashed outline: an expert was full and dropped the token. Struck through: no expert "
               "processes the token. Hover over a token for its experts and weights.")
    left, right = st.columns(2)
    with left:
        st.html(policy_charts.assignment_view_html(trace.tokens, model))
    with right:
        st.html(policy_charts.assignment_view_html(trace.tokens, policy))

    st.subheader(f"Capacity sweep of the model's own routing · {trace.layer_label(layer)}")
    shares = {
        "token order": policies.capacity_sweep(model, SWEEP_FACTORS),
        "score order (batch prioritized)": policies.capacity_sweep(model, SWEEP_FACTORS, policies.batch_priority(scores)),
    }
    show_figure(policy_charts.capacity_sweep_chart(SWEEP_FACTORS, shares, REFERENCE_FACTORS), "lab_sweep")
    st.caption(f"The model's top-{trace.top_k} picks, each expert keeping {CAPACITY_RULE} (DeepSpeed's sizing); "
               "first choices queue before second choices. " + " · ".join(
                   f"α = {alpha:g} (C = {policies.sweep_capacity(model, alpha)}): "
                   f"{shares['token order'][np.isclose(SWEEP_FACTORS, alpha)][0]:.1%} dropped"
                   for alpha in REFERENCE_FACTORS))
