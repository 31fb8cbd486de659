"""A fair queue in front of one model: forward passes take turns, first come first served.

Streamlit runs each browser session's script in its own thread, and every session shares the
one cached model. Without a queue, N people pressing "analyse" start N forward passes at once on
one GPU (N times the activation memory, all of them slow). `FairQueue.turn()` hands out tickets
in arrival order and lets at most `slots` holders run; a waiter can be told its place, and
leaves the queue when its `yield_check` raises (Streamlit raises there when the session reruns
or closes), so a closed tab never holds a place.

A turn can also end mid-forward: a model prepared with `add_interrupt_points` calls the check
set by `interruptible` before each MoE block, so a pass whose session closed stops at the next
layer and frees the model instead of finishing a result nobody will see.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class FairQueue:
    def __init__(self, slots: int = 1, poll_seconds: float = 0.25):
        if slots < 1:
            raise ValueError(f"a queue needs at least one slot, got {slots}")
        self.slots = slots
        self.poll_seconds = poll_seconds
        self._changed = threading.Condition()
        self._tickets = itertools.count()
        self._waiting: deque[int] = deque()
        self._running = 0

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._waiting)

    @contextmanager
    def turn(self, on_place: Callable[[int], None] | None = None,
             yield_check: Callable[[], None] | None = None) -> Iterator[None]:
        """Wait for this caller's turn, run the body, free the slot. While waiting,
        `on_place(n)` is told each new place (1 = next) and `yield_check()` is called every
        `poll_seconds`; whatever it raises leaves the queue and propagates."""
        ticket = self._join()
        try:
            self._wait(ticket, on_place, yield_check)
        except BaseException:
            self._leave(ticket)
            raise
        try:
            yield
        finally:
            with self._changed:
                self._running -= 1
                self._changed.notify_all()

    def _join(self) -> int:
        with self._changed:
            ticket = next(self._tickets)
            self._waiting.append(ticket)
            return ticket

    def _leave(self, ticket: int) -> None:
        with self._changed:
            self._waiting.remove(ticket)
            self._changed.notify_all()

    def _wait(self, ticket: int, on_place, yield_check) -> None:
        told = None
        while True:
            with self._changed:
                if self._waiting[0] == ticket and self._running < self.slots:
                    self._waiting.popleft()
                    self._running += 1
                    self._changed.notify_all()  # with free slots the next ticket may start too
                    return
                place = self._waiting.index(ticket) + 1
                if place == told:
                    self._changed.wait(self.poll_seconds)
                    place = self._waiting.index(ticket) + 1
            if yield_check is not None:
                yield_check()
            if on_place is not None and place != told:
                on_place(place)
            told = place


# -- stopping a forward pass between layers ------------------------------------------------------

_interrupt_check: ContextVar[Callable[[], None] | None] = ContextVar("moeviz_interrupt_check", default=None)


@contextmanager
def interruptible(check: Callable[[], None] | None) -> Iterator[None]:
    """Forward passes run in this block, in this thread, call `check()` before each MoE block of
    a model prepared with `add_interrupt_points`; whatever it raises stops the pass there."""
    token = _interrupt_check.set(check)
    try:
        yield
    finally:
        _interrupt_check.reset(token)


def add_interrupt_points(model) -> None:
    """Once per model: a pre-hook on every MoE block that runs the current `interruptible` check
    (none outside such a block, so other callers' passes are untouched)."""
    from moeviz.model.capture import NoRoutersError, find_routers

    if getattr(model, "_moeviz_interrupt_points", False):
        return
    try:
        sites = find_routers(model)
    except NoRoutersError:
        return
    for site in sites:
        site.block.register_forward_pre_hook(_run_interrupt_check)
    model._moeviz_interrupt_points = True


def _run_interrupt_check(module, args) -> None:
    check = _interrupt_check.get()
    if check is not None:
        check()
