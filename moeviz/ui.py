"""Streamlit glue shared by the pages: the model picker, cached model and traces, text input,
and charts with their CSV downloads. Pages call these and never touch torch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from moeviz import charts, metrics
from moeviz.capture import DEFAULT_MAX_TOKENS, NoRoutersError, trace_text
from moeviz.models import BUNDLED_MODEL, LoadedModel, ModelLoadError, load_model
from moeviz.trace import RoutingTrace

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
MAX_TOKENS_LIMIT = 8192


@dataclass(frozen=True)
class ModelChoice:
    """What the sidebar selected: everything that changes a trace besides the text."""

    source: str
    device: str
    dtype: str
    max_tokens: int


def default_model_source() -> str:
    """The bundled model, unless MOEVIZ_MODEL names another local folder or hub id."""
    return os.environ.get("MOEVIZ_MODEL") or str(BUNDLED_MODEL)


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def cached_model(source: str, device: str, dtype: str) -> LoadedModel:
    return load_model(source, device=device, dtype=dtype)


@st.cache_data(show_spinner="Running the model and capturing its routing…", max_entries=128)
def cached_trace(choice: ModelChoice, text: str) -> RoutingTrace:
    loaded = cached_model(choice.source, choice.device, choice.dtype)
    return trace_text(loaded.model, loaded.tokenizer, text, model_id=loaded.model_id, max_tokens=choice.max_tokens)


def model_sidebar() -> ModelChoice | None:
    """The model picker. Returns None (after saying why) when the model cannot be loaded, so
    the page stays usable and the person can pick another."""
    with st.sidebar:
        st.header("Model")
        source = st.text_input(
            "Local folder or hub id",
            value=default_model_source(),
            key="model_source",
            help="The default is moeviz's own small Mixtral, bundled and offline. "
            "Hub ids such as mistralai/Mixtral-8x7B-v0.1 need a GPU and network access.",
        ).strip()
        device = st.selectbox("Device", ["auto", "cpu", "cuda"], key="model_device")
        dtype = st.selectbox("Weights dtype", ["auto", "float32", "bfloat16", "float16"], key="model_dtype")
        max_tokens = int(st.number_input(
            "Token limit", min_value=1, max_value=MAX_TOKENS_LIMIT, value=DEFAULT_MAX_TOKENS, step=256,
            key="max_tokens", help="Longer texts are cut at this many tokens, with a notice.",
        ))
        try:
            loaded = cached_model(source, device, dtype)
        except (ModelLoadError, NoRoutersError) as error:
            st.error(str(error))
            return None
        show_model_summary(loaded)
    return ModelChoice(source, device, dtype, max_tokens)


def show_model_summary(loaded: LoadedModel) -> None:
    config = loaded.model.config
    st.caption(
        f"**{loaded.model_id}** · {config.model_type} · {config.num_hidden_layers} layers · "
        f"{loaded.parameter_count / 1e6:,.1f} M parameters · {loaded.device}"
    )


def presets() -> dict[str, str]:
    """Held-out samples shipped with the bundled model, by domain."""
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(SAMPLES.glob("*.txt"))}


def text_input(key: str, label: str = "Text", default_preset: str | None = None) -> str:
    """A preset picker and a text area; choosing a preset fills the area, which stays editable."""
    samples = presets()
    names = ["(your own text)"] + list(samples)
    index = names.index(default_preset) if default_preset in names else 0
    preset = st.selectbox(f"{label}: preset", names, index=index, key=f"{key}_preset")
    if st.session_state.get(f"{key}_loaded_preset") != preset:
        st.session_state[f"{key}_loaded_preset"] = preset
        st.session_state[key] = samples.get(preset, st.session_state.get(key, ""))
    return st.text_area(label, key=key, height=150, placeholder="Paste or type text to analyse")


def analyse(choice: ModelChoice, text: str) -> RoutingTrace | None:
    """The trace of `text`, or None after telling the person what is wrong with the input."""
    if not text.strip():
        st.info("Paste or type some text, or pick a preset, to see its routing.")
        return None
    try:
        trace = cached_trace(choice, text)
    except ValueError as error:
        st.error(str(error))
        return None
    show_token_count(trace)
    return trace


def show_token_count(trace: RoutingTrace) -> None:
    st.caption(f"{trace.num_tokens:,} tokens · {len(trace.layer_ids)} MoE layers of {trace.num_layers} · "
               f"{trace.num_experts} experts · top-{trace.top_k} · {trace.scoring} router")
    if trace.truncated:
        st.warning(
            f"The text has {trace.input_token_count:,} tokens; only the first {trace.num_tokens:,} "
            "were analysed (the token limit is in the sidebar)."
        )


def layer_picker(trace: RoutingTrace, key: str, label: str = "Layer") -> int:
    if len(trace.layer_ids) == 1:
        return trace.layer_ids[0]
    # The key carries the layer ids, so a model with other layers starts a fresh slider.
    return st.select_slider(label, options=trace.layer_ids, key=f"{key}-{trace.layer_ids}")


def show_figure(fig, key: str) -> None:
    """A chart with a CSV download of the data it plots."""
    st.plotly_chart(fig, key=key, width="stretch")
    st.download_button(
        "Download data (CSV)", charts.figure_table(fig).to_csv(index=False), file_name=f"{key}.csv",
        mime="text/csv", key=f"{key}_csv", on_click="ignore",
    )


def trace_download(trace: RoutingTrace, key: str) -> None:
    st.download_button(
        "Download trace file", trace.to_bytes(), file_name="routing-trace.safetensors",
        mime="application/octet-stream", key=key, on_click="ignore",
        help="All of this analysis as one safetensors file (no pickle).",
    )


REPEAT_LABELS = {
    "same_first": "same first choice",
    "first_in_topk": "first choice in previous top-k",
    "any_shared": "any shared expert",
}


def repeat_rate_figure(trace: RoutingTrace):
    """Mixtral Table 5 rates by layer, each against its chance level."""
    rates, chance = metrics.repeat_rates(trace), metrics.repeat_chance(trace)
    return charts.repeat_rate_chart(
        trace.layer_ids,
        {label: getattr(rates, name) for name, label in REPEAT_LABELS.items()},
        {label: getattr(chance, name) for name, label in REPEAT_LABELS.items()},
    )
