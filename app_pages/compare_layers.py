"""Compare layers: how the routing of one text changes with depth."""

import streamlit as st

from moeviz.analysis import metrics
from moeviz.ui import counted, enough_tokens, load_choices, load_title, show_figure, trace_from_source
from moeviz.views import charts

st.title("Compare layers")
choice = st.session_state.get("model_choice")
trace = trace_from_source(choice, "layers_text", default_preset="python")
if trace is not None and enough_tokens(trace):
    stats = counted(trace)
    picks = load_choices(trace.top_k, "layers_choices")
    load = metrics.expert_load(stats, picks)
    uniform = metrics.uniform_load(stats, picks)

    st.subheader("Expert load in every layer")
    show_figure(charts.layer_load_heatmap(stats, load, uniform), "layer_load")

    default = trace.layer_ids[:1] + trace.layer_ids[-1:] if len(trace.layer_ids) > 1 else trace.layer_ids
    chosen = st.multiselect("Layers to compare", trace.layer_ids, default=default,
                            key=f"layers_chosen-{trace.layer_ids}")
    chosen = sorted(chosen)
    if len(chosen) < 2:
        st.info("Pick two or more layers to compare them side by side.")
    else:
        st.subheader("Expert load side by side")
        loads = {trace.layer_label(layer): load[trace.layer_index(layer)] for layer in chosen}
        show_figure(charts.load_comparison_chart(loads, uniform, title=load_title(picks, "chosen layers")), "layer_loads")

        st.subheader("First-choice transitions between layers")
        st.caption("Where the tokens of each first-choice expert at one layer go at the next chosen layer. "
                   "Expert 3 of one layer and expert 3 of another are unrelated networks: only the paths count.")
        show_figure(charts.transition_sankey(stats, chosen), "layer_transitions")
        shares = [
            metrics.transition_concentration(metrics.layer_transitions(stats, trace.layer_index(a), trace.layer_index(b)))
            for a, b in zip(chosen, chosen[1:])
        ]
        st.caption("Tokens that go where most tokens of their expert go (1 = each expert's tokens all take one path; "
                   "the floor is the later layer's most used expert, reached when the earlier choice tells nothing): "
                   + " · ".join(f"{trace.layer_label(a)} → {trace.layer_label(b)}: {share:.1%} (floor {floor:.1%})"
                                for (a, b), (share, floor) in zip(zip(chosen, chosen[1:]), shares)))
