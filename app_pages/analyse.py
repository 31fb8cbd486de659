"""Analyse text: how one text is routed, token by token and layer by layer."""

import streamlit as st

from moeviz.analysis import metrics
from moeviz.ui import layer_picker, repeat_rate_figure, router_scores_shown, show_figure, trace_download, trace_from_source
from moeviz.views import charts

st.title("Analyse text")
choice = st.session_state.get("model_choice")
trace = trace_from_source(choice, "analyse_text", default_preset="english")
if trace is not None:
    layer = layer_picker(trace, "analyse_layer")
    index = trace.layer_index(layer)

    st.subheader(f"Tokens coloured by first-choice expert · {trace.layer_label(layer)}")
    st.caption("As in the Mixtral paper's Fig. 8. Hover over a token for its top-k experts and weights.")
    st.html(charts.token_view_html(trace, layer))

    st.subheader("Router probabilities")
    if router_scores_shown(trace, "The router probability heatmap", logits_suffice=True):
        show_figure(charts.probability_heatmap(trace, layer), "probabilities")

    left, right = st.columns(2)
    with left:
        st.subheader("Expert load")
        choices = st.radio("Count", ["first choice", f"top-{trace.top_k}"], horizontal=True, key="load_choices")
        picks = 1 if choices == "first choice" else trace.top_k
        load = metrics.expert_load(trace, picks)[index]
        show_figure(charts.expert_load_chart(load, metrics.uniform_load(trace, picks),
                                             title=f"Share of tokens per expert · {trace.layer_label(layer)}",
                                             shared_experts=trace.shared_experts), "expert_load")
    with right:
        st.subheader("Expert co-activation")
        show_figure(charts.coactivation_heatmap(metrics.coactivation(trace, index)), "coactivation")

    st.subheader("Adjacent tokens sharing experts")
    st.caption("As in the Mixtral paper's Table 5, against the rate expected by chance.")
    if trace.num_tokens >= 2:
        show_figure(repeat_rate_figure(trace), "repeat_rates")
    else:
        st.info("Repeat rates need at least two tokens.")

    st.subheader("Balance")
    cols = st.columns(3)
    cols[2].metric("Tokens dropped at capacity factor 1.25", f"{metrics.dropped_token_share(trace, 1.25)[index]:.1%}")
    if router_scores_shown(trace, "The balance loss and router entropy"):
        cols[0].metric("Balance loss E·Σ f·P (balanced = k)", f"{metrics.balance_loss(trace)[index]:.3f}")
        cols[1].metric("Mean router entropy (bits)", f"{metrics.router_entropy(trace)[index].mean():.3f}")

    trace_download(trace, "analyse_trace_file")
