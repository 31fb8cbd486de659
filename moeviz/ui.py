"""Streamlit glue shared by the pages: the model picker, cached model and traces, text input,
and charts with their CSV downloads. Pages call these and never touch torch."""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import urlsplit

import streamlit as st
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from streamlit.runtime.scriptrunner_utils.script_run_context import get_run_yield_check

from moeviz.analysis import metrics, tables
from moeviz.model.capture import DEFAULT_MAX_TOKENS, NoRoutersError, trace_text
from moeviz.model.generation import STOP_REASONS, Sampling, trace_generation
from moeviz.model.loading import (
    BUNDLED_MODEL,
    BUNDLED_MODELS,
    DTYPES,
    LoadedModel,
    ModelLoadError,
    ModelSummary,
    bundled_name,
    describe_model,
    estimate_memory,
    load_model,
)
from moeviz.model.planning import STORAGE_NAMES, MemoryPlan, format_bytes
from moeviz.model.queue import FairQueue, add_interrupt_points, interruptible
from moeviz.model.tokens import context_length
from moeviz.session_cache import session_cached
from moeviz.team import read_settings
from moeviz.trace import RoutingTrace, TraceFileError
from moeviz.views import charts
from moeviz.views.routing_view import URL_PARAMS, routing_view_height, routing_view_html

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
INCLUDE_SPECIAL = "include_special"  # session key of the sidebar's "Count special tokens" toggle
MAX_TOKENS_LIMIT = 8192
WEIGHT_STORAGE = {"auto": "auto", "full precision (the dtype above)": "none", "4-bit (NF4)": "nf4"}
DEVICES = ("auto", "cpu", "cuda")
# The routing policies' widgets, shared by the Routing lab and Intervene.
HASHES = {"token id mod E": "modulo", "fixed random hash": "random"}
UPDATE_SPEEDS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)  # DeepSeek-V3 used 0.001
CHUNK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CAPACITY_RULE = f"C = max(⌈α·k·T/E⌉, {metrics.MIN_CAPACITY})"  # as DeepSpeed sizes it (metrics.expert_capacity)


@dataclass(frozen=True)
class ModelChoice:
    """What the sidebar selected: everything that changes a trace besides the text."""

    source: str
    device: str
    dtype: str
    max_tokens: int
    quantization: str = "auto"  # or "none", or "nf4": experts, attention and embeddings in 4-bit
    context: int | None = None  # positions the model was trained on (None: its config does not say)


def default_model_source() -> str:
    """The bundled model, unless MOEVIZ_MODEL names another local folder or hub id."""
    return os.environ.get("MOEVIZ_MODEL") or str(BUNDLED_MODEL)


def env_default(variable: str, choices) -> int:
    """The index of $variable among `choices` (a selectbox's starting option), 0 when unset;
    an unknown value is reported and ignored."""
    value = os.environ.get(variable)
    if value is None or value in choices:
        return list(choices).index(value) if value else 0
    st.warning(f"${variable} is {value!r}, which is not one of {', '.join(choices)}: starting from {choices[0]}.")
    return 0


@st.cache_data(show_spinner="Reading the model's config…", max_entries=8)
def cached_estimate(source: str, device: str, dtype: str) -> MemoryPlan:
    """The memory estimate made before the model's first load; kept, so that "auto" decides the
    same way on every rerun (free memory drops once the model is loaded)."""
    return estimate_memory(source, device=device, dtype=dtype)


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def cached_model(source: str, device: str, dtype: str, quantization: str = "auto") -> LoadedModel:
    bar = st.empty()  # filled while a 4-bit load streams in, emptied when it is done

    def progress(done: int, total: int) -> None:
        bar.progress(done / total, text=f"Loading the weights in 4-bit: {done} of {total} parts")

    try:
        plan = cached_estimate(source, device, dtype) if quantization == "auto" else None
        loaded = load_model(source, device=device, dtype=dtype, quantization=quantization, plan=plan, progress=progress)
        add_interrupt_points(loaded.model)  # a closed tab's pass stops at the next layer (model_turn)
        return loaded
    finally:
        bar.empty()


@st.cache_resource(max_entries=2)
def cached_queue(source: str, device: str, dtype: str, quantization: str = "auto") -> FairQueue:
    """The queue in front of the model `cached_model` holds for the same arguments."""
    return FairQueue(slots=read_settings().concurrency)


QUEUE_LEFT = "model_queue_left"  # session key: the person pressed "Leave the queue"
_leave_keys = itertools.count()


class LeftQueue(Exception):
    """The person left the queue for the model: the page stops where it waited (app.py says so)."""


def _leave_queue() -> None:
    st.session_state[QUEUE_LEFT] = True


@contextmanager
def model_turn(choice: ModelChoice) -> Iterator[None]:
    """This session's turn on the model: forward passes from all sessions run one at a time
    ($MOEVIZ_CONCURRENCY at a time in team mode), first come first served. While waiting, the
    page shows its place and a "Leave the queue" button; that button, a rerun or a closed tab
    leaves the queue, and a rerun or a closed tab during the forward pass stops it at the next
    MoE layer, freeing the model."""
    if st.session_state.pop(QUEUE_LEFT, False):
        raise LeftQueue("You left the queue for the model, so this page stopped before running it. Change the "
                        "input, or press R to run the page again, to join the queue again.")
    notice, leave = st.empty(), st.empty()
    shown_button = False

    def show_place(place: int) -> None:
        nonlocal shown_button
        ahead = "1 text is" if place == 1 else f"{place:,} texts are"
        notice.info(f"The model is busy with other people's texts: {ahead} in the queue before yours.", icon="⏳")
        if not shown_button:  # once per wait: its key must be unique in the run
            leave.button("Leave the queue", key=f"leave_queue-{next(_leave_keys)}", on_click=_leave_queue)
            shown_button = True

    yield_check = get_run_yield_check()
    try:
        with cached_queue(choice.source, choice.device, choice.dtype, choice.quantization).turn(show_place, yield_check):
            notice.empty()
            leave.empty()
            with interruptible(yield_check):  # a rerun or a closed tab stops the pass between layers
                yield
    finally:
        notice.empty()
        leave.empty()


# Traces are kept in bytes-bounded memory, per session and in total (moeviz.session_cache).
@session_cached("Running the model and capturing its routing…")
def cached_trace(choice: ModelChoice, text: str) -> RoutingTrace:
    loaded = cached_model(choice.source, choice.device, choice.dtype, choice.quantization)
    with model_turn(choice):
        return trace_text(loaded.model, loaded.tokenizer, text, model_id=loaded.model_id, max_tokens=choice.max_tokens)


@session_cached("Generating, capturing the routing of every new token…")
def cached_generation(choice: ModelChoice, prompt: str, sampling: Sampling) -> RoutingTrace:
    loaded = cached_model(choice.source, choice.device, choice.dtype, choice.quantization)
    with model_turn(choice):
        return trace_generation(
            loaded.model, loaded.tokenizer, prompt, sampling, model_id=loaded.model_id, max_tokens=choice.max_tokens
        )


def model_sidebar() -> ModelChoice | None:
    """The sidebar: the model picker and what the statistics count. Returns None (after
    saying why) when the model cannot be loaded, so the page stays usable and the person can
    pick another."""
    with st.sidebar:
        choice = _model_picker()
        st.header("Statistics")
        st.toggle(
            "Count special tokens", key=INCLUDE_SPECIAL,
            help="Special tokens (BOS, EOS, PAD) are routed alike in every text, so statistics leave them out "
            "and the token view shows them grey. Turn this on to count them too.",
        )
    if choice is None and model_failure():  # where the person is looking, not only in the sidebar
        st.error(f"The model could not be loaded: {model_failure()} Pick another model in the sidebar; "
                 "a trace file opens without one.")
    return choice


OTHER_MODEL = "another model (folder or hub id below)"


def _source_picker() -> str:
    """The bundled models by name, or any folder or hub id. Choosing a name fills the field;
    the field is what counts, and a typed path switches the name to "another model"."""
    st.session_state.setdefault("model_source", default_model_source())
    st.session_state["model_bundled"] = bundled_name(st.session_state["model_source"].strip()) or OTHER_MODEL
    st.selectbox("Bundled model", [*BUNDLED_MODELS, OTHER_MODEL], key="model_bundled", on_change=_fill_source,
                 help="moeviz's own small models, offline: a Mixtral-style one (softmax top-2 of 8 experts) and "
                 "a DeepSeek-style one (top-4 of 32 fine-grained experts beside a shared expert, sigmoid scores, "
                 "bias-balanced selection).")
    return st.text_input(
        "Local folder or hub id", key="model_source",
        help="Hub ids such as mistralai/Mixtral-8x7B-v0.1 need a GPU and network access.",
    ).strip()


def _fill_source() -> None:
    folder = BUNDLED_MODELS.get(st.session_state["model_bundled"])
    if folder is not None:
        st.session_state["model_source"] = str(folder)


def _model_picker() -> ModelChoice | None:
    st.header("Model")
    team = read_settings()
    if team.enabled:  # only the models whoever runs the server allowed
        name = st.selectbox("Model", list(team.model_sources), key="model_name")
        source = team.model_sources[name]
    else:
        source = _source_picker()
    device = st.selectbox("Device", DEVICES, index=env_default("MOEVIZ_DEVICE", DEVICES), key="model_device")
    dtype = st.selectbox("Weights dtype", list(DTYPES), index=env_default("MOEVIZ_DTYPE", list(DTYPES)),
                         key="model_dtype")
    quantization = "auto"
    if find_spec("bitsandbytes"):  # a choice only where bitsandbytes can deliver 4-bit
        storages = list(WEIGHT_STORAGE.values())
        quantization = WEIGHT_STORAGE[st.selectbox(
            "Weights storage", list(WEIGHT_STORAGE), key="model_quantization",
            index=env_default("MOEVIZ_QUANTIZATION", storages),
            help="auto keeps full precision when the weights fit the device with 10% of its free memory "
            "to spare, else loads 4-bit. 4-bit (NF4) stores the experts, attention and embeddings in about "
            "4.1 bits a weight (a quarter of 16-bit), loading layer by layer; routers stay in the dtype "
            "above, which is also the compute dtype. It is for big models on a GPU: on the CPU it is "
            "slower than 16-bit.",
        )]
    loaded = _load_once(source, device, dtype, quantization)
    if loaded is None:
        return None
    context = context_length(loaded.model.config)
    limit = team.max_tokens if team.enabled else MAX_TOKENS_LIMIT
    default = min(DEFAULT_MAX_TOKENS, context or DEFAULT_MAX_TOKENS, limit)
    # The key carries the default, so a model with another context starts from its own.
    max_tokens = int(st.number_input(
        "Token limit", min_value=1, max_value=limit, value=default, step=256, key=f"max_tokens-{default}",
        help="Longer texts are cut at this many tokens, with a notice. The default is the model's trained "
        f"context ({context:,} positions) or {DEFAULT_MAX_TOKENS:,}, whichever is smaller." if context else
        "Longer texts are cut at this many tokens, with a notice.",
    ))
    show_model_summary(loaded)
    return ModelChoice(source, device, dtype, max_tokens, quantization, context)


MODEL_FAILURES = "model_failures"  # session key: {(source, device, dtype, quantization): why it failed}
HUB_CHECK_SECONDS = 3.0


def _load_once(source: str, device: str, dtype: str, quantization: str) -> LoadedModel | None:
    """The model, or None after saying why not. A failure is remembered for the session, so a
    rerun (any widget change) does not pay for it again; "Try again" forgets it."""
    failures = st.session_state.setdefault(MODEL_FAILURES, {})
    attempt = (source, device, dtype, quantization)
    if attempt not in failures:
        try:
            unreachable = hub_unreachable(source)
            if unreachable:
                raise ModelLoadError(unreachable)
            show_estimate(cached_estimate(source, device, dtype), quantization)
            return cached_model(source, device, dtype, quantization)
        except (ModelLoadError, NoRoutersError) as error:
            failures[attempt] = str(error)
    st.error(failures[attempt])
    if st.button("Try again", key="model_retry"):
        del failures[attempt]
        st.rerun()
    return None


def model_failure() -> str | None:
    """Why the model the sidebar names could not be loaded in this session, or None."""
    failures = st.session_state.get(MODEL_FAILURES, {})
    attempt = (st.session_state.get("model_source", "").strip(), st.session_state.get("model_device"),
               st.session_state.get("model_dtype"))
    return next((why for key, why in failures.items() if key[:3] == attempt), None)


def hub_unreachable(source: str, timeout: float = HUB_CHECK_SECONDS) -> str | None:
    """Why hub id `source` cannot be fetched now, or None (a local folder, a model in the local
    cache, or a reachable hub). Honours HF_HUB_OFFLINE; otherwise one connection to the hub
    within `timeout` seconds, instead of transformers' retries (48 s measured with no network)."""
    if _looks_local(source):
        return None
    try:
        if isinstance(try_to_load_from_cache(source, "config.json"), str):
            return None
    except ValueError:  # not a hub id either: load_model says what a source must be
        return None
    if hf_constants.is_offline_mode():
        return (f"{source!r} is not in the local model cache and HF_HUB_OFFLINE is set, so moeviz does not "
                "download it. Give a local folder, or unset HF_HUB_OFFLINE on a machine with network access.")
    if not endpoint_reachable(hf_constants.ENDPOINT, timeout):
        return (f"The model hub ({hf_constants.ENDPOINT}) did not answer within {timeout:g} s, and {source!r} is "
                "not in the local cache. Check the network (or HF_ENDPOINT), or give a local model folder.")
    return None


def _looks_local(source: str) -> bool:
    path = Path(source).expanduser()
    return path.is_absolute() or source.startswith((".", "~")) or path.exists()


def endpoint_reachable(url: str, timeout: float) -> bool:
    """True when a TCP connection to `url`'s host opens within `timeout` seconds (name lookup
    included: it runs in a thread, since `getaddrinfo` has no timeout of its own)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)

    def connect() -> None:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(connect).result(timeout=timeout)
        return True
    except (OSError, FutureTimeout):
        return False
    finally:
        pool.shutdown(wait=False)


def show_estimate(plan: MemoryPlan, quantization: str) -> None:
    """What the weights need in each storage against the free memory, and what auto picks."""
    nf4 = format_bytes(plan.nf4_bytes) if plan.nf4_bytes is not None else "not possible"
    chosen = (f"auto picks {plan.auto_name}" if quantization == "auto"
              else f"{STORAGE_NAMES[quantization]} as chosen (auto: {plan.auto_name})")
    st.caption(
        f"Weights: {format_bytes(plan.full_bytes)} in {plan.dtype}, {nf4} in 4-bit · "
        f"{format_bytes(plan.free_bytes)} free on {plan.device} · {chosen}"
    )


def show_model_summary(loaded: LoadedModel) -> None:
    summary = describe_model(loaded)
    facts = summary.rows()
    shared = f" + {summary.shared_experts} shared" if summary.shared_experts else ""
    storage = f" ({summary.quantization})" if summary.quantization != "none" else ""
    st.caption(
        f"**{summary.model_id}** · {summary.family} · {summary.layers} layers ({len(summary.moe_layers)} MoE) · "
        f"{summary.experts} experts{shared}, top-{summary.top_k} · {facts['Parameters']} parameters · "
        f"{facts['Size']} of weights{storage} · {summary.device}"
    )


def model_summary(choice: ModelChoice) -> ModelSummary:
    """The facts of the model the sidebar loaded (the Models page)."""
    return describe_model(cached_model(choice.source, choice.device, choice.dtype, choice.quantization))


def presets() -> dict[str, str]:
    """Held-out samples shipped with the bundled model, by domain."""
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(SAMPLES.glob("*.txt"))}


OWN_TEXT = "(your own text)"


def text_input(key: str, label: str = "Text", default_preset: str | None = None) -> str:
    """A preset picker and a text area; choosing a preset fills the area, which stays editable.
    Editing the text switches the picker to "(your own text)", and that text is kept: choosing
    a preset and then "(your own text)" again brings it back. The choice and the text survive
    visits to other pages, and the preset's name is in the URL (never the text)."""
    samples = presets()
    names = [OWN_TEXT, *samples]
    preset_key, own, url = f"{key}_preset", f"{key}_own", url_preset_name(key)
    from_url = st.query_params.get(url)
    start = from_url if from_url in samples else default_preset if default_preset in names else OWN_TEXT
    keep_widget_state(preset_key, start)
    keep_widget_state(key, samples.get(st.session_state[preset_key], st.session_state.get(own, "")))

    def preset_chosen() -> None:
        st.session_state[key] = samples.get(st.session_state[preset_key], st.session_state.get(own, ""))

    def text_edited() -> None:
        if st.session_state[key] != samples.get(st.session_state[preset_key]):
            st.session_state[own] = st.session_state[key]
            st.session_state[preset_key] = OWN_TEXT

    preset = st.selectbox(f"{label}: preset", names, key=preset_key, on_change=preset_chosen)
    text = st.text_area(label, key=key, height=150, placeholder="Paste or type text to analyse", on_change=text_edited)
    remember_widget_state(preset_key, key)
    if preset in (OWN_TEXT, default_preset):  # the page's default needs no parameter
        st.query_params.pop(url, None)
    else:
        st.query_params[url] = preset
    return text


def url_preset_name(key: str) -> str:
    """The URL parameter of a text input's preset: "preset" for a page's text, else per input."""
    return "preset" if key.endswith("_text") else f"{key}_preset"


def keep_widget_state(key: str, default) -> None:
    """Give widget `key` its value from before a visit to another page (Streamlit drops the state
    of widgets a run does not draw), else `default`. Call before drawing the widget."""
    if key not in st.session_state:
        st.session_state[key] = st.session_state.get(f"{key}_kept", default)


def remember_widget_state(*keys: str) -> None:
    """Keep widgets' values where Streamlit does not drop them (see `keep_widget_state`)."""
    for key in keys:
        st.session_state[f"{key}_kept"] = st.session_state[key]


SOURCES = ("Text", "Generate from a prompt", "Trace file")


def trace_from_source(choice: ModelChoice | None, key: str, default_preset: str | None = None,
                      label: str = "Text") -> RoutingTrace | None:
    """A trace from pasted text, from a generation, or from an uploaded trace file (which
    needs no model). Returns None after telling the person what is missing or wrong."""
    keep_widget_state(f"{key}_source", SOURCES[0])
    source = st.radio("Source", SOURCES, horizontal=True, key=f"{key}_source", label_visibility="collapsed")
    remember_widget_state(f"{key}_source")
    if source == "Trace file":
        return uploaded_trace(key)
    if choice is None:
        st.info("No model is loaded (see the sidebar). You can still open a trace file.")
        return None
    if source == "Generate from a prompt":
        return generated_trace(choice, key)
    return analyse(choice, text_input(key, label=label, default_preset=default_preset))


def generated_trace(choice: ModelChoice, key: str) -> RoutingTrace | None:
    prompt = st.text_area("Prompt", key=f"{key}_prompt", height=100, value="Question: What is 7 + 5?\nAnswer:")
    steps, temperature, seed = st.columns(3)
    sampling = Sampling(
        max_new_tokens=int(steps.number_input("New tokens", 1, 1024, 48, key=f"{key}_new_tokens")),
        temperature=float(temperature.slider("Temperature (0 = greedy)", 0.0, 2.0, 0.0, 0.1, key=f"{key}_temperature")),
        seed=int(seed.number_input("Seed", 0, 2**31 - 1, 0, key=f"{key}_seed")),
    )
    if not prompt.strip():
        st.info("Type a prompt to generate from.")
        return None
    try:
        trace = cached_generation(choice, prompt, sampling)
    except ValueError as error:
        st.error(str(error))
        return None
    show_token_count(trace, choice.context)
    generated = trace.num_tokens - trace.generated_from
    st.caption(f"{plural(generated, 'token')} generated (marked in the charts); it stopped because "
               f"{STOP_REASONS.get(trace.stop_reason, 'of a reason this moeviz does not know')}.")
    return trace


def uploaded_trace(key: str) -> RoutingTrace | None:
    """The trace file uploaded here, kept for the session: it is still open after a visit to
    another page (Streamlit's uploader forgets its file then) until another file replaces it
    or the person removes it."""
    file_key, kept = f"{key}_file", f"{key}_upload"

    def changed() -> None:
        upload = st.session_state[file_key]
        st.session_state[kept] = (upload.name, upload.getvalue()) if upload is not None else None

    upload = st.file_uploader("Trace file saved by moeviz (.safetensors)", type=["safetensors"], key=file_key,
                              on_change=changed)
    if upload is not None:
        name, data = upload.name, upload.getvalue()
    elif st.session_state.get(kept):
        name, data = st.session_state[kept]
        st.caption(f"Still open: {name}, uploaded earlier. Upload another file to replace it.")
    else:
        st.info("Open a trace file downloaded from moeviz or written by `moeviz trace`: no model is needed.")
        return None
    try:
        trace = RoutingTrace.from_bytes(data)
    except TraceFileError as error:
        st.error(f"{name}: {error}")
        return None
    engine = f" Expert ids recorded by {ENGINE_NAMES.get(trace.engine, trace.engine)}." if trace.engine else ""
    st.caption(f"Trace of **{trace.model_id}** ({trace.model_type}), opened from {name}.{engine}")
    show_token_count(trace)
    return trace


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
    show_token_count(trace, choice.context)
    return trace


ENGINE_NAMES = {"vllm": "vLLM", "sglang": "SGLang"}


SCORING_UNKNOWN = (
    "moeviz could not tell how this model's router ({router}) turns its logits into scores: none of softmax, "
    "sigmoid, sqrt-softplus or ready probabilities matches the weights it gave its experts."
)


def router_scores_shown(trace: RoutingTrace, what: str, logits_suffice: bool = False) -> bool:
    """True when `trace` has the router scores `what` is computed from; otherwise an `st.info`
    notice in its place says why they are missing, and False. Serving engines (vLLM, SGLang)
    report expert ids only; a router whose scoring is unknown has raw logits only, which
    `what` may show (`logits_suffice`) under a warning that says so."""
    if trace.has_scores:
        return True
    if trace.has_logits and trace.has_weights:  # scoring unknown
        notice = SCORING_UNKNOWN.format(router=trace.router_class or trace.model_type)
        if logits_suffice:
            st.warning(f"{notice} Shown: the raw router logits, not probabilities.")
            return True
        st.info(f"{what} needs router scores, which moeviz does not guess. {notice}")
        return False
    engine = ENGINE_NAMES.get(trace.engine, trace.engine or "a serving engine")
    st.info(
        f"{what} needs router logits and weights, which this trace does not have: it holds the expert ids "
        f"{engine} reported, and no scores. Load, repeat rates, co-activation and transitions are counted "
        "from the ids; trace the text with moeviz itself to see router probabilities."
    )
    return False


def plural(count: int, noun: str) -> str:
    """ "1 token", "2 tokens", "1,024 tokens"."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def show_token_count(trace: RoutingTrace, context: int | None = None) -> None:
    """The trace in one line: tokens counted (special ones apart), layers, experts; warnings
    for a text cut at the token limit or longer than the model's trained `context`."""
    special = int(trace.special.sum())
    if include_special():
        tokens = plural(trace.num_tokens, "token") + (f" · {plural(special, 'special token')} counted" if special else "")
    else:
        tokens = plural(trace.num_tokens - special, "token") + (
            f" · {plural(special, 'special token')} left out of the statistics" if special else "")
    shared = f" + {trace.shared_experts} shared (always active)" if trace.shared_experts else ""
    st.caption(f"{tokens} · {len(trace.layer_ids)} MoE layers of {trace.num_layers} · "
               f"{trace.num_experts} experts{shared} · top-{trace.top_k} · {trace.scoring} router")
    if trace.truncated:
        st.warning(
            f"The text has {trace.input_token_count:,} tokens; only the first {trace.num_tokens:,} "
            "were analysed (the token limit is in the sidebar)."
        )
    if context is not None and trace.num_tokens > context:
        st.warning(
            f"This text has {trace.num_tokens:,} tokens, more than the {context:,} positions the model was "
            f"trained on: routing past token {context:,} is outside what it learnt. Lower the token limit "
            f"to {context:,} to stay within it."
        )


# -- what the statistics count ---------------------------------------------------------------


def include_special() -> bool:
    """The sidebar's "Count special tokens" toggle."""
    return bool(st.session_state.get(INCLUDE_SPECIAL, False))


def counted(trace: RoutingTrace) -> RoutingTrace:
    """`trace` restricted to the tokens the statistics count (`metrics.counted`)."""
    return metrics.counted(trace, include_special())


def repeat_rates(trace: RoutingTrace) -> metrics.RepeatRates:
    """Repeat rates of the whole `trace` over the pairs the statistics count."""
    return metrics.repeat_rates(trace, include_special())


def routing_view(trace: RoutingTrace) -> None:
    """The in-browser routing view of every layer (`moeviz.views.routing_view`), special tokens
    grey when the statistics leave them out. It opens at the layer and pinned token the URL
    names (`?view_layer=3&token=17`, written by the view itself); values that do not fit this
    trace are ignored."""
    left_out = ~metrics.counted_tokens(trace, include_special())
    layer, token = (url_number(name) for name in URL_PARAMS)
    layer = layer if layer in trace.layer_ids else None
    token = token if token is not None and token < trace.num_tokens else None
    html_iframe(routing_view_html(trace, layer, left_out=left_out, pinned=token), height=routing_view_height(trace),
                alt="Routing view")


def html_iframe(html: str, **iframe_options) -> None:
    """`st.iframe` of an HTML document, without keeping the document afterwards. Streamlit first
    asks `urllib.parse.urlparse` whether the string is a URL, and Python (3.11+) caches the last
    128 strings `urlsplit` saw, with their parts: every routing view a server drew (0.1 MB at
    1,000 tokens, megabytes at 8,000) stayed in memory twice over (the string and its parts)
    until 128 newer ones pushed it out (issue 18: +24 MiB after 16 sessions). Clearing that
    cache drops them."""
    st.iframe(html, **iframe_options)
    urlsplit.cache_clear()


def enough_tokens(trace: RoutingTrace, what: str = "This text") -> bool:
    """True when `trace` has two adjacent counted tokens, the least every statistic needs;
    otherwise an `st.info` says so, and False."""
    if metrics.counted_pairs(trace, include_special()).any():
        return True
    kept = int(metrics.counted_tokens(trace, include_special()).sum())
    special = "" if include_special() else " (special tokens such as BOS are left out; the sidebar can count them)"
    st.info(
        f"{what} has {plural(kept, 'token')} to count{special}: statistics need at least two adjacent tokens. "
        "Type a longer text, or raise the token limit in the sidebar."
    )
    return False


def load_choices(top_k: int, key: str) -> int:
    """The one control for how expert load is counted, wherever it is: the first choice of
    each token, or all its top-k picks. Returns the picks per token counted (1 or k)."""
    options = {"first choice": 1, f"all top-{top_k} picks": top_k}
    label = st.radio("Count load by", list(options), horizontal=True, key=f"{key}-{top_k}",
                     help="First choice: each token counts once, for its highest-weighted expert. "
                     f"All top-{top_k} picks: each token counts for every expert it uses, so loads sum to {top_k}.")
    return options[label]


def load_title(picks: int, where: str) -> str:
    """A load chart's title, saying what was counted."""
    counted_as = "by first choice" if picks == 1 else f"counting all top-{picks} picks"
    return f"Share of tokens per expert, {counted_as} · {where}"


def url_number(name: str) -> int | None:
    """The URL's query parameter `name` as a whole number >= 0, or None (absent or not one)."""
    value = st.query_params.get(name, "")
    return int(value) if len(value) <= 9 and value.isascii() and value.isdigit() else None


def layer_picker(trace: RoutingTrace, key: str, label: str = "Layer") -> int:
    """A layer slider, its layer in the URL (`?layer=3`), so a link reopens the same view."""
    if len(trace.layer_ids) == 1:
        return trace.layer_ids[0]
    # The key carries the layer ids, so a model with other layers starts a fresh slider.
    slider = f"{key}-{trace.layer_ids}"
    wanted = url_number("layer")
    if slider not in st.session_state and wanted in trace.layer_ids:
        st.session_state[slider] = wanted  # a shared link opens at its layer
    layer = st.select_slider(label, options=trace.layer_ids, format_func=trace.layer_label, key=slider)
    st.query_params["layer"] = str(layer)
    return layer


def show_figure(fig, key: str) -> None:
    """A chart with a CSV download of the data it plots (`charts.figure_table`); a chart of one
    layer names it in the file, e.g. probabilities-layer-3.csv."""
    st.plotly_chart(fig, key=key, width="stretch")
    st.download_button(
        # A callable: the CSV is built when someone clicks, not on every rerun (a slider move).
        "Download data (CSV)", lambda: charts.figure_table(fig).to_csv(index=False), file_name=figure_file_name(fig, key),
        mime="text/csv", key=f"{key}_csv", on_click="ignore",
    )


def figure_file_name(fig, key: str) -> str:
    meta = fig.layout.meta if isinstance(fig.layout.meta, dict) else {}
    return f"{key}-layer-{meta['layer']}.csv" if "layer" in meta else f"{key}.csv"


def trace_download(trace: RoutingTrace, key: str) -> None:
    """The trace file, and the per-token table (`tables.token_table`) as CSV and Parquet."""
    st.download_button(
        "Download trace file", trace.to_bytes(), file_name="routing-trace.safetensors",
        mime="application/octet-stream", key=key, on_click="ignore",
        help="All of this analysis as one safetensors file (no pickle).",
    )
    full = trace.has_scores and st.checkbox(
        "Add the full router distribution to the table", key=f"{key}_full",
        help=f"One column per expert (router_prob_0 … router_prob_{trace.num_experts - 1}) on every row.")
    described = ("One row per token × layer × top-k rank: position, token_id, token (raw text), layer, layer_label, "
            "rank, expert, weight, router_prob" + ("" if trace.has_scores else " (empty: this trace has no scores)"))
    csv, parquet = st.columns(2)
    csv.download_button("Download per-token table (CSV)", lambda: tables.to_csv(tables.token_table(trace, full)),
                        file_name="routing-tokens.csv", mime="text/csv", key=f"{key}_table_csv", on_click="ignore",
                        help=described)
    parquet.download_button("Download per-token table (Parquet)", lambda: tables.to_parquet(tables.token_table(trace, full)),
                            file_name="routing-tokens.parquet", mime="application/vnd.apache.parquet",
                            key=f"{key}_table_parquet", on_click="ignore", help=described)


REPEAT_LABELS = {
    "same_first": "same first choice",
    "first_in_topk": "first choice in previous top-k",
    "any_shared": "any shared expert",
}


def repeat_rate_figure(trace: RoutingTrace):
    """Mixtral Table 5 rates by layer, over the pairs the statistics count, each against its
    chance level."""
    rates, chance = repeat_rates(trace), metrics.repeat_chance(trace)
    return charts.repeat_rate_chart(
        trace.layer_ids,
        {label: getattr(rates, name) for name, label in REPEAT_LABELS.items()},
        {label: getattr(chance, name) for name, label in REPEAT_LABELS.items()},
        layer_labels=[trace.layer_label(n) for n in trace.layer_ids],
    )
