"""Compare prompts: do different texts use different experts?"""

import streamlit as st

from moeviz.analysis import metrics
from moeviz.ui import (counted, enough_tokens, layer_picker, load_choices, load_title, repeat_rates, show_figure,
                       trace_from_source)
from moeviz.views import charts

DEFAULT_PRESETS = ["english", "python", "math", "russian"]

st.title("Compare prompts")
choice = st.session_state.get("model_choice")
count = int(st.number_input("Number of texts", min_value=2, max_value=8, value=3, key="prompt_count"))
traces = {}
columns = st.columns(min(count, 4))
for number in range(count):
    with columns[number % len(columns)]:
        preset = DEFAULT_PRESETS[number] if number < len(DEFAULT_PRESETS) else None
        trace = trace_from_source(choice, f"prompt_{number}", default_preset=preset, label=f"Text {number + 1}")
        if trace is not None and enough_tokens(trace, f"Text {number + 1}"):
            traces[f"text {number + 1}"] = trace

shapes = {(trace.num_experts, tuple(trace.layer_ids)) for trace in traces.values()}
if len(shapes) > 1:
    st.error("These traces come from models with different experts or layers; compare traces of one model.")
elif len(traces) >= 2:
    first = next(iter(traces.values()))
    layer = layer_picker(first, "prompts_layer")
    index = first.layer_index(layer)
    picks = load_choices(first.top_k, "prompts_choices")
    loads = {name: metrics.expert_load(counted(trace), picks)[index] for name, trace in traces.items()}

    st.subheader(f"Expert load per text · {first.layer_label(layer)}")
    show_figure(charts.load_comparison_chart(loads, metrics.uniform_load(first, picks),
                                             title=load_title(picks, first.layer_label(layer))), "prompt_loads")

    st.subheader(f"Jensen–Shannon divergence between the texts' loads (bits) · {first.layer_label(layer)}")
    show_figure(charts.js_matrix_heatmap(list(loads), metrics.load_js_matrix(list(loads.values()))), "prompt_js")

    st.subheader("Adjacent tokens with the same first-choice expert")
    rates = {name: repeat_rates(trace).same_first for name, trace in traces.items()}
    chance = {name: metrics.repeat_chance(first).same_first for name in rates}
    show_figure(charts.repeat_rate_chart(first.layer_ids, rates, chance,
                                         layer_labels=[first.layer_label(n) for n in first.layer_ids]),
                "prompt_repeat_rates")
    st.caption(f"Dashed: chance level 1/E = {1 / first.num_experts:.3f}, the same for every text.")
else:
    st.info("Give at least two texts or trace files, each of two tokens or more, to compare them.")
