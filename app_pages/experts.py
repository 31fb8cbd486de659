"""Experts: what each expert does, over the domain samples, a corpus run or trace files (the
expert atlas, `moeviz.analysis.atlas`)."""

from pathlib import Path

import streamlit as st

from moeviz.analysis import atlas as atlases
from moeviz.runs import store as runs
from moeviz.team import read_settings, server_folder
from moeviz.trace import RoutingTrace, TraceFileError
from moeviz.ui import cached_trace, presets, show_figure
from moeviz.views import atlas_charts

COLLECTIONS = ("Domain samples", "Corpus run", "Trace files")


@st.cache_data(show_spinner="Building the atlas of the domain samples…", max_entries=8)
def sample_atlas(choice, excluded: frozenset, phase: str) -> atlases.Atlas:
    traces = {domain: cached_trace(choice, text) for domain, text in presets().items()}
    counted = {name: atlases.counted_mask(trace, excluded) for name, trace in traces.items()}
    return atlases.trace_atlas(traces, counted=counted, phase=phase)


@st.cache_data(show_spinner="Building the atlas of the run (out of core)…", max_entries=4)
def corpus_atlas(path: str, parts: tuple, excluded: frozenset) -> atlases.Atlas:
    """`parts` (name, size, mtime of each part) is in the key: a growing run is read again."""
    return atlases.run_atlas(path, excluded_token_ids=excluded)


@st.cache_data(show_spinner="Building the atlas of the trace files…", max_entries=8)
def upload_atlas(files: tuple, excluded: frozenset, phase: str) -> atlases.Atlas:
    traces = {name: RoutingTrace.from_bytes(data) for name, data in files}
    counted = {name: atlases.counted_mask(trace, excluded) for name, trace in traces.items()}
    return atlases.trace_atlas(traces, {name: Path(name).stem for name in traces}, counted=counted, phase=phase)


def excluded_ids(choice) -> frozenset:
    """The special tokens of the sidebar model's tokenizer, when it is a local folder."""
    return atlases.special_token_ids(choice.source) if choice is not None and Path(choice.source).is_dir() else frozenset()


def collection_atlas(choice, excluded: frozenset, phase: str) -> atlases.Atlas | None:
    kind = st.radio("Collection", COLLECTIONS, horizontal=True, key="experts_collection")
    try:
        if kind == "Domain samples":
            if choice is None:
                st.info("No model is loaded (see the sidebar): open a corpus run or trace files instead.")
                return None
            return sample_atlas(choice, excluded, phase)
        if kind == "Corpus run":
            path = st.text_input("Run folder (on the machine running moeviz)", key="experts_run_path",
                                 placeholder="/path/to/run").strip()
            if not path:
                st.info("Give the folder of a corpus run, e.g. one written by `moeviz corpus corpus.jsonl -o run`.")
                return None
            path = str(server_folder(path, read_settings()))  # team mode: only inside $MOEVIZ_DATA_DIRS
            stamps = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in runs.part_paths(path))
            return corpus_atlas(path, stamps, excluded)
        uploads = st.file_uploader("Trace files saved by moeviz (.safetensors)", type=["safetensors"],
                                   accept_multiple_files=True, key="experts_files")
        if not uploads:
            st.info("Open one or more trace files of one model: each file's name is its domain.")
            return None
        return upload_atlas(tuple((u.name, u.getvalue()) for u in uploads), excluded, phase)
    except (TraceFileError, ValueError) as error:  # RunError is a ValueError
        st.error(str(error))
        return None


st.title("Experts")
st.caption("What each expert does: its top tokens (OLMoE Eq. 8), its share of each domain (Eq. 7), the experts "
           "it fires with (Eq. 6), the contexts where it scores highest; balance per layer; how long a segment "
           "keeps to the same experts (SRP, SCH). Remember that an untrained router also separates domains.")
choice = st.session_state.get("model_choice")
excluded = excluded_ids(choice)
phase = st.session_state.get("experts_phase", "all")
atlas = collection_atlas(choice, excluded, phase)
if atlas is None:
    st.stop()

if atlas.has_generated:
    st.radio("Tokens", atlases.PHASES, horizontal=True, key="experts_phase",
             format_func={"all": "all", "prefill": "prompt only", "generated": "generated only"}.get)
domains = " · ".join(f"{name}: {count:,}" for name, count in atlas.domains.items())
st.caption(f"**{atlas.model_id}** · {sum(atlas.domains.values()):,} tokens counted ({domains}) · "
           f"{atlas.excluded_tokens:,} left out (special tokens {sorted(excluded) or 'none'} of the sidebar "
           f"model's tokenizer{', other phase' if atlas.phase != 'all' else ''}) · "
           f"{atlas.num_experts} experts, top-{atlas.top_k}")

st.subheader("Balance per layer")
layers = atlas_charts.layer_table(atlas)
st.dataframe(layers, hide_index=True, key="experts_layers",
             column_config={name: st.column_config.NumberColumn(format="%.3f") for name in ("MaxVio", "CV", "Jain")})
st.download_button("Download table (CSV)", layers.to_csv(index=False), file_name="experts_layers.csv",
                   mime="text/csv", key="experts_layers_csv", on_click="ignore")
st.caption("MaxVio = (max − mean) / mean tokens per expert (arXiv 2408.15664); CV = std / mean; Jain's index "
           "(1 = balanced, 1/E = one expert takes all); dead: below 1% of the uniform load.")

labels = {layer.layer: layer.label for layer in atlas.layers}
layer_id = (st.select_slider("Layer", options=atlas.layer_ids, format_func=labels.get,
                             key=f"experts_layer-{atlas.layer_ids}") if len(atlas.layer_ids) > 1 else atlas.layer_ids[0])
layer = atlas.layer(layer_id)
uniform = atlas.top_k / atlas.num_experts

st.subheader(f"All experts · {layer.label}")
overview = atlas_charts.expert_table(layer, uniform)
st.dataframe(overview, hide_index=True, key="experts_overview", column_config={
    name: st.column_config.NumberColumn(format="%.3f") for name in overview.columns if overview[name].dtype.kind == "f"})
st.download_button("Download table (CSV)", overview.to_csv(index=False), file_name=f"experts_layer{layer_id}.csv",
                   mime="text/csv", key="experts_overview_csv", on_click="ignore")
st.caption("Click a column header to sort. Domain entropy: of the expert's Eq. 7 shares, 0 = one domain, "
           "1 = all alike. Token entropy over the layer's: below 1, fewer distinct tokens than the text.")
left, right = st.columns(2)
with left:
    show_figure(atlas_charts.layer_load_chart(layer), "experts_load")
with right:
    show_figure(atlas_charts.coactivation_chart(layer), "experts_coactivation")

expert = st.selectbox("Expert", range(atlas.num_experts), key="experts_expert",
                      format_func=lambda e: f"expert {e} ({layer.experts[e].load_share:.1%} of the load)")
card = layer.experts[expert]
st.subheader(f"Expert {expert} · {layer.label}")
stats = st.columns(4)
stats[0].metric("Share of the top-k assignments", f"{card.load_share:.1%}", f"{card.load_share * atlas.num_experts:.2f}× uniform",
                delta_color="off")
stats[1].metric("Tokens routed here", f"{card.count:,}")
stats[2].metric("Domain entropy", f"{card.domain_entropy:.2f}", "0 specialist · 1 generalist", delta_color="off")
stats[3].metric("Token entropy (bits)", f"{card.token_entropy:.2f}", f"layer: {layer.vocabulary_entropy:.2f}",
                delta_color="off")
if card.top_tokens:
    show_figure(atlas_charts.top_tokens_chart(card, uniform), "experts_top_tokens")
else:
    st.info(f"No counted token chose expert {expert} in {layer.label}.")
left, right = st.columns(2)
with left:
    show_figure(atlas_charts.domain_chart(card, uniform), "experts_domains")
with right:
    show_figure(atlas_charts.partners_chart(card), "experts_partners")

st.markdown(f"**Where expert {expert} scores highest** ({atlas.score_kind or 'no scores'})")
if not atlas.score_kind:
    st.info("These traces hold expert ids only (from a serving engine): without router scores there is "
            "no ranking of the tokens an expert took.")
for context in card.contexts:
    st.html(atlas_charts.context_html(context))

st.subheader("Segment consistency")
st.caption("For segments of n consecutive tokens within a document: SRP, the best F1 of predicting that an "
           "expert serves a whole segment when it serves at least j of its tokens; SCH, the share of "
           f"activations a cache of the segment's {atlas.segments.cache_size} busiest experts serves. "
           "Dashed: uniform random routing.")
layer_labels = [layer.label for layer in atlas.layers]
left, right = st.columns(2)
with left:
    show_figure(atlas_charts.segment_chart(atlas.segments, layer_labels, "srp"), "experts_srp")
with right:
    show_figure(atlas_charts.segment_chart(atlas.segments, layer_labels, "sch"), "experts_sch")
