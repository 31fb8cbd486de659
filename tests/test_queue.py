"""The fair model queue: one forward at a time (or `slots`), first come first served, with
real threads. Waits are bounded by `join(timeout)` so a bug fails instead of hanging."""

import threading
import time

import pytest

from moeviz.model.queue import FairQueue


def _start_in_order(queue, bodies):
    """Start one thread per body, each after the previous one holds the model or waits for it
    (the first body must set `holding` once inside its turn)."""
    threads = []
    for index, body in enumerate(bodies):
        threads.append(threading.Thread(target=body))
        threads[-1].start()
        deadline = time.monotonic() + 5
        while not _arrived(queue, index) and time.monotonic() < deadline:
            time.sleep(0.001)
    return threads


holding = threading.Event()


def _arrived(queue, index):
    return holding.is_set() if index == 0 else queue.waiting == index


def test_one_at_a_time_in_arrival_order():
    queue = FairQueue(slots=1, poll_seconds=0.01)
    gate, order, inside, most = threading.Event(), [], [0], [0]
    lock = threading.Lock()

    def body(index):
        with queue.turn():
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            if index == 0:
                holding.set()
                gate.wait(5)  # the first holds the model until every other has queued
            order.append(index)
            time.sleep(0.002)
            with lock:
                inside[0] -= 1

    holding.clear()
    threads = _start_in_order(queue, [lambda i=i: body(i) for i in range(8)])
    assert queue.waiting == 7
    gate.set()
    for thread in threads:
        thread.join(10)
    assert order == list(range(8))
    assert most[0] == 1


def test_slots_bound_concurrency():
    queue = FairQueue(slots=3, poll_seconds=0.01)
    inside, most, lock = [0], [0], threading.Lock()

    def body(_):
        with queue.turn():
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=body, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert most[0] == 3


def test_waiters_hear_their_place_and_a_cancelled_one_leaves():
    queue = FairQueue(slots=1, poll_seconds=0.01)
    release, places, cancel = threading.Event(), [], threading.Event()

    def hold():
        with queue.turn():
            holding.set()
            release.wait(5)

    def stop_when_cancelled():
        if cancel.is_set():
            raise KeyboardInterrupt("session closed")

    errors = []

    def cancelled_waiter():
        try:
            with queue.turn(yield_check=stop_when_cancelled):
                errors.append("ran although cancelled")
        except KeyboardInterrupt:
            pass

    def last_waiter():
        with queue.turn(on_place=places.append):
            places.append("ran")

    holding.clear()
    threads = _start_in_order(queue, [hold, cancelled_waiter, last_waiter])
    time.sleep(0.05)
    assert places == [2]
    cancel.set()
    threads[1].join(5)
    assert queue.waiting == 1
    time.sleep(0.05)
    assert places == [2, 1]  # moved up when the cancelled session left
    release.set()
    for thread in threads:
        thread.join(5)
    assert places == [2, 1, "ran"] and errors == []
    assert queue.waiting == 0


def test_an_error_in_the_body_frees_the_slot():
    queue = FairQueue(slots=1, poll_seconds=0.01)
    with pytest.raises(RuntimeError), queue.turn():
        raise RuntimeError("forward failed")
    with queue.turn():
        pass
    assert queue.waiting == 0


def test_needs_a_slot():
    with pytest.raises(ValueError, match="at least one slot"):
        FairQueue(slots=0)


# -- a turn that ends mid-forward ------------------------------------------------------------------


class SessionClosed(Exception):
    """Stands for Streamlit's StopException, raised by a script's yield check once its tab closed."""


def test_a_check_that_raises_stops_the_forward_at_the_next_moe_layer_and_frees_the_model(tiny_mixtral, tokenizer):
    from moeviz.model.capture import trace_text
    from moeviz.model.queue import add_interrupt_points, interruptible

    text = "The quick brown fox jumps over the lazy dog."
    plain = trace_text(tiny_mixtral, tokenizer, text)
    add_interrupt_points(tiny_mixtral)
    add_interrupt_points(tiny_mixtral)  # once per model, however often it is called
    checks = []

    def closed_after_the_first_layer():
        checks.append(len(checks))
        if len(checks) == 2:
            raise SessionClosed

    queue = FairQueue(slots=1, poll_seconds=0.01)
    with pytest.raises(SessionClosed), queue.turn(), interruptible(closed_after_the_first_layer):
        trace_text(tiny_mixtral, tokenizer, text)
    assert checks == [0, 1]  # before MoE layer 0, then stopped before layer 1 of 3
    with queue.turn():  # the slot is free
        again = trace_text(tiny_mixtral, tokenizer, text)  # no check outside the block
    assert checks == [0, 1] and queue.waiting == 0
    for name in ("topk_ids", "topk_weights", "router_logits"):
        assert (getattr(again, name) == getattr(plain, name)).all()  # the model is unharmed
