"""Closed tabs' sessions end once they can no longer reconnect (moeviz.session_storage)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.runtime.memory_session_storage import MemorySessionStorage
from streamlit.runtime.runtime import Runtime
from streamlit.runtime.session_manager import SessionInfo, SessionStorage
from streamlit.runtime.websocket_session_manager import WebsocketSessionManager
from streamlit.testing.v1 import AppTest

from moeviz.session_storage import EndingSessionStorage, end_expired_sessions, install

TESTS = Path(__file__).resolve().parent


class Session:
    """The part of Streamlit's AppSession the storage uses: its id, and shutdown."""

    def __init__(self, session_id: str):
        self.id, self.shutdowns = session_id, 0

    def shutdown(self) -> None:
        self.shutdowns += 1


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def stored(session_id: str) -> SessionInfo:
    return SessionInfo(client=None, session=Session(session_id))


def test_a_session_is_kept_for_its_ttl_then_shut_down_once():
    clock = Clock()
    storage = EndingSessionStorage(ttl_seconds=120, clock=clock)
    info = stored("a")
    storage.save(info)
    clock.now = 119.9
    assert storage.get("a") is info and info.session.shutdowns == 0
    clock.now = 120.0
    assert storage.end_expired() == 1 and info.session.shutdowns == 1
    assert storage.get("a") is None and storage.list() == [] and storage.end_expired() == 0
    assert info.session.shutdowns == 1


def test_any_access_ends_the_expired_sessions_first():
    """Streamlit's storage drops an expired session at the next write without ending it; here a
    read, a write or a listing ends it."""
    clock = Clock()
    for access in (lambda s: s.get("b"), lambda s: s.save(stored("c")), lambda s: s.list()):
        storage = EndingSessionStorage(ttl_seconds=10, clock=clock)
        clock.now = 0.0
        old = stored("b")
        storage.save(old)
        clock.now = 10.0
        access(storage)
        assert old.session.shutdowns == 1


def test_a_reconnected_session_is_forgotten_not_ended():
    storage = EndingSessionStorage(ttl_seconds=10, clock=Clock())
    info = stored("a")
    storage.save(info)
    storage.delete("a")
    storage.delete("never stored")  # Streamlit may delete what expired meanwhile
    assert storage.get("a") is None and info.session.shutdowns == 0


def test_saving_again_restarts_the_ttl():
    clock = Clock()
    storage = EndingSessionStorage(ttl_seconds=10, clock=clock)
    info = stored("a")
    storage.save(info)
    clock.now = 8.0
    storage.save(info)
    clock.now = 15.0
    assert storage.get("a") is info and info.session.shutdowns == 0
    clock.now = 18.0
    assert storage.get("a") is None and info.session.shutdowns == 1


def test_the_oldest_sessions_beyond_maxsize_are_ended():
    clock = Clock()
    storage = EndingSessionStorage(ttl_seconds=100, maxsize=2, clock=clock)
    infos = [stored(name) for name in "abc"]
    for info in infos:
        storage.save(info)
        clock.now += 1
    assert [info.session.shutdowns for info in infos] == [1, 0, 0]
    assert [info.session.id for info in storage.list()] == ["b", "c"]


def test_it_is_a_streamlit_session_storage_and_replaces_the_one_this_streamlit_uses():
    """`install` swaps `Runtime._session_mgr._session_storage` when it is a plain
    MemorySessionStorage guarded by `_storage_lock`: this Streamlit must still be laid out so."""
    assert SessionStorage in EndingSessionStorage.__mro__
    manager = WebsocketSessionManager(session_storage=MemorySessionStorage(), uploaded_file_manager=None,
                                      script_cache=None, message_enqueued_callback=None)
    assert isinstance(manager._session_storage, MemorySessionStorage)
    assert hasattr(manager, "_storage_lock")
    assert "_session_mgr" in Runtime.__init__.__code__.co_names


def test_outside_a_real_server_nothing_is_installed_and_nothing_fails():
    """Under AppTest (whose runtime is a mock) the cache's sweeper calls these too: they must
    leave it running, not raise."""

    def page():
        import streamlit as st

        from moeviz.session_storage import end_expired_sessions, install

        st.write(f"installed: {install()}; ended: {end_expired_sessions()}")

    app = AppTest.from_function(page).run()
    assert not app.exception
    assert [m.value for m in app.markdown] == ["installed: None; ended: 0"]
    assert install() is None and end_expired_sessions() == 0  # no runtime at all


@pytest.mark.e2e
def test_a_closed_tabs_download_leaves_the_server_once_its_session_ended():
    """tests/closed_tab_files.py: a real server (2 s TTL) and Chromium; the trace file a tab
    downloaded answers 404 soon after the tab closes (Streamlit alone: 200 for good)."""
    done = subprocess.run([sys.executable, "closed_tab_files.py"], cwd=TESTS,
                          env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "it answers 200 while the tab is open" in done.stdout
    assert "the file answers 404" in done.stdout
