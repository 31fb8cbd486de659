"""moeviz: see how a Mixture-of-Experts model routes every token. Navigation only.

Pages live in app_pages/, not pages/: a pages/ folder switches Streamlit (and AppTest reruns)
to the legacy automatic multipage mode, which bypasses this file's st.navigation.
"""

import streamlit as st

from moeviz.signin import gate
from moeviz.ui import QUEUE_LEFT, LeftQueue, model_sidebar

st.set_page_config(page_title="moeviz", page_icon="🔀", layout="wide")
if not gate():  # team mode: nothing below runs before sign-in
    st.stop()

pages = st.navigation({
    "Analyse": [
        st.Page("app_pages/analyse.py", title="Analyse text", default=True),
        st.Page("app_pages/experts.py", title="Experts"),
    ],
    "Compare": [
        st.Page("app_pages/compare_layers.py", title="Compare layers"),
        st.Page("app_pages/compare_prompts.py", title="Compare prompts"),
        st.Page("app_pages/domains.py", title="Domains"),
        st.Page("app_pages/corpus_run.py", title="Corpus run"),
        st.Page("app_pages/compare_variants.py", title="Compare variants"),
    ],
    "Lab": [
        st.Page("app_pages/routing_lab.py", title="Routing lab"),
        st.Page("app_pages/intervene.py", title="Intervene"),
        st.Page("app_pages/contrast.py", title="Contrast"),
    ],
    "Model": [
        st.Page("app_pages/models.py", title="Models"),
        st.Page("app_pages/training.py", title="Training"),
    ],
})
st.session_state["model_choice"] = model_sidebar()
try:
    pages.run()
except LeftQueue as left:
    st.info(str(left), icon="🚶")
finally:
    st.session_state.pop(QUEUE_LEFT, None)  # a press that came after the wait ended means nothing
