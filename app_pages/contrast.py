"""Contrast: the experts one set of texts selects more often than another (SteerMoE's risk
difference), and what ablating or forcing them does to the predictions on each set."""

import re

import streamlit as st

from moeviz.analysis import contrast
from moeviz.model.interventions import Intervention, run_intervention
from moeviz.session_cache import session_cached
from moeviz.ui import (
    ModelChoice,
    cached_model,
    cached_trace,
    include_special,
    model_turn,
    plural,
    presets,
    show_figure,
)
from moeviz.views import contrast_charts

DEFAULT_SETS = {"contrast_a": ["python", "c"], "contrast_b": ["english", "german"]}
SEPARATOR = re.compile(r"\n?^---[ \t]*$\n?", re.MULTILINE)  # the line and its line breaks
ACTIONS = {"ablate": "Ablate them (never selected)", "force": "Boost them (forced into every token's selection)"}


@session_cached("Running the text twice: as the model routes it, and steered…")
def cached_steering(choice: ModelChoice, text: str, action: str, experts: tuple[tuple[int, tuple[int, ...]], ...]):
    loaded = cached_model(choice.source, choice.device, choice.dtype, choice.quantization)
    intervention = Intervention(**{action: {layer: list(chosen) for layer, chosen in experts}})
    with model_turn(choice):
        return run_intervention(loaded.model, loaded.tokenizer, text, intervention, model_id=loaded.model_id,
                                max_tokens=choice.max_tokens)


def text_set(key: str, label: str) -> list[str]:
    """The texts of one set: presets, and pasted texts separated by a line `---`."""
    samples = presets()
    chosen = st.multiselect(f"{label}: presets", list(samples), default=DEFAULT_SETS[key], key=f"{key}_presets")
    pasted = st.text_area(f"{label}: your own texts, separated by a line ---", key=f"{key}_own", height=100)
    return [samples[name] for name in chosen] + [t for t in SEPARATOR.split(pasted) if t.strip()]


def traces_of(choice: ModelChoice, texts: list[str], label: str) -> list | None:
    try:
        return [cached_trace(choice, text) for text in texts]
    except ValueError as error:
        st.error(f"{label}: {error}")
        return None


def choose(action: str) -> None:
    st.session_state["contrast_action"] = action


def steer(choice: ModelChoice, result: contrast.Contrast, texts: dict[str, list[str]]) -> None:
    """The controls to ablate or boost the top experts, and their effect on each set."""
    count_column, favoured_column = st.columns(2)
    count = int(count_column.number_input("How many of the top experts", 1, 64, 3, key="contrast_count"))
    favoured = favoured_column.radio("The experts selected more often by", ["A", "B"], horizontal=True,
                                     key="contrast_favoured")
    buttons = st.columns(len(ACTIONS))
    for column, (action, label) in zip(buttons, ACTIONS.items()):
        column.button(label, key=f"contrast_{action}", on_click=choose, args=(action,))
    action = st.session_state.get("contrast_action")
    if action is None:
        st.info("Choose the experts above, then ablate or boost them: the texts of both sets run again.")
        return
    # SteerMoE activates at most k experts per layer; an ablation must leave k to choose from.
    per_layer = result.top_k if action == "force" else result.num_experts - result.top_k
    experts = contrast.top_experts(result, count, favoured, per_layer)
    if not experts:
        st.info(f"No expert is selected more often by set {favoured}.")
        return
    intervention = Intervention(**{action: experts})
    st.subheader(intervention.describe())
    if sum(map(len, experts.values())) < count:
        st.caption(f"Only {plural(sum(map(len, experts.values())), 'expert')} could be taken: set {favoured} selects "
                   f"no others more often, or a layer is full (at most {per_layer} per layer).")
    frozen = tuple((layer, tuple(chosen)) for layer, chosen in experts.items())
    try:
        runs = {name: [cached_steering(choice, text, action, frozen) for text in set_texts]
                for name, set_texts in texts.items()}
        effects = {name: contrast.set_effect([r.baseline_logprobs for r in results], [r.changed_logprobs for r in results])
                   for name, results in runs.items()}
    except ValueError as error:
        st.error(str(error))
        return
    columns = st.columns(len(effects))
    for column, (name, effect) in zip(columns, effects.items()):
        column.metric(f"{name}: mean Δ log p of the next token", f"{effect.mean_delta_logprob:+.4f}")
        column.metric(f"{name}: perplexity", f"{effect.perplexity_after:.3f}", f"{effect.delta_perplexity:+.3f}",
                      delta_color="inverse", help=f"Before: {effect.perplexity_before:.3f}, over "
                      f"{plural(effect.predicted_tokens, 'predicted token')}.")
    show_figure(contrast_charts.set_effect_chart(effects, intervention.describe()), "contrast_effect")


st.title("Contrast")
st.caption("Which experts does set A select more often than set B? The risk difference p_A − p_B of each expert "
           "(SteerMoE, arXiv:2509.09660): p is the share of a set's tokens whose top-k holds the expert.")
choice = st.session_state.get("model_choice")
if choice is None:
    st.info("No model is loaded (see the sidebar): the contrast runs the model on both sets of texts.")
else:
    left, right = st.columns(2)
    with left:
        texts_a = text_set("contrast_a", "Set A")
    with right:
        texts_b = text_set("contrast_b", "Set B")
    if not texts_a or not texts_b:
        st.info("Give each set at least one text: presets, or your own texts separated by a line ---.")
    else:
        traces_a, traces_b = traces_of(choice, texts_a, "Set A"), traces_of(choice, texts_b, "Set B")
        if traces_a is not None and traces_b is not None:
            try:
                result = contrast.contrast(traces_a, traces_b, include_special())
            except ValueError as error:
                st.error(str(error))
                result = None
            if result is not None:
                st.caption(f"Set A: {plural(len(texts_a), 'text')}, {plural(result.tokens_a, 'token')} counted · "
                           f"set B: {plural(len(texts_b), 'text')}, {plural(result.tokens_b, 'token')} counted")
                cut = sum(trace.truncated for trace in [*traces_a, *traces_b])
                if cut:
                    st.caption(f"{plural(cut, 'text')} cut at the token limit ({choice.max_tokens:,} tokens; the "
                               "sidebar sets it): only their first tokens count.")
                st.subheader("Risk difference per layer and expert")
                show_figure(contrast_charts.risk_difference_heatmap(result), "contrast_heatmap")

                st.subheader("The experts that differ most")
                ranking = result.ranking()
                where = st.selectbox("Rank within", ["all layers", *result.layer_labels], key="contrast_where")
                if where != "all layers":
                    ranking = ranking[ranking["layer_label"] == where]
                shown = int(st.number_input("Experts shown", 1, len(ranking), min(12, len(ranking)),
                                            key=f"contrast_shown-{len(ranking)}"))
                show_figure(contrast_charts.top_experts_chart(ranking.head(shown), result.confidence), "contrast_top")
                st.caption("Bars: Newcombe's 95% interval, which takes tokens as independent draws; tokens of one "
                           "text are not, so read it as a lower bound on the uncertainty.")

                st.subheader("Steer the top experts")
                steer(choice, result, {"Set A": texts_a, "Set B": texts_b})
