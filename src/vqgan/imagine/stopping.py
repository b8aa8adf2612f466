"""Ctrl-C or SIGTERM during a `vqgan imagine` run: the step under way finishes, the loop stops, and the outputs are
written from the image as it stands (as training writes a checkpoint). A second Ctrl-C stops at once."""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("vqgan.imagine")


class StopOnSignal:
    """`with StopOnSignal() as stop:` ... `if stop.requested: break`. Handlers are installed only in the main
    thread (the only one Python delivers signals to); elsewhere nothing changes."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal, as a shell reports it (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + (self.signal or 0)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # asked twice: stop now
            self._restore()
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("signal %d: finishing this step, then writing the image as it stands (again to stop now)", signum)

    def _restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
