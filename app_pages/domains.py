"""Domains: do experts specialise by domain? The Mixtral paper's Fig. 7 and Table 5, live,
on the held-out samples shipped with the bundled model."""

import pandas as pd
import streamlit as st

from moeviz.analysis import metrics
from moeviz.ui import (REPEAT_LABELS, cached_trace, counted, enough_tokens, layer_picker, load_choices, load_title,
                       plural, presets, repeat_rates, show_figure)
from moeviz.views import charts

st.title("Domains")
st.caption(
    "Held-out text of each domain (never seen in training) through the loaded model. "
    "Compare with the Mixtral paper's Fig. 7 (expert load per domain) and Table 5 (repeat rates)."
)
choice = st.session_state.get("model_choice")
samples = presets()
if choice is None:
    st.info("No model is loaded (see the sidebar).")
    st.stop()
if not samples:
    st.warning("No domain samples found under assets/samples.")
    st.stop()
traces = {domain: cached_trace(choice, text) for domain, text in samples.items()}
traces = {domain: trace for domain, trace in traces.items() if enough_tokens(trace, f"The {domain} sample")}
if traces:
    stats = {domain: counted(trace) for domain, trace in traces.items()}
    first = next(iter(traces.values()))
    st.caption(f"{len(traces)} domains · " + " · ".join(f"{d}: {plural(t.num_tokens, 'token')}" for d, t in stats.items()))
    layer = layer_picker(first, "domains_layer")
    index = first.layer_index(layer)

    st.subheader(f"Share of tokens per expert, by domain · {first.layer_label(layer)}")
    picks = load_choices(first.top_k, "domains_choices")
    loads = {domain: metrics.expert_load(trace, picks)[index] for domain, trace in stats.items()}
    show_figure(charts.load_comparison_chart(loads, metrics.uniform_load(first, picks),
                                             title=load_title(picks, first.layer_label(layer))), "domain_loads")

    st.subheader(f"Jensen–Shannon divergence between domains' loads (bits) · {first.layer_label(layer)}")
    show_figure(charts.js_matrix_heatmap(list(loads), metrics.load_js_matrix(list(loads.values())),
                                         title="Jensen–Shannon divergence between domains' expert loads (bits)"),
                "domain_js")

    st.subheader("Adjacent tokens sharing experts, by domain and layer (Table 5)")
    chance = metrics.repeat_chance(first)
    rows = []
    for domain, trace in traces.items():
        rates = repeat_rates(trace)
        for position, layer_id in enumerate(trace.layer_ids):
            rows.append({"domain": domain, "layer": layer_id} | {
                label: getattr(rates, name)[position] for name, label in REPEAT_LABELS.items()})
    table = pd.DataFrame(rows)
    st.dataframe(table.style.format({label: "{:.1%}" for label in REPEAT_LABELS.values()}), hide_index=True)
    st.caption("Chance for independent uniform routing: " + " · ".join(
        f"{label} {getattr(chance, name)[0]:.1%}" for name, label in REPEAT_LABELS.items()))
    st.download_button("Download table (CSV)", table.to_csv(index=False), file_name="repeat_rates_by_domain.csv",
                       mime="text/csv", key="domains_repeat_csv", on_click="ignore")
