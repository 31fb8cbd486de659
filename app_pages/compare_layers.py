"""Compare layers: how the routing of one text changes with depth."""

import streamlit as st

from moeviz.analysis import metrics
from moeviz.ui import show_figure, trace_from_source
from moeviz.views import charts

st.title("Compare layers")
choice = st.session_state.get("model_choice")
trace = trace_from_source(choice, "layers_text", default_preset="python")
if trace is not None:
    load = metrics.expert_load(trace)
    uniform = metrics.uniform_load(trace)

    st.subheader("Expert load in every layer")
    show_figure(charts.layer_load_heatmap(trace, load, uniform), "layer_load")

    default = trace.layer_ids[:1] + trace.layer_ids[-1:] if len(trace.layer_ids) > 1 else trace.layer_ids
    chosen = st.multiselect("Layers to compare", trace.layer_ids, default=default,
                            key=f"layers_chosen-{trace.layer_ids}")
    chosen = sorted(chosen)
    if len(chosen) < 2:
        st.info("Pick two or more layers to compare them side by side.")
    else:
        st.subheader("Expert load side by side")
        loads = {trace.layer_label(layer): load[trace.layer_index(layer)] for layer in chosen}
        show_figure(charts.load_comparison_chart(loads, uniform), "layer_loads")

        st.subheader("First-choice transitions between layers")
        st.caption("Where each token's first-choice expert at one layer goes at the next chosen layer.")
        show_figure(charts.transition_sankey(trace, chosen), "layer_transitions")

        same = [
            (metrics.layer_transitions(trace, trace.layer_index(a), trace.layer_index(b)).trace() / trace.num_tokens)
            for a, b in zip(chosen, chosen[1:])
        ]
        st.caption("Share of tokens keeping the same first-choice expert: " + " · ".join(
            f"{trace.layer_label(a)} → {trace.layer_label(b)}: {share:.1%}" for (a, b), share in zip(zip(chosen, chosen[1:]), same)))
