"""Ctrl-C or SIGTERM during long work (training, `vqgan imagine`): the step under way finishes, the loop stops, and
what the work has so far is written (a checkpoint, the image as it stands) before the command exits 128 + the
signal. Optionally a second signal stops at once."""
from __future__ import annotations

import logging
import signal
import threading


class StopOnSignal:
    """`with StopOnSignal(...) as stop:` ... `if stop.requested: break`. Handlers are installed only in the main
    thread (the only one Python delivers signals to); elsewhere nothing changes. `action` says in the log what
    happens next. `second_stops_now`: a second signal raises KeyboardInterrupt (for a person pressing Ctrl-C
    again); off where launchers repeat signals and the checkpoint under way must be finished (training)."""

    def __init__(self, action: str, logger: logging.Logger, second_stops_now: bool = True, enabled: bool = True):
        self.action, self.log = action, logger
        self.second_stops_now, self.enabled = second_stops_now, enabled
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
        if self.signal is not None and self.second_stops_now:  # asked twice: stop now
            self._restore()
            raise KeyboardInterrupt
        first = self.signal is None
        self.signal = signum
        if first:
            self.log.warning("signal %d: %s%s", signum, self.action,
                             " (again to stop now)" if self.second_stops_now else "")

    def _restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def __enter__(self) -> "StopOnSignal":
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
