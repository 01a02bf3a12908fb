"""Counts what JAX compiles, from its monitoring events: the no-recompile checks and the benchmarks read it."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import jax

# Recorded around compile_or_get_cached: a persistent-cache hit is counted here too.
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


@dataclass
class CompileLog:
    requests: int = 0  # executables JAX asked XLA for: each one is a (re)compile in this process
    compile_s: float = 0.0  # seconds spent on them, cache reads included
    cache_hits: int = 0  # requests answered by the persistent compilation cache

    @property
    def compiles(self) -> int:
        """Real XLA compiles: requests the persistent cache did not answer."""
        return self.requests - self.cache_hits


_log = CompileLog()
_lock = threading.Lock()
_installed = False


def _on_duration(event: str, duration_s: float, **_: object) -> None:
    if event == _BACKEND_COMPILE:
        with _lock:
            _log.requests += 1
            _log.compile_s += duration_s


def _on_event(event: str, **_: object) -> None:
    if event == _CACHE_HIT:
        with _lock:
            _log.cache_hits += 1


def install() -> CompileLog:
    """Start counting (idempotent) and return the live counters."""
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            jax.monitoring.register_event_listener(_on_event)
            _installed = True
    return _log


def snapshot() -> CompileLog:
    with _lock:
        return CompileLog(_log.requests, _log.compile_s, _log.cache_hits)
