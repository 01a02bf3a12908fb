"""Two guards that keep the fast tier fast, armed by tests/conftest.py for each test from its markers.

- Processes: the helpers that start service processes (tests/helpers/servers.py: workers, uvicorn, SeaweedFS) ask
  check_may_start first, so a test not marked `stack` that starts one fails. Outside pytest (bench/) all may.
- Compiles: every program JAX compiles in this process is recorded by name (JAX's monitoring event for a backend
  compile carries it; a persistent-cache hit is recorded too), and conftest fails a test not marked `engine`
  that compiled anything but EAGER_CONSTANTS.
"""

from __future__ import annotations

may_start_processes = True

# What `jnp.zeros(shape)` compiles when run eagerly: the models' shapes() make their example inputs so before
# jax.eval_shape, and tiny.ensure and tests/helpers/variants.py call shapes() to write weights files (one-element
# programs, a fraction of a second in all). Anything else is engine work.
EAGER_CONSTANTS = frozenset({"jit(broadcast_in_dim)", "jit(convert_element_type)"})
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_compiled: list[str] = []  # names of the programs compiled in this process, in order (append is atomic)
_watching = False


def check_may_start(what: str) -> None:
    if not may_start_processes:
        raise AssertionError(
            f"this test starts {what} but is not marked `stack`: add its fixture to FIXTURE_MARKS or the test to "
            "PATH_MARKS in tests/conftest.py"
        )


def watch_compiles() -> None:
    """Record every compile from now on (once per process; before anything compiles)."""
    global _watching
    if not _watching:
        import jax

        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _watching = True


def _on_duration(event: str, duration_s: float, *, fun_name: str = "?", **_: object) -> None:
    if event == _BACKEND_COMPILE:
        _compiled.append(fun_name)


def compiles_so_far() -> int:
    return len(_compiled)


def engine_compiles_since(mark: int) -> list[str]:
    """The programs compiled since compiles_so_far() returned `mark`, but EAGER_CONSTANTS."""
    return [name for name in _compiled[mark:] if name not in EAGER_CONSTANTS]
