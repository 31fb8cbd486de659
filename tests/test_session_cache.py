"""The app's byte-bounded cache: least recently used out first, per session and in total; a
session's entries gone when it ends; shared entries read-only."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from factories import make_trace

from moeviz import session_cache
from moeviz.session_cache import ByteBoundedCache, nbytes

KB = 1024


def block(kilobytes: int) -> np.ndarray:
    return np.zeros(kilobytes * KB, dtype=np.uint8)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fill(cache: ByteBoundedCache, session: str, keys, kilobytes: int = 100) -> None:
    for key in keys:
        cache.get_or_compute(key, session, lambda: block(kilobytes))


def test_nbytes_counts_the_arrays_of_a_trace_once():
    trace = make_trace([[[0, 1], [1, 2], [0, 1]]], num_experts=4)
    arrays = trace.topk_ids.nbytes + trace.topk_weights.nbytes + trace.router_logits.nbytes
    assert arrays <= nbytes(trace) < arrays + 20 * KB
    shared = block(64)
    assert nbytes([shared, shared, shared[:10]]) < 65 * KB  # the same memory counted once


def test_the_total_is_kept_least_recently_used_out_first():
    cache = ByteBoundedCache(total_bytes=350 * KB, session_bytes=350 * KB)
    fill(cache, "a", ["k1", "k2", "k3"])
    cache.get_or_compute("k1", "b", lambda: pytest.fail("k1 is cached"))  # k1 now the most recent
    fill(cache, "b", ["k4"])
    assert "k2" not in cache and all(k in cache for k in ("k1", "k3", "k4"))
    assert cache.nbytes <= 350 * KB


def test_one_session_cannot_push_out_the_others():
    cache = ByteBoundedCache(total_bytes=1000 * KB, session_bytes=250 * KB)
    fill(cache, "quiet", ["q1", "q2"])
    fill(cache, "busy", [f"b{i}" for i in range(20)])
    assert "q1" in cache and "q2" in cache
    assert cache.session_nbytes("busy") <= 250 * KB and "b19" in cache and "b0" not in cache


def test_a_value_larger_than_a_session_may_keep_is_returned_not_kept():
    cache = ByteBoundedCache(total_bytes=500 * KB, session_bytes=200 * KB)
    value = cache.get_or_compute("big", "a", lambda: block(300))
    assert value.nbytes == 300 * KB and "big" not in cache and cache.nbytes == 0


def test_ended_sessions_and_idle_entries_are_swept():
    clock, active = Clock(), {"a", "b"}
    cache = ByteBoundedCache(10_000 * KB, 1000 * KB, idle_seconds=60, is_active=active.__contains__, clock=clock)
    fill(cache, "a", ["a1", "a2"])
    fill(cache, "b", ["b1"])
    assert cache.sweep() == 0
    active.discard("a")  # its tab closed
    assert cache.sweep() == nbytes(block(100)) * 2 and list(cache._entries) == ["b1"]
    clock.now = 61
    assert cache.sweep() > 0 and len(cache) == 0


def test_cached_arrays_are_read_only_so_no_session_changes_anothers():
    cache = ByteBoundedCache(1000 * KB, 1000 * KB)
    trace = cache.get_or_compute("t", "a", lambda: make_trace([[[0, 1], [1, 2]]], num_experts=4))
    with pytest.raises(ValueError, match="read-only"):
        trace.topk_ids[0, 0, 0] = 3
    assert cache.get_or_compute("t", "b", lambda: None) is trace


def test_threads_keep_the_bounds():
    cache = ByteBoundedCache(total_bytes=800 * KB, session_bytes=300 * KB)

    def work(session):
        for i in range(40):
            cache.get_or_compute((session, i % 7), session, lambda: block(50))

    threads = [threading.Thread(target=work, args=(f"s{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.nbytes <= 800 * KB
    assert all(cache.session_nbytes(f"s{i}") <= 300 * KB for i in range(8))


@pytest.mark.parametrize("env, message", [
    ({"MOEVIZ_CACHE_MB": "lots"}, "MOEVIZ_CACHE_MB must be a whole number of megabytes; got 'lots'"),
    ({"MOEVIZ_SESSION_CACHE_MB": "0"}, "MOEVIZ_SESSION_CACHE_MB must be at least 1"),
])
def test_sizes_from_the_environment_are_checked(env, message, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        session_cache._megabytes(next(iter(env)), 1)


def test_outside_a_server_every_session_counts_as_active():
    assert session_cache.current_session() == session_cache.NO_SESSION
    assert session_cache.session_is_active("any-session-id")
