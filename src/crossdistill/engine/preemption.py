"""Graceful stop on SIGTERM / SIGUSR1 (what SLURM and cloud schedulers send before killing a job)."""

from __future__ import annotations

import signal
import threading

PREEMPTION_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again", what a requeue script checks for


class Preempted(Exception):
    """Raised by the trainer after it saved a checkpoint because a stop signal arrived."""

    def __init__(self, message: str, checkpoint: str):
        super().__init__(message)
        self.checkpoint = checkpoint


class StopSignal:
    """Context manager that records SIGTERM/SIGUSR1 instead of dying; ``requested`` says if one came."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
