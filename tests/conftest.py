"""The suite's tiers (its markers, set here from what each test uses) and the fixtures shared by the whole suite:
the tiny model folder, Redis, SeaweedFS and `live_stack` (each started once per run), and one compile cache.

## Markers: what a test needs, set automatically (pytest_collection_modifyitems below)

- `engine`: runs JAX in this process (builds a model or an engine, compiles a program);
- `stack`: starts service processes: workers, uvicorn, SeaweedFS (live_stack, the stand-in stacks, ...);
- `browser`: drives Chromium with Playwright;
- `slow`: takes long on purpose: outages, restarts, kills, chaos, load (tens of seconds to minutes each).

`scripts/test.sh fast` runs the rest (`-m "not engine and not stack and not browser and not slow"`): the
embedded Redis (started once per run in well under a second), the three-master Valkey cluster the stores' tests
also run on (once per run, about two seconds) and short child processes (a `python -c`, the linters of
tests/infra) are allowed there; compiling and service processes are not.

The rule, in this order: a test gets the marks of the fixtures it uses (FIXTURE_MARKS, through every fixture it
depends on, so a test using `client` on top of `live_stack` is `stack`), then those of the PATH_MARKS rules
its node id matches: there go the tests that compile or start processes in their own body rather than through a
fixture, and the slow ones. A new fixture that builds an engine or starts a process goes into FIXTURE_MARKS; a
test that does it inline, into PATH_MARKS. Nobody has to remember: two guards fail a test whose marks are wrong,
in every run (the whole suite included):
- a test not marked `engine` that makes JAX compile a program in this process (recorded around its setup, call
  and teardown; the one-element programs of an eager `jnp.zeros` aside) fails at teardown;
- a test not marked `stack` that starts a worker, uvicorn or SeaweedFS through tests/helpers/servers.py fails
  there. Both live in tests/helpers/guards.py.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import guards

# fixture -> marker, for every test that uses the fixture (directly or through another fixture)
FIXTURE_MARKS = {
    # engine: JAX in this process
    "tiny32": "engine",
    "engine32": "engine",
    "single_file_engine": "engine",
    "engine": "engine",  # test_lora.py, test_image_inputs.py
    "engines": "engine",  # test_sampling.py, test_loras_and_models.py
    # stack: service processes
    "live_stack": "stack",
    "s3": "stack",  # SeaweedFS
    "stack": "stack",  # the stand-in stacks of test_shutdown, test_storage_outage, test_webhook_delivery
    "slow_stack": "stack",  # test_webhook_delivery: receivers that never finish answering
    "tiny_stack": "stack",
    "standin_stack": "stack",
    "service": "stack",  # test_end_to_end.py
    "served": "stack",  # test_job_events.py: uvicorn
    # browser
    "browser": "browser",
    "page": "browser",
}

# node id pattern (re.search) -> markers: tests that compile or start processes in their own body, and slow ones
PATH_MARKS = [
    # every engine test module builds models or compiles, but those that only run numpy on names and shapes
    (r"^tests/worker/engine/(?!test_(schedule|convert|tensor_file|feed|previews)\.py)", ("engine",)),
    (r"^tests/worker/engine/test_devices\.py", ("stack",)),  # engines in child processes (device counts, caches)
    (r"^tests/worker/loop/test_engine_port\.py::test_the_real_engine", ("engine",)),  # builds a tiny Engine inline
    (r"^tests/worker/test_main\.py", ("engine", "stack")),  # `python -m worker`'s start in child processes
    (r"^tests/test_model_queues\.py::test_every_job", ("stack",)),  # two worker processes
    (r"^tests/api/test_metrics\.py::test_several_api_processes", ("stack",)),  # uvicorn --workers 2
    # bench/accelerator.sh --dry-run: child processes that compile the tiny model's programs and run PyTorch's
    (r"^tests/bench/test_accelerator\.py::test_the_dry_run", ("engine", "stack")),
    (r"^tests/bench/test_control\.py", ("engine", "stack")),  # bench/control.py at tiny: a child process compiles
    (r"^tests/worker/test_image_retention\.py::.*\[s3\]", ("stack",)),  # `storage` asks for s3 when it is s3
    (r"^tests/common/test_redis_restart\.py", ("stack", "slow")),  # a worker across Redis restarts
    (r"^tests/common/test_redis_failover\.py", ("stack", "slow")),  # Valkey + sentinels; the primary SIGKILLed
    (r"^tests/worker/test_redis_outage\.py", ("stack", "slow")),  # 10 s and 60 s outages
    (r"^tests/worker/test_storage_outage\.py", ("slow",)),  # up to a 60 s outage
    (r"^tests/worker/test_webhook_sender\.py", ("stack",)),  # Valkey, a stand-in worker and the sender
    (r"^tests/worker/test_shutdown\.py", ("slow",)),  # workers killed mid-batch, redelivery after timeouts
    (r"^tests/test_chaos\.py", ("stack", "slow")),  # bench/chaos.py: Redis killed under load
    (r"^tests/test_load\.py", ("stack", "slow")),  # 5,000 jobs
]
MARKS = ("engine", "stack", "browser", "slow")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marks = {FIXTURE_MARKS[name] for name in getattr(item, "fixturenames", ()) if name in FIXTURE_MARKS}
        for pattern, extra in PATH_MARKS:
            if re.search(pattern, item.nodeid):
                marks.update(extra)
        for name in sorted(marks - {m.name for m in item.iter_markers()}):
            item.add_marker(name)
    # pytest-xdist hands modules out in the order its workers collected them (with --no-loadscope-reorder)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _order_for_workers(items)


def _order_for_workers(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (scripts/test.sh: `-n 3 --dist loadscope --no-loadscope-reorder`) each module's tests run
    on one xdist worker, so a module's stack or engine (module-scoped) starts once, and modules go out in the
    order left here: the slow ones (which mostly wait: outages, kills) each beside one that compiles or starts
    stacks (CPU-bound), so that the two overlap; then the rest of those; then the fast ones, which fill the gaps
    at the end. Every module on `live_stack` is one work unit (pytest_xdist_make_scheduler below), so the stack
    starts once in the run, not once per xdist worker."""

    def marked(item: pytest.Item, *names: str) -> bool:
        return any(item.get_closest_marker(name) for name in names)

    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    slow = [name for name, module in modules.items() if any(marked(item, "slow") for item in module)]
    heavy = [
        name
        for name, module in modules.items()
        if name not in slow and any(marked(item, "engine", "stack", "browser") for item in module)
    ]
    rest = [name for name in modules if name not in slow and name not in heavy]
    paired = [name for pair in itertools.zip_longest(slow, heavy) for name in pair if name is not None]
    # The live_stack unit first: it is the run's largest (the stack's start and every module on it, one after
    # another on one xdist worker), and a large unit handed out last is what the run ends waiting for.
    live = _live_stack_modules()
    ordered = sorted((*paired, *rest), key=lambda name: name not in live)  # stable: the rest keep their order
    items[:] = [item for name in ordered for item in modules[name]]


LIVE_STACK_UNIT = "tests::live_stack"  # the xdist work unit of every module that runs on live_stack


def _live_stack_modules() -> frozenset[str]:
    """The test modules that use `live_stack`, from their source: the xdist controller schedules by node id and
    collects nothing, so it cannot ask the fixtures (a module reaches live_stack only by naming it: no other
    fixture depends on it)."""
    root = Path(__file__).parent
    return frozenset(
        str(path.relative_to(root.parent)) for path in root.rglob("test_*.py") if "live_stack" in path.read_text()
    )


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadscope` with every live_stack module in one unit: each xdist worker would otherwise start its
    own stack (a worker process compiling every served program: minutes of both cores). pytest-xdist's
    `loadgroup` would do it through marks, but its groups do not take with pytest 9 (it renames items through an
    attribute pytest no longer reads)."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    modules = _live_stack_modules()

    class LiveStackTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return LIVE_STACK_UNIT if scope.split("::")[0] in modules else scope

    return LiveStackTogether(config, log)


def pytest_configure(config: pytest.Config) -> None:
    from worker.engine import compile_log

    guards.watch_compiles()  # before anything compiles
    compile_log.install()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    from worker.engine import compile_log

    if not getattr(config.option, "numprocesses", None):  # under xdist the workers compile, not this process
        log = compile_log.snapshot()
        terminalreporter.write_line(
            f"JAX in the test process: {log.requests} programs compiled, {log.cache_hits} of them read from the "
            f"run's compile cache; {log.compile_s:.0f} s in all"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    guards.may_start_processes = item.get_closest_marker("stack") is not None
    item.stash[_compiles_before] = guards.compiles_so_far()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    result = yield
    guards.may_start_processes = True
    compiled = guards.engine_compiles_since(item.stash.get(_compiles_before, guards.compiles_so_far()))
    if compiled and item.get_closest_marker("engine") is None:
        raise AssertionError(
            f"{item.nodeid} compiled {len(compiled)} JAX programs in this process ({', '.join(sorted(set(compiled)))}) "
            "but is not marked `engine`: add its fixture to FIXTURE_MARKS or its module to PATH_MARKS in "
            "tests/conftest.py"
        )
    return result


_compiles_before = pytest.StashKey[int]()


def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of the whole run, the same in every pytest-xdist worker (each has its own basetemp inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compile cache (SDXL_COMPILE_CACHE_DIR, worker/engine/cache.py) for the whole run: this process' engines
    use it from the first test on, and the worker processes that the stacks start are given it, so a program of
    the tiny model compiles once per run, not once per engine or worker. The tests of cold and warm starts keep
    their own, in fresh processes (tests/worker/engine/test_devices.py)."""
    from worker.engine import cache

    root = run_folder(tmp_path_factory) / "compile-cache"
    cache.enable(root)
    return root


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as PyTorch-layout safetensors, where worker subprocesses find it too."""
    from worker.engine import tiny

    folder = run_folder(tmp_path_factory) / "tiny"  # one per run: ensure() is safe for racing xdist workers
    tiny.ensure(folder)
    os.environ["SDXL_TINY_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_refiner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny refiner (the second text encoder alone, 5 time ids), served beside the tiny model by live_stack."""
    from worker.engine import tiny

    folder = run_folder(tmp_path_factory) / "tiny-refiner"
    tiny.ensure(folder, preset="tiny-refiner")
    return folder


@pytest.fixture(scope="session")
def live_loras(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LoRA adapters for the tiny model, served by live_stack (SDXL_LORA_DIR): kohya's layout with alphas on the
    UNet and both text encoders, diffusers/PEFT's on the UNet and the second, and a small kohya one."""
    from tests.helpers import variants

    folder = tmp_path_factory.mktemp("live-loras")
    variants.write_lora(tiny_dir, folder / "pixel-art.safetensors", "kohya", 4, 11, alpha=2.0)
    variants.write_lora(
        tiny_dir, folder / "watercolor.safetensors", "diffusers", 8, 12, parts=("unet", "text_encoder_2")
    )
    variants.write_lora(tiny_dir, folder / "ink.safetensors", "kohya", 2, 13, alpha=1.0)
    return folder


@pytest.fixture(scope="session")
def live_unet(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A UNet-only weights file for the tiny model (as SDXL-Lightning ships its UNet): live_stack's second model
    is the tiny model with it (SDXL_MODELS `lightning=tiny;unet=...`)."""
    from tests.helpers import variants

    return variants.write_unet(tiny_dir, tmp_path_factory.mktemp("live-unet") / "unet.safetensors")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """A real Redis-compatible server (embedded Valkey) owned by this test run, AOF on, noeviction."""
    from common import redis_server
    from tests.helpers.servers import free_port

    # A port of the kernel's choosing: Valkey's own scans up from 16380, and pytest-xdist workers (or other test
    # runs on the machine) that start together would take the same one.
    server = redis_server.start_embedded(tmp_path_factory.mktemp("valkey"), free_port())
    yield f"redis://127.0.0.1:{server.port}/0"
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory):
    """A Redis Cluster owned by this test run: three Valkey masters, no replicas (tests/helpers/servers.py). The
    stores' tests run on it as well as on `redis_url` (tests/common/conftest.py `store_redis`)."""
    from tests.helpers.servers import ValkeyCluster

    cluster = ValkeyCluster(tmp_path_factory.mktemp("valkey-cluster"))
    try:
        cluster.start()
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
def key_prefix() -> str:
    """A fresh key prefix per test: tests never see each other's records, and nothing is flushed (flushing
    would also drop Celery's queue bindings under a running worker)."""
    import uuid

    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    from tests.helpers.servers import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def live_stack(
    compile_cache: Path,
    redis_url: str,
    tiny_dir: Path,
    tiny_refiner_dir: Path,
    live_loras: Path,
    live_unet: Path,
    tmp_path_factory: pytest.TempPathFactory,
):
    """The service as a user reaches it, over HTTP: `uvicorn api.main:app` and `python -m worker` running the
    tiny JAX engine on this CPU (two models: `tiny`, the default, and `lightning`, the tiny model with another
    UNet; LoRA adapters from live_loras), local-folder storage, a real Redis. Shared by the client, OpenAI, event
    stream, browser and observability tests (one worker start for all of them). Yields (API url, API key,
    settings); both processes log JSON into `live_stack_folder` (api.log, worker.log), and the worker serves its
    metrics on settings.worker_metrics_port."""
    import uuid

    import redis

    from common.api_keys import ApiKeyStore
    from tests.helpers.servers import ApiProcess, WorkerProcess, free_port, live_stack_folder, settings_from

    prefix = f"live{uuid.uuid4().hex[:8]}"
    folder = live_stack_folder(tmp_path_factory)
    folder.mkdir()
    env = {
        "SDXL_REDIS_URL": redis_url,
        "SDXL_KEY_PREFIX": prefix,
        "SDXL_QUEUE_NAME": f"{prefix}-q",
        "SDXL_BULK_QUEUE_NAME": f"{prefix}-bulk",
        "SDXL_TINY_DIR": str(tiny_dir),
        "SDXL_MODELS": f"tiny=tiny,lightning=tiny;unet={live_unet}",
        "SDXL_LORA_DIR": str(live_loras),
        "SDXL_LORA_MAX_RANK": "8",
        "SDXL_REFINER": str(tiny_refiner_dir),
        "SDXL_DTYPE": "float32",
        "SDXL_IMAGE_SIZES": "64x64,96x64",
        "SDXL_BATCH_ROWS": "4",
        "SDXL_BATCH_TIMEOUT_S": "1",
        "SDXL_LOCAL_STORAGE_DIR": str(folder / "images"),
        "SDXL_URL_SIGNING_SECRET": "l" * 32,
        "SDXL_COMPILE_CACHE_DIR": str(compile_cache),
        "SDXL_LOG_FORMAT": "json",
        "SDXL_WORKER_METRICS_PORT": str(free_port()),
    }
    api = ApiProcess(env, folder / "api.log")
    env["SDXL_PUBLIC_BASE_URL"] = api.url
    worker = WorkerProcess(env, folder / "worker.log")
    worker.start(redis_url, prefix)
    api.start()
    settings = settings_from(env)
    _, key = ApiKeyStore(redis.Redis.from_url(redis_url), prefix).create("live", "tests")
    try:
        yield api.url, key, settings
    finally:
        api.stop()
        worker.stop()
