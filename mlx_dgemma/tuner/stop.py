"""Stopping a training run on a signal: after the current step, on every process at the same
step, with a save.

SIGINT (Ctrl-C, ``kill -INT``) or SIGTERM (``kill``, a scheduler's end of job) asks the run
to stop; the trainer finishes the step it is in, saves and raises ``KeyboardInterrupt``
(what a Ctrl-C always did). A second signal stops at once (``KeyboardInterrupt`` where the
run is). Why not Python's own Ctrl-C alone:

- a job started in the background by a non-interactive shell inherits SIGINT *ignored*, and
  Python then installs no handler: ``kill -INT`` did nothing, and SIGTERM killed the run
  without a save;
- in a data-parallel run (``mx.distributed``) a ``KeyboardInterrupt`` lands in each process
  at its own point: one can stop while another waits in a gradient sum it never gets. The
  request is summed over the processes after the same steps instead (the trainer: every 10
  updates), so all stop after the same one.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import mlx.core as mx

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by the first stop signal; ``agreed()`` says whether any process has one."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # the second: now
            raise KeyboardInterrupt
        self.signal = signum

    def agreed(self, world: mx.distributed.Group) -> mx.array:
        """Whether any process was asked to stop (lazy: evaluate it with the step). Every
        process calls it after the same steps, so they agree on the step they stop after."""
        mine = mx.array(float(self.signal is not None))
        return mine if world.size() == 1 else mx.distributed.all_sum(mine, group=world, stream=mx.cpu)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "none"


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Install the stop handlers for SIGINT and SIGTERM for the ``with`` block (also where
    SIGINT was inherited ignored), then restore the previous ones. Off the main thread, where
    Python cannot set handlers, the request is never set and the signals act as before."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    with handling(SIGNALS, request._handle):
        yield request


@contextmanager
def handling(signals, handler) -> Iterator[None]:
    """``handler`` for ``signals`` in the ``with`` block, the previous handlers after it."""
    before = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, previous in before.items():
            if previous is not None:  # None: a handler set outside Python, which cannot be put back
                signal.signal(s, previous)
