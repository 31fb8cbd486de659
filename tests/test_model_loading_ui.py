"""Model loading never hangs silently (issue 14, item 6): hub ids fail fast offline or when the
hub does not answer, the failure is remembered for the session and shown in the main area."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

from moeviz.ui import MODEL_FAILURES, endpoint_reachable, hub_unreachable

APP = str(Path(__file__).resolve().parent.parent / "app.py")
HUB_ID = "nobody/no-such-moe-model"


def test_endpoint_reachable_is_a_real_connection_within_the_timeout():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert endpoint_reachable(f"http://127.0.0.1:{server.getsockname()[1]}", 1.0)
    with socket.socket() as closed:  # bound, not listening: connection refused
        closed.bind(("127.0.0.1", 0))
        start = time.monotonic()
        assert not endpoint_reachable(f"https://127.0.0.1:{closed.getsockname()[1]}", 1.0)
        assert time.monotonic() - start < 1.5


def test_hub_id_offline_is_refused_at_once_and_local_folders_pass(tmp_path):
    """conftest sets HF_HUB_OFFLINE=1, as huggingface_hub's `is_offline_mode` reads it."""
    assert "HF_HUB_OFFLINE is set" in hub_unreachable(HUB_ID)
    assert hub_unreachable(str(tmp_path)) is None
    assert hub_unreachable("not a hub id") is None


def test_failed_hub_load_shows_in_the_main_area_and_is_not_retried_on_rerun():
    app = AppTest.from_file(APP, default_timeout=300)
    app.run()
    start = time.monotonic()
    app.sidebar.text_input(key="model_source").set_value(HUB_ID).run()
    assert time.monotonic() - start < 30
    assert not app.exception
    main = [e.value for e in app.main.error]
    assert len(main) == 1 and main[0].startswith("The model could not be loaded: ") and HUB_ID in main[0]
    assert any("HF_HUB_OFFLINE is set" in e.value for e in app.sidebar.error)
    assert list(app.session_state[MODEL_FAILURES]) == [(HUB_ID, "auto", "auto", "auto")]

    app.run()  # another rerun: the remembered failure, shown again
    assert [e.value for e in app.main.error] == main
    app.sidebar.button(key="model_retry").click().run()
    assert [e.value for e in app.main.error] == main  # tried again, failed again
