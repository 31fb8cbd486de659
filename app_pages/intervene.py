"""Intervene: re-run the model with experts ablated, forced or steered at one layer, and see
what changes in its predictions and in the routing of later layers."""

import numpy as np
import streamlit as st

from moeviz.analysis import effects
from moeviz.model.interventions import Intervention, RoutingPolicy, run_intervention
from moeviz.session_cache import session_cached
from moeviz.ui import (
    CAPACITY_RULE,
    CHUNK_SIZES,
    HASHES,
    UPDATE_SPEEDS,
    ModelChoice,
    analyse,
    cached_model,
    layer_picker,
    model_turn,
    show_figure,
    text_input,
)
from moeviz.views import intervention_charts

POLICY_CHOICES = ("none: the model's own routing", "Expert choice", "Hash", "Bias balancing (DeepSeek-V3)")


@session_cached("Running the model twice: as it routes, and with the intervention…")
def cached_intervention(choice: ModelChoice, text: str, layer: int, ablate: tuple, force: tuple, k: int | None,
                        bias: tuple[int, float] | None, capacity_factor: float | None, continuation: int,
                        policy: RoutingPolicy | None = None, policy_everywhere: bool = False):
    loaded = cached_model(choice.source, choice.device, choice.dtype, choice.quantization)
    intervention = Intervention(
        ablate={layer: list(ablate)} if ablate else {}, force={layer: list(force)} if force else {},
        top_k=None if k is None else {layer: k}, bias={layer: {bias[0]: bias[1]}} if bias else {},
        capacity_factor=None if capacity_factor is None else {layer: capacity_factor},
        policy=policy if policy is None or policy_everywhere else {layer: policy},
    )
    with model_turn(choice):  # its forward passes wait their turn like every other session's
        return run_intervention(loaded.model, loaded.tokenizer, text, intervention, model_id=loaded.model_id,
                                max_tokens=choice.max_tokens, continuation_tokens=continuation)


def chosen_intervention(trace, layer: int) -> dict:
    """The intervention widgets, as cached_intervention's arguments."""
    experts = list(range(trace.num_experts))
    left, right = st.columns(2)
    ablate = left.multiselect("Ablate: never select", experts, key="intervene_ablate")
    force = right.multiselect("Force: into every token's selection", experts, key="intervene_force")
    k_column, bias_column, capacity_column = st.columns(3)
    k = int(k_column.number_input(f"k at this layer (the model's: {trace.top_k})", 1, trace.num_experts,
                                  trace.top_k, key=f"intervene_k-{trace.num_experts}"))
    steered = bias_column.selectbox("Steer expert", experts, key="intervene_bias_expert")
    bias = bias_column.slider("Bias added to its router logit", -10.0, 10.0, 0.0, 0.5, key="intervene_bias")
    alpha = capacity_column.slider("Capacity factor α (0: no limit)", 0.0, 3.0, 0.0, 0.05, key="intervene_alpha",
                                   help=f"Each expert takes at most {CAPACITY_RULE} tokens, first choices first, in "
                                   "token order (GShard); the others skip it.")
    policy, everywhere = chosen_policy(trace)
    continuation = int(st.number_input("Greedy continuation: new tokens (0: none)", 0, 64, 12,
                                       key="intervene_continuation"))
    return {"ablate": tuple(ablate), "force": tuple(force), "k": None if k == trace.top_k else k,
            "bias": (steered, bias) if bias else None, "capacity_factor": alpha or None,
            "continuation": continuation, "policy": policy, "policy_everywhere": everywhere}


def chosen_policy(trace) -> tuple[RoutingPolicy | None, bool]:
    """A Routing-lab policy to run in the forward pass, and whether at every MoE layer."""
    name = st.selectbox("Routing policy in the forward pass", POLICY_CHOICES, key="intervene_policy",
                        help="The Routing lab's policies, here deciding what the experts really receive, so the "
                        "outputs and later layers follow.")
    if name == POLICY_CHOICES[0]:
        return None, False
    left, right = st.columns(2)
    everywhere = left.checkbox("At every MoE layer", key="intervene_policy_everywhere")
    if name == "Expert choice":
        c = right.slider("c: experts per token on average (C = ⌈c·T/E⌉ tokens per expert)", 0.25,
                         float(trace.num_experts), float(trace.top_k), 0.25, key=f"intervene_ec-{trace.num_experts}")
        return RoutingPolicy("expert choice", experts_per_token=c), everywhere
    if name == "Hash":
        method = right.radio("Hash", list(HASHES), horizontal=True, key="intervene_hash")
        return RoutingPolicy("hash", hash_method=HASHES[method]), everywhere
    speed = right.select_slider("Bias update speed γ", UPDATE_SPEEDS, value=0.01, key="intervene_gamma")
    chunk = right.select_slider("Tokens per bias update", CHUNK_SIZES, value=16, key="intervene_chunk")
    return RoutingPolicy("bias balancing", update_speed=speed, chunk_size=chunk), everywhere


def show_predictions(result) -> None:
    tokens, before, after = result.baseline.tokens, result.baseline_logprobs, result.changed_logprobs
    st.subheader("Each token: more or less likely after the intervention")
    st.caption("Blue: the model finds the actual token more likely, red: less. Hover for log-probabilities.")
    st.html(intervention_charts.delta_token_view_html(tokens, before, after))
    show_figure(intervention_charts.logprob_delta_chart(tokens, before, after), "intervene_delta")

    st.subheader("The likeliest next tokens at one position")
    largest = int(np.argmax(np.abs(after - before)))
    position = st.select_slider("After the token at position", options=list(range(len(tokens) - 1)), value=largest,
                                format_func=lambda t: f"{t}: {tokens[t]!r}", key=f"intervene_position-{len(tokens)}")
    st.caption(f"The actual next token is {tokens[position + 1]!r}; the largest change is at position {largest}.")
    st.table(intervention_charts.top_predictions_table(
        (result.baseline_predictions.top_tokens[position], result.baseline_predictions.top_logprobs[position]),
        (result.changed_predictions.top_tokens[position], result.changed_predictions.top_logprobs[position]),
    ))


st.title("Intervene")
st.info("This re-runs the model: the intervention acts inside the forward pass, so the predictions and the "
        "routing of every later layer are recomputed (unlike the Routing lab, which replays policies on scores).")
choice = st.session_state.get("model_choice")
if choice is None:
    st.info("No model is loaded (see the sidebar): interventions re-run the model.")
else:
    text = text_input("intervene_text", default_preset="english")
    trace = analyse(choice, text)
    if trace is not None:
        layer = layer_picker(trace, "intervene_layer", "Layer to intervene at")
        options = chosen_intervention(trace, layer)
        if not (options["ablate"] or options["force"] or options["bias"] or options["k"] or options["capacity_factor"]
                or options["policy"]):
            st.info("Pick an intervention above: experts to ablate or force, another k, a bias, a capacity or a "
                    "routing policy.")
        else:
            try:
                result = cached_intervention(choice, text, layer, **options)
            except ValueError as error:
                st.error(str(error))
                result = None
            if result is not None:
                st.subheader(result.intervention.describe(trace.encoder_layers))
                if trace.num_tokens >= 2:
                    before = effects.perplexity(result.baseline_logprobs)
                    after = effects.perplexity(result.changed_logprobs)
                    cols = st.columns(3)
                    cols[0].metric("Perplexity before", f"{before:.3f}")
                    cols[1].metric("Perplexity after", f"{after:.3f}", f"{after - before:+.3f}", delta_color="inverse")
                    cols[2].metric("Mean Δ log p of the next token",
                                   f"{(result.changed_logprobs - result.baseline_logprobs).mean():+.4f}")
                    show_predictions(result)
                if options["continuation"]:
                    st.subheader("Greedy continuation")
                    left, right = st.columns(2)
                    left.caption("before")
                    left.code(intervention_charts.shown_continuation(result.baseline_continuation), language=None)
                    right.caption("after")
                    right.code(intervention_charts.shown_continuation(result.changed_continuation), language=None)
                st.subheader("Routing downstream")
                labels = [trace.layer_label(n) for n in trace.layer_ids]
                acting = labels if options["policy"] and options["policy_everywhere"] else [trace.layer_label(layer)]
                show_figure(intervention_charts.experts_changed_chart(
                    labels, effects.experts_changed(result.baseline, result.changed), acting,
                ), "intervene_routing")
