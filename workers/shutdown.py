"""A warm shutdown whatever receives SIGTERM.

systemd's default ``KillMode=control-group`` and many container inits send SIGTERM to every process
of the worker, not only to Celery's main process: the prefork child rendering a batch used to die
mid-batch (WorkerLostError), its images counting an attempt. Here the render process catches
SIGTERM itself: an idle process exits at once; a busy one finishes the chunk it is rendering if it
can within ``FARM_SHUTDOWN_SECONDS``, else stops at the next denoising step, and hands every image it
has not rendered back to the queue (claim released, no attempt counted; ``workers.tasks``). When
that task is over the process finishes its uploads and exits.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

__all__ = ["Shutdown"]

log = logging.getLogger("farm.worker")


class Shutdown:
    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.requested_at: float | None = None
        self.busy = False

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def overdue(self) -> bool:
        """SIGTERM came more than ``grace_seconds`` ago: stop rendering now."""
        return self.requested_at is not None and time.monotonic() - self.requested_at >= self.grace_seconds

    def install(self) -> None:
        """Catch SIGTERM in this (render) process. Called from the first task: billiard installs its
        own SIGTERM handler in a pool process *after* Celery's ``worker_process_init``."""
        if signal.getsignal(signal.SIGTERM) != self._on_sigterm:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def request(self) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()

    def _on_sigterm(self, signum, _frame) -> None:
        if not self.busy:  # nothing to finish: the default action, now
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.request()
        log.warning(
            "SIGTERM: finishing this chunk if it takes under %.0f s, then handing the rest back", self.grace_seconds
        )

    def exit_after_task(self, close, timeout: float) -> None:
        """After the task that was running at SIGTERM: finish uploads (``close``) and exit, on a thread
        so the task's result reaches Celery's main process first."""

        def leave() -> None:
            time.sleep(0.5)
            try:
                close(timeout=timeout)
            finally:
                os._exit(0)

        threading.Thread(target=leave, daemon=True, name="shutdown").start()
