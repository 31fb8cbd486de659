"""Domains: do experts specialise by domain? The Mixtral paper's Fig. 7 and Table 5, live,
on the held-out samples shipped with the bundled model."""

import pandas as pd
import streamlit as st

from moeviz.analysis import metrics
from moeviz.ui import REPEAT_LABELS, cached_trace, layer_picker, presets, show_figure
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
elif not samples:
    st.warning("No domain samples found under assets/samples.")
else:
    traces = {domain: cached_trace(choice, text) for domain, text in samples.items()}
    first = next(iter(traces.values()))
    st.caption(f"{len(traces)} domains · " + " · ".join(f"{d}: {t.num_tokens:,} tokens" for d, t in traces.items()))
    layer = layer_picker(first, "domains_layer")
    index = first.layer_index(layer)

    st.subheader(f"Share of tokens per expert, by domain · {first.layer_label(layer)}")
    mode = st.radio("Count", ["first choice", f"first or any of top-{first.top_k}"], horizontal=True, key="domains_choices")
    picks = 1 if mode == "first choice" else first.top_k
    loads = {domain: metrics.expert_load(trace, picks)[index] for domain, trace in traces.items()}
    show_figure(charts.load_comparison_chart(loads, metrics.uniform_load(first, picks)), "domain_loads")

    st.subheader(f"Jensen–Shannon divergence between domains · {first.layer_label(layer)}")
    show_figure(charts.js_matrix_heatmap(list(loads), metrics.load_js_matrix(list(loads.values()))), "domain_js")

    st.subheader("Adjacent tokens sharing experts, by domain and layer (Table 5)")
    chance = metrics.repeat_chance(first)
    rows = []
    for domain, trace in traces.items():
        rates = metrics.repeat_rates(trace)
        for position, layer_id in enumerate(trace.layer_ids):
            rows.append({"domain": domain, "layer": layer_id} | {
                label: getattr(rates, name)[position] for name, label in REPEAT_LABELS.items()})
    table = pd.DataFrame(rows)
    st.dataframe(table.style.format({label: "{:.1%}" for label in REPEAT_LABELS.values()}), hide_index=True)
    st.caption("Chance for independent uniform routing: " + " · ".join(
        f"{label} {getattr(chance, name)[0]:.1%}" for name, label in REPEAT_LABELS.items()))
    st.download_button("Download table (CSV)", table.to_csv(index=False), file_name="repeat_rates_by_domain.csv",
                       mime="text/csv", key="domains_repeat_csv", on_click="ignore")
