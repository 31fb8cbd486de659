"""Compare variants: one text through two variants of a model (16-bit and 4-bit, or two checkpoints
that share a tokenizer). Where do they route alike, and how do their predictions differ?"""

import dataclasses
from contextlib import ExitStack

import numpy as np
import streamlit as st

from moeviz.analysis import effects
from moeviz.api import compare_variants
from moeviz.model.planning import STORAGE_NAMES
from moeviz.session_cache import session_cached
from moeviz.team import read_settings
from moeviz.ui import (
    ModelChoice,
    cached_model,
    hub_unreachable,
    include_special,
    layer_picker,
    model_turn,
    show_figure,
    show_token_count,
    text_input,
)
from moeviz.views import variant_charts

SAME_NF4, SAME_FULL, OTHER = ("the same model, 4-bit (NF4)", "the same model, full precision",
                              "another local model or checkpoint")


@session_cached("Running the text through both models…")
def cached_comparison(choice_a: ModelChoice, choice_b: ModelChoice, text: str):
    loaded = [cached_model(c.source, c.device, c.dtype, c.quantization) for c in (choice_a, choice_b)]
    with ExitStack() as turns:
        # Both models' turns, always taken in the same order: two sessions comparing the same
        # pair the other way round must not each hold one model and wait for the other.
        queues = {(c.source, c.device, c.dtype, c.quantization): c for c in (choice_a, choice_b)}
        for key in sorted(queues):  # one turn per queue: the same model twice is one queue
            turns.enter_context(model_turn(queues[key]))
        return compare_variants(*loaded, text, max_tokens=choice_a.max_tokens)


def chosen_b(choice: ModelChoice) -> ModelChoice | None:
    """Model B, as the person picks it."""
    kind = st.radio("Model B", [SAME_NF4, SAME_FULL, OTHER], horizontal=True, key="variants_b")
    team = read_settings()
    if kind == OTHER and team.enabled:  # only the models whoever runs the server allowed
        name = st.selectbox("Model B", list(team.model_sources), key="variants_b_name")
        return dataclasses.replace(choice, source=team.model_sources[name], quantization="auto")
    if kind == OTHER:
        source = st.text_input("Model B: a local folder or hub id", key="variants_b_source",
                               placeholder="path/to/checkpoint")
        if not source.strip():
            st.info("Type where model B is: a folder with its config, weights and tokenizer.")
            return None
        unreachable = hub_unreachable(source.strip())
        if unreachable:
            st.error(unreachable)
            return None
        return dataclasses.replace(choice, source=source.strip(), quantization="auto")
    return dataclasses.replace(choice, quantization="nf4" if kind == SAME_NF4 else "none")


def storage(choice: ModelChoice) -> str:
    stored = cached_model(choice.source, choice.device, choice.dtype, choice.quantization).quantization
    return STORAGE_NAMES.get(stored, stored)


st.title("Compare variants")
choice = st.session_state.get("model_choice")
if choice is None:
    st.info("No model is loaded (see the sidebar): model A is the sidebar's model.")
else:
    choice_b = chosen_b(choice)
    text = text_input("variants_text", default_preset="english")
    if choice_b is not None and text.strip():
        try:
            comparison = cached_comparison(choice, choice_b, text)
            st.caption(f"Model A (the sidebar's): {choice.source}, {storage(choice)} · model B: {choice_b.source}, "
                       f"{storage(choice_b)}")
        except ValueError as error:  # a model that does not load, tokenizers that disagree, ...
            st.error(str(error))
            comparison = None
        if comparison is not None:
            comparison = dataclasses.replace(comparison, include_special=include_special())
            show_token_count(comparison.a, choice.context)
            if not comparison.counted.any():
                st.info("This text has only special tokens, which the statistics leave out (the sidebar can count "
                        "them). Type some text.")
                st.stop()
            columns = st.columns(4)
            columns[0].metric("First-choice agreement", f"{comparison.first_choice_agreement.mean():.1%}",
                              help="The mean over MoE layers of the share of tokens whose first choice is the same.")
            columns[1].metric(f"Top-{comparison.a.top_k} overlap", f"{comparison.topk_overlap.mean():.1%}",
                              help="The mean over MoE layers and tokens of the experts both pick, over k.")
            if comparison.a.num_tokens >= 2:
                columns[2].metric("Mean Δ log p (B − A)", f"{comparison.delta_logprobs.mean():+.4f}",
                                  help="log p_B − log p_A of each actual next token, averaged over the text.")
                before, after = effects.perplexity(comparison.logprobs_a), effects.perplexity(comparison.logprobs_b)
                columns[3].metric("Perplexity B (A)", f"{after:.3f}", f"{after - before:+.3f}", delta_color="inverse",
                                  help=f"Model A: {before:.3f}")

            st.subheader("Agreement per layer")
            show_figure(variant_charts.agreement_chart(comparison), "variants_agreement")

            st.subheader("Where the first choices differ")
            layer = layer_picker(comparison.a, "variants_layer")
            st.html(variant_charts.disagreement_view_html(comparison, layer))

            if comparison.a.num_tokens >= 2:
                st.subheader("Each token: likelier under A or under B")
                show_figure(variant_charts.delta_logprob_chart(comparison), "variants_delta")
                largest = int(np.argmax(np.abs(comparison.delta_logprobs)))
                st.caption(f"The largest change is at position {largest + 1}, the token "
                           f"{comparison.a.tokens[largest + 1]!r}.")
