"""Corpus run: expert load, Jensen-Shannon divergence and repeat rates per domain, from a run
written by `moeviz corpus` (thousands of documents instead of one sample per domain)."""

import streamlit as st

from moeviz.runs import store as runs
from moeviz.team import PathRefused, read_settings, server_folder
from moeviz.ui import load_choices, load_title, show_figure
from moeviz.views import charts


@st.cache_data(show_spinner="Reading the run…", max_entries=4)
def cached_run(path: str, parts: tuple) -> runs.CorpusRun:
    """`parts` (name, size, mtime of each part file) is in the key so that a run still being
    written is read again as it grows."""
    return runs.read_run(path)


def part_stamps(path: str) -> tuple:
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in runs.part_paths(path))


st.title("Corpus run")
st.caption("Open a run folder written by `moeviz corpus DOCS -o RUN`. Remember that an untrained router "
           "also separates domains: compare with a run of the untrained model.")
path = st.text_input("Run folder (on the machine running moeviz)", key="corpus_run_path",
                     placeholder="/path/to/run").strip()
if not path:
    st.info("Give the folder of a corpus run, e.g. one written by `moeviz corpus corpus.jsonl -o run`.")
    st.stop()
try:
    path = str(server_folder(path, read_settings()))  # team mode: only inside $MOEVIZ_DATA_DIRS
    run = cached_run(path, part_stamps(path))
except (runs.RunError, PathRefused) as error:
    st.error(str(error))
    st.stop()

manifest = run.manifest
domains = [f"{name}: {d.documents:,} documents, {d.num_tokens:,} tokens" for name, d in run.domains.items()]
st.caption(" · ".join([f"**{manifest.model_id}** ({manifest.model_type})", f"{run.documents:,} documents",
                       f"{run.tokens:,} tokens", *domains]))
if len(manifest.layer_ids) > 1:
    layer = st.select_slider("Layer", options=manifest.layer_ids, format_func=manifest.layer_label,
                             key=f"corpus_run_layer-{manifest.layer_ids}")
else:
    layer = manifest.layer_ids[0]
index = manifest.layer_ids.index(layer)
picks = load_choices(manifest.top_k, "corpus_run_choices")
loads = runs.domain_loads(run, picks)

st.subheader(f"Share of tokens per expert, by domain · {manifest.layer_label(layer)}")
show_figure(charts.load_comparison_chart({name: load[index] for name, load in loads.items()},
                                         picks / manifest.num_experts, title=load_title(picks, manifest.layer_label(layer))),
            "corpus_loads")

if len(loads) >= 2:
    st.subheader(f"Jensen–Shannon divergence between domains (bits) · {manifest.layer_label(layer)}")
    show_figure(charts.js_matrix_heatmap(list(loads), runs.domain_js_matrix(loads, index),
                                         title="Jensen–Shannon divergence between domains' expert loads (bits)"), "corpus_js")
else:
    st.info("This run has one domain: give documents a domain (sub-folders, or a \"domain\" field) to compare them.")

st.subheader("Adjacent tokens with the same first-choice expert, within documents")
rates = {name: r.same_first for name, r in runs.domain_repeat_rates(run).items()}
if rates:
    chance = {name: runs.repeat_chance(run).same_first for name in rates}
    show_figure(charts.repeat_rate_chart(manifest.layer_ids, rates, chance,
                                         layer_labels=[manifest.layer_label(n) for n in manifest.layer_ids]),
                "corpus_repeat_rates")
    st.caption(f"Dashed: chance level 1/E = {1 / manifest.num_experts:.3f}. "
               "Pairs across two documents are not counted.")
else:
    st.info("Every document is one token long: there are no adjacent tokens to compare.")
