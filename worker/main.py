"""Start a worker: load the model and compile every served shape in this process, then consume jobs.

    python -m worker

Celery runs with its threads pool: there is no fork, so JAX lives in the one process that uses it.
Concurrency (how many jobs one worker holds at once) is two batches' worth, so the next batch gathers
while the current one runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from common import logs
from common.batch_log import BatchLog
from common.job_store import JobStore
from common.outage import die
from common.queue import TASK_GENERATE, TASK_WEBHOOK, generate_queue, worker_queues
from common.settings import Settings, get_settings
from common.storage import from_settings
from common.worker_registry import WorkerRegistry

# The engine never uses PyTorch or diffusers (its networks are worker/engine/unet.py, vae.py, clip.py), but
# transformers, whose CLIPTokenizer it uses, looks for torch on some import paths: with a CUDA torch present,
# as on most GPU hosts, an import of torch costs seconds of a start. Marked absent here, before anything
# imports transformers, it takes its no-torch paths.
sys.modules.setdefault("torch", None)  # type: ignore[arg-type]

log = logging.getLogger("worker")
# adapters resident at once, whatever SDXL_LORA_CACHE_BYTES allows: the bank is allocated whole at start, and a
# small model's slots are so small that the budget alone would allocate thousands
MAX_LORA_SLOTS = 64
# SDXL_BATCH_ROWS unset: rows per GPU on a GPU of 80 GB or more. SDXL at 1024x1024 with 8 guided rows is an
# 18.5 GiB program on an H200 (weights 6.2 GiB, 1.53 GiB a row: docs/benchmarks.md), and 8 rows gave 0.582 s an
# image against 0.603 s at 4; a smaller GPU keeps the settings' default.
LARGE_GPU_ROWS = 8
# 80 GB cards report about 79.6 GiB; this leaves room for what the driver keeps
LARGE_GPU_BYTES = 70 * 2**30
# JAX's share of a GPU's memory when XLA_PYTHON_CLIENT_MEM_FRACTION is unset (its documented default)
JAX_MEMORY_FRACTION = 0.75


def batch_rows(settings: Settings) -> int:
    """SDXL_BATCH_ROWS, or when it is unset the platform's (platform_batch_rows). JAX is imported here."""
    if "batch_rows" in settings.model_fields_set:
        return settings.batch_rows
    import jax

    devices = jax.local_devices()
    limit = (devices[0].memory_stats() or {}).get("bytes_limit", 0)
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_MEMORY_FRACTION))
    return platform_batch_rows(devices[0].platform, len(devices), limit / fraction, settings.batch_rows)


def platform_batch_rows(platform: str, devices: int, device_bytes: float, default: int) -> int:
    """LARGE_GPU_ROWS per GPU on GPUs of LARGE_GPU_BYTES or more, else `default`. device_bytes: one device's
    memory, read back from what JAX may use of it (`bytes_limit`) and the fraction JAX takes."""
    if platform == "gpu" and device_bytes >= LARGE_GPU_BYTES:
        return LARGE_GPU_ROWS * devices
    return default


def build_engine(settings: Settings):  # -> Engine: the default model's (benchmarks, tests)
    return next(iter(build_engines(settings).values()))


def lora_registry(settings: Settings):  # -> Registry | None
    """The adapters of SDXL_LORA_DIR (a folder, or a prefix in the deployment's storage), or None."""
    if not settings.lora_dir:
        return None
    from common.loras import Registry

    return Registry(settings.lora_dir, from_settings(settings, need_signing=False), settings.lora_cache_dir)


def build_engines(settings: Settings, registry=None) -> dict:  # -> {model name: Engine}; JAX imported here
    """An engine per served model (SDXL_MODELS, or SDXL_MODEL), in order, for those whose weights fit together
    in SDXL_MODEL_MEMORY_BYTES; each compiled, its weights hashed and on the devices."""
    mine = {name.strip() for name in settings.worker_models.split(",") if name.strip()}
    entries = [e for e in settings.model_entries if not mine or e.name in mine]
    if not entries:
        raise SystemExit(f"SDXL_WORKER_MODELS={settings.worker_models!r} names none of SDXL_MODELS: nothing to serve")
    registry = registry or lora_registry(settings)
    if all(e.spec == "standin" for e in entries):
        from worker.engine.standin import StandInEngine

        log.warning("model=standin: a fixed-duration stand-in for queue benchmarks, not a model")
        sizes, rows, batch_s = settings.served_sizes, settings.batch_rows, settings.standin_batch_s
        return {e.name: StandInEngine(sizes, rows, batch_s) for e in entries}
    from worker.engine import cache, model

    t0 = time.perf_counter()
    folder = cache.enable(settings.compile_cache_dir, settings.xla_cache_dir or None)
    rows = batch_rows(settings)
    if rows != settings.batch_rows:
        log.info("SDXL_BATCH_ROWS unset: %d rows per batch on this platform", rows)
        settings = settings.model_copy(update={"batch_rows": rows})
    refiner = None
    left = settings.model_memory_bytes or None
    # what the models and the refiner share; the refiner is read whole, in its own files' precision
    shared = model.LoadOptions(
        model.resolve_dtype(settings.dtype),
        shape_cache=folder / "shapes",
        weight_cache_dir=folder / "weights" if settings.weight_cache else None,
        vae_dtype=settings.vae_dtype,
        quantize=model.Quantize(settings.quantize),
        # a CPU serves the weights from host memory; an accelerator's host holds only the group being placed
        resident_on_host=jax_platform() == "cpu",
        available_bytes=_available_bytes(settings),
    )
    decoder = _preview_decoder(settings)
    engines = {}
    for i, entry in enumerate(entries):
        options = dataclasses.replace(
            shared,
            variant=settings.model_variant,
            # The weights are read on a thread while the programs compile (or load from the cache): a start
            # takes about the longer of the two, not their sum.
            background=True,
            config_dir=Path(settings.model_config_dir) if settings.model_config_dir else None,
            unet=entry.unet or None,
            vae=entry.vae or None,
            max_bytes=left,
        )
        try:
            m = model.load(entry.spec, options)
        except model.ModelTooLarge as exc:
            log.warning("not serving model %r: %s (SDXL_MODEL_MEMORY_BYTES)", entry.name, exc)
            continue
        except model.NotEnoughMemory as exc:  # said and ended here, before the kernel ends it mid-read
            log.error("%s", exc)
            raise SystemExit(f"not starting: {exc}") from exc
        if left is not None:
            left -= m.nbytes
        if i == 0 and settings.refiner:  # read while the model's weights are still coming in (background)
            refiner = model.load(settings.refiner, shared)
        # the refiner beside the default model only (its weights would be on the devices once per model)
        served_refiner = refiner if i == 0 else None
        engines[entry.name] = _engine(settings, m, folder, served_refiner, t0, registry, i == 0, decoder)
    if not engines:
        raise SystemExit(f"no model fits in SDXL_MODEL_MEMORY_BYTES={settings.model_memory_bytes}: nothing to serve")
    log.info("serving %d models: %s", len(engines), ", ".join(engines))
    return engines


def jax_platform() -> str:
    import jax

    return jax.devices()[0].platform


def _available_bytes(settings: Settings):  # -> Callable[[], int]: the host memory the weights may take
    from worker.engine import host_memory

    if settings.host_available_bytes:
        return lambda: settings.host_available_bytes
    return host_memory.available_bytes


def _controlnets(settings: Settings, m) -> list:  # -> [ControlModel]
    """SDXL_CONTROLNETS, read for model `m` (the default one) in its dtype; a ControlNet that is not for it stops
    the start, naming it."""
    from worker.engine import controlnet_source

    loaded = []
    for name, spec in settings.controlnet_specs.items():
        try:
            loaded.append(controlnet_source.load(name, spec, m.unet, m.dtype))
        except controlnet_source.ModelError as exc:
            raise SystemExit(f"SDXL_CONTROLNETS: {exc}") from None
        log.info("ControlNet %r from %s", name, loaded[-1].source)
    return loaded


def _ip_adapters(settings: Settings, m) -> list:  # -> [IPAdapterModel]
    """SDXL_IP_ADAPTERS, read for model `m` (the default one) in its dtype; one that does not fit stops the start."""
    from worker.engine import ip_adapter_source

    loaded = []
    for name, spec in settings.ip_adapter_specs.items():
        try:
            loaded.append(ip_adapter_source.load(name, spec, m.unet, m.dtype))
        except ip_adapter_source.ModelError as exc:
            raise SystemExit(f"SDXL_IP_ADAPTERS: {exc}") from None
        log.info("IP-Adapter %r from %s", name, loaded[-1].source)
    return loaded


def _preview_decoder(settings: Settings):  # -> taesd.PreviewDecoder | None
    """SDXL_PREVIEW_DECODER's TAESD, read once for every model's engine; one that cannot be read stops the start."""
    if not settings.preview_decoder:
        return None
    from worker.engine import taesd

    try:
        decoder = taesd.load(settings.preview_decoder)
    except taesd.ModelError as exc:
        raise SystemExit(f"SDXL_PREVIEW_DECODER: {exc}") from None
    log.info("previews decoded by TAESD from %s", decoder.source)
    return decoder


def _engine(settings: Settings, m, folder, refiner, t0: float, registry, default: bool = True, decoder=None):
    import jax
    import numpy as np

    from worker.engine import cache, lora
    from worker.engine.engine import Adapters, Engine

    t1 = time.perf_counter()
    adapters = None
    if registry is not None:
        per_slot = lora.Bank.slot_bytes(m, settings.lora_max_rank, m.dtype)
        slots = max(1, min(settings.lora_cache_bytes // per_slot, MAX_LORA_SLOTS))
        if slots < settings.batch_rows * settings.max_loras_per_job:
            log.warning(
                "SDXL_LORA_CACHE_BYTES holds %d adapters (%d bytes each at rank %d): a batch naming more runs its jobs "
                "one by one",
                slots,
                per_slot,
                settings.lora_max_rank,
            )
        adapters = Adapters(registry.path_of, settings.lora_max_rank, slots, settings.max_loras_per_job)
    controlnets = _controlnets(settings, m) if default else []  # with the default model only, as the refiner
    ip_adapters = _ip_adapters(settings, m) if default else []
    key = settings.cache_signing_key.get_secret_value() if settings.cache_signing_key else None
    if decoder is not None and decoder.config.latent_channels != m.latent_channels:
        raise SystemExit(
            f"SDXL_PREVIEW_DECODER: its TAESD decodes {decoder.config.latent_channels} latent channels, model "
            f"{m.name!r} has {m.latent_channels}"
        )
    engine = Engine(
        m,
        settings.served_sizes,
        settings.batch_rows,
        attention=settings.attention,
        aot_dir=folder / "executables",
        aot_key=cache.signing_key(key),
        progress_every_steps=settings.progress_every_steps,
        refiner=refiner,
        adapters=adapters,
        controlnets=controlnets,
        ip_adapters=ip_adapters,
        preview_decoder=decoder,
    )
    compile_s = engine.compile()
    for c in [
        *controlnets,
        *ip_adapters,
    ]:  # on the devices now: keep only the shapes the programs are traced with (SDXL's: 2.5 GB)
        c.params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), c.params)
    for served in (m, refiner):
        if served is not None:
            served.digest_weights()  # recorded with every image: which weights made it
            # The devices hold the weights now; the host copy would stay for the life of the process (SDXL: 6.7 GB).
            served.drop_host_weights()
    if refiner is not None:
        log.info("refiner %s (weights sha256 %s) served beside the model", refiner.name, refiner.weights_hash[:16])
    if engine.bank is not None:
        log.info(
            "LoRA adapters from %s: %d slots of rank %d, %d per job",
            settings.lora_dir,
            engine.bank.slots,
            engine.bank.rank,
            engine.bank.per_row,
        )
    t2 = time.perf_counter()
    log.info(
        "engine ready in %.1f s: model %s (%s, weights sha256 %s), %d devices, sizes %s, batch %d; modules %.1f s, "
        "then weights %.1f s (%s), placed in %.1f s, and programs %.1f s side by side (%s), then waited %.1f s for "
        "the weights; cache %s",
        t2 - t0,
        m.name,
        np.dtype(m.dtype).name + ("" if m.quantize == "none" else f", {m.quantize}"),
        m.weights_hash[:16],
        engine.mesh.devices.size,
        settings.image_sizes,
        settings.batch_rows,
        t1 - t0,
        m.weights_s,
        ", ".join([*(f"{part} {source}" for part, source in m.weight_sources.items()), f"hash {m.hash_from}"]),
        engine.place_s,
        sum(compile_s.values()),
        ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()),
        engine.weights_wait_s,
        folder,
    )
    return engine


def main() -> None:
    settings = get_settings()
    logs.configure(settings.log_format)
    from common import redis_connection
    from worker import metrics, tasks
    from worker.device_loop import DeviceLoop, LoopSettings

    registry = lora_registry(settings)
    engines = build_engines(settings, registry)
    metrics.serve(settings.worker_metrics_port)
    client = redis_connection.sync_client(settings)
    redis_connection.check_credentials(client)  # a wrong password stops the start, naming SDXL_REDIS_URL
    store = JobStore(
        client,
        settings.key_prefix,
        settings.job_ttl_s,
        settings.running_deadline_s,
        default_model=settings.model_entries[0].name,
        durability=redis_connection.Durability.of(settings),  # a job's take and start (worker/loop/dispatcher.py)
    )
    workers = WorkerRegistry(client, settings.key_prefix)
    # unique per process: the heartbeat, the held-jobs set and the job records name it (the pid tells two
    # workers on one host apart; the time, a pid reused by a restart in the same container)
    name = f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"

    def send(job_id: str, model: str | None, lane: str = "", generation: int | None = None) -> None:
        if lane != "bulk":  # queued again, so ready again (by the script that queued it): a wake-up names no job,
            # only the model whose ready jobs it takes, on that model's queue
            tasks.app.send_task(TASK_GENERATE, args=[], kwargs={"model": model}, queue=generate_queue(settings, model))
            return
        args = [job_id] if generation is None else [job_id, generation]
        tasks.app.send_task(TASK_GENERATE, args=args, queue=generate_queue(settings, model, "bulk"))

    loop = DeviceLoop(
        engines,
        store,
        from_settings(settings, need_signing=False),
        LoopSettings.of(settings),
        name=name,
        loras=registry,
        enqueue=lambda job: send(job.id, job.request.model, job.lane, job.generation),
        # the webhook queue: a job thread only queues a delivery; worker/webhook_sender.py makes it
        notify=lambda job_id: tasks.app.send_task(TASK_WEBHOOK, args=[job_id], queue=settings.webhook_queue),
        workers=workers,
        batches=BatchLog(client, settings.key_prefix),
        waiting_messages=lambda model: store.messages_waiting(generate_queue(settings, model)),
    )
    loop.start()
    tasks.bind(loop)
    image_sweeper = None
    if settings.image_sweep_interval_s:
        from common.dataset_store import DatasetStore
        from common.input_store import InputStore
        from worker.image_retention import ImageSweeper

        image_sweeper = ImageSweeper(
            loop.storage,
            store,
            workers,
            owner=name,
            interval_s=settings.image_sweep_interval_s,
            inputs=InputStore(client, settings.key_prefix),
            input_grace_s=settings.input_grace_s,
            runs=DatasetStore(client, settings.key_prefix, settings.job_ttl_s),
        )
        image_sweeper.start()
    feeder = None
    if settings.dataset_feeder:
        from common.dataset_store import DatasetStore
        from worker.feeder import Feeder

        feeder = Feeder(
            DatasetStore(client, settings.key_prefix, settings.job_ttl_s),
            store,
            loop.storage,
            lambda job_id, model: send(job_id, model, "bulk"),
            owner=name,
            depth=settings.dataset_feed_depth,
            step_attempts=settings.dataset_step_attempts,
        )
        feeder.start()

    from celery.signals import worker_ready, worker_shutting_down

    from worker.webhook_sender_process import SenderProcess

    # Deliveries are made by a process of their own (worker/webhook_sender.py), started once Celery consumes
    # jobs (its own "ready." line comes after the worker's) and stopped with the worker.
    sender = SenderProcess(settings)
    worker_ready.connect(lambda **_: sender.start(), weak=False)

    # Celery's warm shutdown (SIGTERM) stops consuming and waits for running tasks; buffered jobs are told
    # to go back to the queue so it does not wait for them, only for the batches already on the device.
    asked_to_stop = threading.Event()

    def shutting_down(**_: object) -> None:
        asked_to_stop.set()
        if feeder is not None:
            feeder.stop()  # hands its runs to another worker now, not after the lock expires
        loop.begin_shutdown()
        sender.begin_stop()  # its tries under way end while the batches on the device do

    worker_shutting_down.connect(shutting_down, weak=False)
    tasks.app.conf.worker_hijack_root_logger = False  # our handler (text or JSON, with ids) stays, for Celery too
    exit_code: int | str | None = 0
    try:
        tasks.app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={2 * max(engine.batch_rows for engine in engines.values())}",
                f"--queues={','.join(worker_queues(settings, engines))}",  # in priority order (common/queue.py)
                f"--hostname=sdxl@{name}",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    except SystemExit as exc:
        exit_code = exc.code
    if not asked_to_stop.is_set():
        # Celery stopped by itself (an "Unrecoverable error"): the device loop and its heartbeat would go on
        # in a process that takes no work. Out at once, non-zero, so that the supervisor starts a new one.
        die(f"Celery's consumer (exit code {exit_code!r}, no shutdown was asked for)")
    loop.stop()
    sender.stop()
    if image_sweeper is not None:
        image_sweeper.stop()
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
