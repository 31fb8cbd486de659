"""Analyse text: how one text is routed, token by token and layer by layer."""

import streamlit as st

from moeviz.analysis import metrics
from moeviz.trace import RoutingTrace
from moeviz.ui import (
    counted,
    enough_tokens,
    layer_picker,
    load_choices,
    load_title,
    repeat_rate_figure,
    router_scores_shown,
    routing_view,
    show_figure,
    trace_download,
    trace_from_source,
)
from moeviz.views import charts


def of_layer(fig, trace: RoutingTrace, layer: int):
    """The figure marked with its layer: a layer column in its CSV and the layer in the file's name."""
    return fig.update_layout(meta=dict(layer=layer, layer_label=trace.layer_label(layer)))


@st.fragment
def layer_charts(trace: RoutingTrace) -> None:
    """The Plotly charts of one layer; their slider reruns this fragment only."""
    layer = layer_picker(trace, "analyse_layer", label="Layer of the charts below")
    index = trace.layer_index(layer)
    st.subheader(f"Router probabilities · {trace.layer_label(layer)}")
    if router_scores_shown(trace, "The router probability heatmap", logits_suffice=True):
        show_figure(charts.probability_heatmap(trace, layer), "probabilities")

    stats = counted(trace)
    if enough_tokens(trace):
        left, right = st.columns(2)
        with left:
            st.subheader("Expert load")
            picks = load_choices(trace.top_k, "load_choices")
            load = charts.expert_load_chart(metrics.expert_load(stats, picks)[index], metrics.uniform_load(stats, picks),
                                            title=load_title(picks, trace.layer_label(layer)),
                                            shared_experts=trace.shared_experts)
            show_figure(of_layer(load, trace, layer), "expert_load")
        with right:
            st.subheader("Expert co-activation")
            show_figure(of_layer(charts.coactivation_heatmap(metrics.coactivation(stats, index)), trace, layer), "coactivation")

        st.subheader("Adjacent tokens sharing experts")
        st.caption("As in the Mixtral paper's Table 5, against the rate expected by chance.")
        show_figure(repeat_rate_figure(trace), "repeat_rates")

        st.subheader("Balance")
        cols = st.columns(3)
        cols[2].metric(f"Tokens dropped at capacity factor 1.25 (C = {metrics.trace_capacity(stats, 1.25)} per expert)",
                       f"{metrics.dropped_token_share(stats, 1.25)[index]:.1%}",
                       help=f"Each expert takes at most C = max(⌈α·k·T/E⌉, {metrics.MIN_CAPACITY}) assignments, as DeepSpeed "
                       "sizes it; first choices queue before second choices.")
        if router_scores_shown(trace, "The balance loss and router entropy"):
            cols[0].metric("Balance loss E·Σ f·P (balanced = k)", f"{metrics.balance_loss(stats)[index]:.3f}")
            cols[1].metric("Mean router entropy (bits)", f"{metrics.router_entropy(stats)[index].mean():.3f}")


st.title("Analyse text")
choice = st.session_state.get("model_choice")
trace = trace_from_source(choice, "analyse_text", default_preset="english")
if trace is not None:
    st.subheader("Routing, layer by layer")
    st.caption("Tokens coloured by first-choice expert, as in the Mixtral paper's Fig. 8, with the layer's expert "
               "load and router probabilities. Every layer is in your browser: the slider and the ← → keys switch "
               "layers at once. Hover a token for its path across layers, click it to pin its details.")
    routing_view(trace)
    layer_charts(trace)
    trace_download(trace, "analyse_trace_file")
