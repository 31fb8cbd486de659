"""What the app computed for its browser sessions, kept in memory bounded in bytes.

`st.cache_data` bounds a cache by its number of entries, which says little about memory: one
trace of 8,192 tokens through a 32-layer, 8-expert model holds about 20 MB, one of a sentence
through the bundled model a few kB. `ByteBoundedCache` bounds the bytes instead:
- all entries together (`MOEVIZ_CACHE_MB`, default 1024) and the entries one session computed
  (`MOEVIZ_SESSION_CACHE_MB`, default 256), evicting the least recently used first;
- a session's entries go when the session ends (its browser tab closed; checked every
  `MOEVIZ_CACHE_SWEEP_SECONDS`, default 30), and entries unused for `IDLE_SECONDS` go too;
  the same sweeps end closed tabs' Streamlit sessions once they can no longer reconnect
  (`moeviz.session_storage`);
- memory freed is handed back to the operating system (glibc's `malloc_trim`), so the server's
  resident memory comes back down after its users leave.
Entries are shared: a text another session already traced on the same model is not traced
again. So that no page can change what another session sees, their numpy arrays are read-only.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from moeviz import session_storage

MB = 1 << 20
SWEEP_SECONDS = 30.0
IDLE_SECONDS = 2 * 3600.0
NO_SESSION = ""  # outside Streamlit (a script, a test calling a page's function)


def nbytes(value: Any, _seen: set[int] | None = None) -> int:
    """The bytes `value` holds, counted through dataclasses, containers and numpy arrays (each
    object once)."""
    seen = set() if _seen is None else _seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        return value.nbytes + (nbytes(value.base, seen) if isinstance(value.base, np.ndarray) else 0)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sys.getsizeof(value) + sum(nbytes(v, seen) for v in vars(value).values())
    if isinstance(value, dict):
        return sys.getsizeof(value) + sum(nbytes(k, seen) + nbytes(v, seen) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return sys.getsizeof(value) + sum(nbytes(v, seen) for v in value)
    return sys.getsizeof(value)


def freeze(value: Any, _seen: set[int] | None = None) -> Any:
    """Make every numpy array inside `value` read-only (in place); returns `value`."""
    seen = set() if _seen is None else _seen
    if id(value) in seen:
        return value
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for v in vars(value).values():
            freeze(v, seen)
    elif isinstance(value, dict):
        for v in value.values():
            freeze(v, seen)
    elif isinstance(value, (list, tuple)):
        for v in value:
            freeze(v, seen)
    return value


@dataclasses.dataclass
class _Entry:
    value: Any
    owner: str
    size: int
    used: float


class ByteBoundedCache:
    """Least-recently-used entries within `total_bytes`, and within `session_bytes` for the
    entries each session computed. Thread-safe; the value is computed outside the lock."""

    def __init__(self, total_bytes: int, session_bytes: int, *, idle_seconds: float = IDLE_SECONDS,
                 is_active: Callable[[str], bool] = lambda session: True, clock: Callable[[], float] = time.monotonic):
        if not 0 < session_bytes <= total_bytes:
            raise ValueError(f"need 0 < session bytes <= total bytes; got {session_bytes} and {total_bytes}")
        self.total_bytes, self.session_bytes, self.idle_seconds = total_bytes, session_bytes, idle_seconds
        self._is_active, self._clock = is_active, clock
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(entry.size for entry in self._entries.values())

    def session_nbytes(self, session: str) -> int:
        with self._lock:
            return sum(entry.size for entry in self._entries.values() if entry.owner == session)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get_or_compute(self, key: Hashable, session: str, compute: Callable[[], Any]) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.used = self._clock()
                self._entries.move_to_end(key)
                return entry.value
        value = freeze(compute())
        size = nbytes(value)
        with self._lock:
            if size <= self.session_bytes:  # larger than a session may keep: returned, not kept
                self._entries[key] = _Entry(value, session, size, self._clock())
                self._entries.move_to_end(key)
                self._evict(session)
        return value

    def _evict(self, session: str) -> None:
        """Least recently used first: the session's own entries over its share, then anyone's
        over the total."""
        own = sum(entry.size for entry in self._entries.values() if entry.owner == session)
        for key in [k for k, entry in self._entries.items() if entry.owner == session]:
            if own <= self.session_bytes:
                break
            own -= self._entries.pop(key).size
        total = sum(entry.size for entry in self._entries.values())
        while total > self.total_bytes:
            total -= self._entries.popitem(last=False)[1].size

    def sweep(self) -> int:
        """Drop the entries of sessions that ended and those idle too long; returns the bytes freed."""
        now = self._clock()
        with self._lock:
            gone = [key for key, entry in self._entries.items()
                    if now - entry.used > self.idle_seconds or not self._is_active(entry.owner)]
            freed = sum(self._entries.pop(key).size for key in gone)
        return freed

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the operating system (glibc only)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- the app's one cache -------------------------------------------------------------------------


def current_session() -> str:
    from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

    ctx = get_script_run_ctx(suppress_warning=True)
    return ctx.session_id if ctx is not None else NO_SESSION


def session_is_active(session: str) -> bool:
    """False once Streamlit no longer serves the session (its tab closed). Outside a running
    server (AppTest, scripts) every session counts as active."""
    from streamlit.runtime import Runtime

    if session == NO_SESSION or not Runtime.exists():
        return True
    return Runtime.instance().is_active_session(session)


def _megabytes(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip() or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number of megabytes; got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be at least 1 (megabytes); got {value}")
    return value * MB


_app_cache: ByteBoundedCache | None = None
_app_cache_lock = threading.Lock()


def app_cache() -> ByteBoundedCache:
    """The server's cache, sized by MOEVIZ_CACHE_MB and MOEVIZ_SESSION_CACHE_MB, with its sweeper."""
    global _app_cache
    with _app_cache_lock:
        if _app_cache is None:
            total = _megabytes("MOEVIZ_CACHE_MB", 1024)
            _app_cache = ByteBoundedCache(total, min(_megabytes("MOEVIZ_SESSION_CACHE_MB", 256), total),
                                          is_active=session_is_active)
            threading.Thread(target=_sweep_forever, args=(_app_cache,), daemon=True, name="moeviz-cache-sweeper").start()
        return _app_cache


def _sweep_forever(cache: ByteBoundedCache) -> None:
    seconds = float(os.environ.get("MOEVIZ_CACHE_SWEEP_SECONDS", "").strip() or SWEEP_SECONDS)
    while True:
        try:
            _sweep_once(cache)
        except Exception:  # noqa: BLE001 - a sweeper that died would leave memory unbounded
            logging.getLogger(__name__).exception("sweeping the app's cache and ended sessions failed; retrying")
        time.sleep(max(seconds, 1.0))


def _sweep_once(cache: ByteBoundedCache) -> None:
    session_storage.install()  # closed tabs' sessions end when they can no longer reconnect
    freed, ended = cache.sweep(), session_storage.end_expired_sessions()
    if freed or ended:
        release_memory()


def session_cached(spinner: str) -> Callable:
    """Like `st.cache_data(show_spinner=spinner)`, in the byte-bounded app cache: the function's
    arguments (hashable) are the key; exceptions are not cached."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def cached(*args, **kwargs):
            import streamlit as st

            def compute():
                with st.spinner(spinner):
                    return function(*args, **kwargs)

            key = (function.__module__, function.__qualname__, args, tuple(sorted(kwargs.items())))
            return app_cache().get_or_compute(key, current_session(), compute)

        return cached

    return decorate
