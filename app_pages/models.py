"""Models: what the loaded model is and how it routes (family, layers, experts, top-k, ...)."""

import pandas as pd
import streamlit as st

from moeviz.ui import model_summary

st.title("Models")
choice = st.session_state.get("model_choice")
if choice is None:
    st.info("No model is loaded: give a local model folder or a hub id in the sidebar.")
else:
    st.caption("Any transformers MoE checkpoint whose routers the model declares: Mixtral, Qwen-MoE, "
               "DeepSeek, OLMoE, DBRX, Jamba, Switch Transformers, GPT-OSS, GraniteMoE, PhiMoE, Llama 4, GLM-4-MoE…")
    rows = model_summary(choice).rows()
    st.table(pd.DataFrame({"value": list(rows.values())}, index=list(rows)))
