"""The worker's handle on its webhook sender (worker/webhook_sender.py): started once the worker's Celery consumes,
started again if it dies, stopped with the worker. Kept apart from the sender's module, whose import makes a
Celery app of its own."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

from common.settings import Settings

log = logging.getLogger("worker.webhooks")
RESTART_PAUSE_S = 1.0  # between a sender's death and its replacement


class SenderProcess:
    """The worker's side: starts the sender, starts another if it dies, stops it with the worker."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.proc: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.watch: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _spawn(self) -> None:
        # stdout and stderr are the worker's: one log per worker, the sender's lines named worker.webhooks
        self.proc = subprocess.Popen([sys.executable, "-m", "worker.webhook_sender", str(os.getpid())])
        log.info("webhook sender started (pid %d, %d threads)", self.proc.pid, self.settings.webhook_concurrency)

    def start(self) -> None:
        with self.lock:
            self._spawn()
        self.watch = threading.Thread(target=self._watch, name="webhook-sender-watch", daemon=True)
        self.watch.start()

    def _watch(self) -> None:
        while not self.stopping.wait(RESTART_PAUSE_S):
            with self.lock:
                if self.stopping.is_set() or self.proc is None or self.proc.poll() is None:
                    continue
                log.warning("webhook sender exited with %s; starting another", self.proc.returncode)
                self._spawn()

    def begin_stop(self) -> None:
        """Warm shutdown: the sender takes no more messages and finishes the tries under way."""
        with self.lock:
            self.stopping.set()
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        self.begin_stop()
        if self.proc is None:
            return
        try:  # the tries under way end by their deadline
            self.proc.wait(timeout=self.settings.webhook_timeout_s + 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
