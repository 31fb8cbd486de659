"""Training: how a model's routing formed, from the routing history its training kept (the
bundled models ship theirs; `moeviz.analysis.training`)."""

from pathlib import Path

import pandas as pd
import streamlit as st

from moeviz.analysis import training
from moeviz.model.loading import BUNDLED_MODELS, bundled_name
from moeviz.ui import show_figure
from moeviz.views import training_charts


@st.cache_data(show_spinner="Reading the training history…", max_entries=8)
def history_of(folder: str, stamp: tuple) -> tuple[training.TrainingHistory, pd.DataFrame | None]:
    """`stamp` (sizes and times of the files) is in the key: a history still being written is read again."""
    return training.read_history(folder), training.read_training_log(folder)


def file_stamp(folder: Path) -> tuple:
    files = (training.MANIFEST, training.ARRAYS, training.LOG)
    return tuple((f, p.stat().st_size, p.stat().st_mtime_ns) for f in files if (p := folder / f).is_file())


def models_with_history() -> dict[str, Path]:
    """The bundled models, and the sidebar's model when it is a local folder with a history."""
    options = {name: folder for name, folder in BUNDLED_MODELS.items() if training.has_history(folder)}
    choice = st.session_state.get("model_choice")
    if choice is not None and not bundled_name(choice.source) and training.has_history(choice.source):
        options[Path(choice.source).name] = Path(choice.source)
    return options


def points_table(h: training.TrainingHistory) -> pd.DataFrame:
    table = pd.DataFrame(h.points)
    names = {"step": "step", "tokens": "tokens seen", "elapsed_s": "seconds", "heldout_loss": "held-out loss",
             "adjacent_same_first": "worst adjacent same first choice", "top_first_share": "worst top first-choice share"}
    return table[[c for c in names if c in table]].rename(columns=names)


st.title("Training")
st.caption("How routing formed while the model trained, on the held-out samples at the points its training "
           "recorded (routing only, no weight checkpoints). Saturation compares each point's top-k with the "
           "final model's (OLMoE Eq. 5); load CV and MaxVio say how unevenly the experts were used.")
options = models_with_history()
if not options:
    st.info("No model here has a training history: the bundled models keep theirs in training_history.json "
            "and .npz, written by scripts/train_bundled.py.")
    st.stop()
name = st.radio("Model", list(options), horizontal=True, key="training_model")
folder = options[name]
try:
    history, log = history_of(str(folder), file_stamp(folder))
except training.HistoryError as error:
    st.error(str(error))
    st.stop()

shared = (f", plus {history.shared_experts} shared expert{'s' if history.shared_experts > 1 else ''}, always active"
          if history.shared_experts else "")
st.markdown(f"**{name}**: {len(history.moe_layers)} MoE layers (layers {', '.join(map(str, history.moe_layers))}), "
            f"top-{history.top_k} of {history.num_experts} routed experts{shared}; "
            f"{len(history.points)} points from step {history.steps[0]:,} to {history.steps[-1]:,}.")
st.dataframe(points_table(history), hide_index=True, key="training_points")

loads = training.expert_loads(history)
show_figure(training_charts.saturation_chart(history, training.saturation(history)), "training_saturation")
left, right = st.columns(2)
with left:
    show_figure(training_charts.load_cv_chart(history, training.load_cv(loads)), "training_load_cv")
with right:
    show_figure(training_charts.max_violation_chart(history, training.max_violation(loads)), "training_max_vio")

layer = st.selectbox("MoE layer", history.moe_layers, key="training_layer")
index = history.moe_layers.index(layer)
if history.biases is not None:
    st.caption("Auxiliary-loss-free balancing (arXiv 2408.15664): after every step each expert's bias rose if it "
               "was under-used and fell if over-used; the bias only chooses experts, never weighs them.")
    left, right = st.columns(2)
    with left:
        show_figure(training_charts.bias_chart(history, index), "training_bias")
    with right:
        show_figure(training_charts.load_over_training_chart(history, loads, index), "training_load")
else:
    show_figure(training_charts.load_over_training_chart(history, loads, index), "training_load")
if log is not None:
    show_figure(training_charts.loss_chart(log), "training_loss")
