"""Closed tabs' sessions, shut down once they can no longer reconnect.

Streamlit keeps the session of a closed tab for `server.disconnectedSessionTTL` seconds (120 by
default) so that a tab reconnecting within that time resumes it. Its storage,
`MemorySessionStorage`, forgets an expired session lazily (at the next write) and never shuts it
down (Streamlit issue #12506), so what only `AppSession.shutdown()` releases stays in the
server's memory for good: the session's uploaded files and its download buttons' data — for
moeviz, a trace file per closed tab (20 MB for 8,192 tokens of Mixtral-8x7B).

`EndingSessionStorage` stores sessions the same way, but shuts down each session whose time is
up or that newer ones push out. Streamlit has no option to choose the storage, so `install()`
puts one into the running server.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from streamlit.runtime.session_manager import SessionInfo, SessionStorage

MAX_STORED_SESSIONS = 128  # as MemorySessionStorage


class EndingSessionStorage(SessionStorage):
    """Sessions of closed tabs for `ttl_seconds` each (at most `maxsize`, oldest out first);
    a session that leaves other than by `delete` (its tab reconnected) is shut down. Thread-safe."""

    def __init__(self, ttl_seconds: float, maxsize: int = MAX_STORED_SESSIONS,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl_seconds, self.maxsize, self._clock = ttl_seconds, maxsize, clock
        self._sessions: OrderedDict[str, tuple[SessionInfo, float]] = OrderedDict()  # oldest first
        self._lock = threading.Lock()

    def get(self, session_id: str) -> SessionInfo | None:
        self.end_expired()
        with self._lock:
            entry = self._sessions.get(session_id)
        return entry[0] if entry else None

    def save(self, session_info: SessionInfo) -> None:
        with self._lock:
            self._sessions.pop(session_info.session.id, None)
            self._sessions[session_info.session.id] = (session_info, self._clock() + self.ttl_seconds)
            pushed_out = [self._sessions.popitem(last=False)[1][0]
                          for _ in range(len(self._sessions) - self.maxsize)]
        _shut_down(pushed_out)
        self.end_expired()

    def delete(self, session_id: str) -> None:
        """Forget a session without ending it: its tab reconnected, or Streamlit ends it itself."""
        with self._lock:
            self._sessions.pop(session_id, None)

    def list(self) -> list[SessionInfo]:
        self.end_expired()
        with self._lock:
            return [info for info, _ in self._sessions.values()]

    def end_expired(self) -> int:
        """Shut down the sessions whose time to reconnect is up; returns how many."""
        now = self._clock()
        with self._lock:
            expired = [session_id for session_id, (_, until) in self._sessions.items() if until <= now]
            ended = [self._sessions.pop(session_id)[0] for session_id in expired]
        _shut_down(ended)
        return len(ended)


def _shut_down(sessions: Iterable[SessionInfo]) -> None:
    for info in sessions:
        info.session.shutdown()


_install_lock = threading.Lock()


def install() -> EndingSessionStorage | None:
    """Put an `EndingSessionStorage` with the server's TTL in place of Streamlit's own storage
    (once; the sessions stored so far move over) and return it. None outside a running server,
    or if this Streamlit version keeps its sessions differently (then nothing changes)."""
    from streamlit import config
    from streamlit.runtime import Runtime
    from streamlit.runtime.memory_session_storage import MemorySessionStorage

    if not Runtime.exists():
        return None
    # Private: Streamlit offers no option for the storage. (AppTest's runtime is a mock without it.)
    manager = getattr(Runtime.instance(), "_session_mgr", None)
    storage_lock = getattr(manager, "_storage_lock", None)
    with _install_lock:
        storage = getattr(manager, "_session_storage", None)
        if isinstance(storage, EndingSessionStorage):
            return storage
        if type(storage) is not MemorySessionStorage or storage_lock is None:
            return None
        ending = EndingSessionStorage(config.get_option("server.disconnectedSessionTTL"))
        with storage_lock:
            for info in storage.list():
                ending.save(info)
            manager._session_storage = ending
        return ending


def end_expired_sessions() -> int:
    """Shut down the closed tabs' sessions whose time to reconnect is up (if `install` ran in
    this server), then drop the files no session refers to; returns how many sessions ended."""
    from streamlit.runtime import Runtime

    if not Runtime.exists():
        return 0
    runtime = Runtime.instance()
    storage = getattr(getattr(runtime, "_session_mgr", None), "_session_storage", None)
    ended = storage.end_expired() if isinstance(storage, EndingSessionStorage) else 0
    # A download's data goes on the second pass after its last session let go (Streamlit keeps it
    # one pass longer for a click in flight); the sweeps make those passes.
    runtime.media_file_mgr.remove_orphaned_files()
    return ended
