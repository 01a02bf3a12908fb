"""A Python client of the service's HTTP API, sync and async, on httpx.

    from client import Client
    with Client("http://127.0.0.1:8000", api_key="sdxl_...") as sdxl:
        job = sdxl.generate("a lighthouse at dusk", width=1024, height=1024, steps=20)
        png = sdxl.download(job.images[0])

    async with AsyncClient(url, api_key=key) as sdxl:
        job = await sdxl.submit("a red bicycle")
        async for event in sdxl.events(job.id):   # queued -> running (step by step) -> succeeded
            # with submit(..., preview=True), event.preview: a small WebP data URL every few steps
            print(event.name, event.data)

What every call does the same way:
- An error answer raises `ApiError` carrying the server's problem details (RFC 9457: status, title, detail,
  and for refused data set lines, `lines`).
- A service that is away (connection errors, 502/503/504) or a rate limit (429) is waited out: the answer's
  Retry-After when given, else a backoff from `backoff_s` doubling to a minute, for up to `patience_s` in a row;
  then `Unreachable`. Submits carry an Idempotency-Key (made here unless given), so a retried submit whose
  first answer was lost cannot make a second job.
- Waiting is never a poll loop: `wait` holds one request open until the job ends (`?wait_s=`, the most the
  server allows each time) and `events` reads the job's Server-Sent Events.

It imports nothing from api/, worker/ or JAX: only HTTP. The job and data set answers are typed views
(`Job`, `Image`, `Dataset`) over the JSON, which stays reachable as `.raw`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")
TRANSIENT = frozenset({429, 502, 503, 504})  # answers worth waiting out; any other error is final
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
LONG_POLL_S = 55.0  # one wait request; the server caps it at its SDXL_MAX_WAIT_S (default 55)
MAX_BACKOFF_S = 60.0
TRANSPORT_ERRORS = ("ConnectError", "ConnectTimeout", "ReadError", "ReadTimeout", "RemoteProtocolError")


class ApiError(Exception):
    """An error answer. `problem` is the server's problem details (RFC 9457) as sent; `detail` says what to fix."""

    def __init__(self, status: int, problem: dict[str, Any], method: str = "", url: str = ""):
        self.status = status
        self.problem = problem
        self.title = str(problem.get("title", ""))
        self.detail = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
        self.retry_after_s: float | None = problem.get("retry_after_s")
        self.method, self.url = method, url
        super().__init__(f"{status}: {self.detail}")

    @property
    def lines(self) -> list[dict[str, Any]]:
        """A refused data set's bad lines: [{line, field, message}]."""
        return list(self.problem.get("lines", []))


class Unreachable(Exception):
    """The service did not answer (or kept answering 429/5xx) for the whole patience."""


@dataclass(frozen=True)
class Image:
    url: str
    seed: int
    width: int
    height: int
    sha256: str
    model: str = ""  # the model and its weights' sha256: which weights made it
    model_hash: str = ""
    loras: tuple[dict[str, Any], ...] = ()  # the adapters applied: name, scale, sha256


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    request: dict[str, Any]
    images: list[Image]
    queue_position: int | None
    progress: dict[str, Any] | None  # {"step", "steps"} once running (and "preview" on some, with preview)
    error: str | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, data: dict[str, Any]) -> Job:
        images = [
            Image(
                **{k: i[k] for k in ("url", "seed", "width", "height", "sha256")},
                model=i.get("model", ""),
                model_hash=i.get("model_hash", ""),
                loras=tuple(i.get("loras", ())),
            )
            for i in data["images"]
        ]
        return cls(
            id=data["id"],
            status=data["status"],
            request=data.get("request", {}),
            images=images,
            queue_position=data.get("queue_position"),
            progress=data.get("progress"),
            error=data.get("error"),
            raw=data,
        )

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class Dataset:
    id: str
    status: str
    counts: dict[str, int]
    eta_s: float | None
    images_per_s: float | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, data: dict[str, Any]) -> Dataset:
        return cls(data["id"], data["status"], data["counts"], data.get("eta_s"), data.get("images_per_s"), data)

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "canceled")


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of a job: `name` is queued, running, succeeded, failed or canceled."""

    name: str
    data: dict[str, Any]

    @property
    def final(self) -> bool:
        return self.name in TERMINAL

    @property
    def preview(self) -> str | None:
        """The job's current estimate as a `data:image/webp;base64,...` URL, on the running events that carry
        one (a job submitted with preview=True, every few steps); else None."""
        return (self.data.get("progress") or {}).get("preview") if self.name == "running" else None

    @property
    def preview_bytes(self) -> bytes | None:
        """The preview's WebP file, decoded from its data URL."""
        url = self.preview
        return base64.b64decode(url.split(",", 1)[1]) if url else None


# ---------------------------------------------------------------------- what both clients share


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or DEFAULT_PORTS.get(url.scheme)


def _download_request(http: Any, url: str) -> httpx.Request:
    """A GET of a signed image URL. The signature is the credential, and the URL may be on another host (S3, a
    CDN): the API key (any Authorization header) goes to the API's own origin only, never to the storage's."""
    request = http.build_request("GET", url)
    if _origin(request.url) != _origin(httpx.URL(str(http.base_url))):
        request.headers.pop("Authorization", None)
    return request


def _raise_for(response: Any) -> None:
    """ApiError for an error answer; also for answers of httpx-compatible clients of other packages
    (starlette's TestClient), whose own HTTPStatusError is another class."""
    if response.status_code < 400:
        return
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            problem = {"detail": str(problem)}
    except ValueError:
        problem = {"detail": response.text[:500] or f"HTTP {response.status_code}"}
    if "Retry-After" in response.headers:
        problem.setdefault("retry_after_s", _seconds(response.headers["Retry-After"]))
    request = response.request
    raise ApiError(response.status_code, problem, request.method, str(request.url))


def _seconds(value: str) -> float | None:
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare here; the backoff applies


def _transient(exc: Exception, retry_statuses: frozenset[int]) -> tuple[str, float | None] | None:
    """(why, the server's Retry-After) when `exc` is worth waiting out, else None."""
    if isinstance(exc, ApiError):
        return (str(exc.status), exc.retry_after_s) if exc.status in retry_statuses else None
    # httpx2's classes (starlette's TestClient is built on it where installed) are other classes: by name too
    if isinstance(exc, httpx.TransportError) or type(exc).__name__ in TRANSPORT_ERRORS:
        return type(exc).__name__, None
    return None


def encode_image(source: str | Path | bytes | Any) -> str:
    """An init_image or mask_image for a job: a file path, encoded bytes (PNG, JPEG, WebP), a PIL image or a
    numpy array (H, W, 3) or (H, W) uint8, as the base64 PNG the API takes."""
    if isinstance(source, str | Path):
        data = Path(source).read_bytes()
    elif isinstance(source, bytes):
        data = source
    else:
        from PIL import Image as PILImage

        picture = source if isinstance(source, PILImage.Image) else PILImage.fromarray(source)
        out = io.BytesIO()
        picture.save(out, format="PNG")
        data = out.getvalue()
    return base64.b64encode(data).decode()


def _job_body(prompt: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": prompt, **{k: v for k, v in params.items() if v is not None}}


class _EventParser:
    """text/event-stream, a line at a time: `feed` returns an event at each blank line that ends one
    (comments and retry hints are skipped)."""

    def __init__(self) -> None:
        self.name, self.data = "message", []

    def feed(self, line: str) -> Event | None:
        if line == "":
            event = Event(self.name, json.loads("\n".join(self.data))) if self.data else None
            self.name, self.data = "message", []
            return event
        key, _, value = line.partition(":")
        if key == "event":
            self.name = value.removeprefix(" ")
        elif key == "data":
            self.data.append(value.removeprefix(" "))
        return None


def _parse_events(lines: Iterator[str]) -> Iterator[Event]:
    parser = _EventParser()
    for line in lines:
        event = parser.feed(line)
        if event is not None:
            yield event


@dataclass
class _Retry:
    """The waiting-out policy (see the module's docstring)."""

    patience_s: float
    backoff_s: float
    on_retry: Callable[[str, str, float], None] | None  # (what, why, seconds) before each pause

    def pause(self, what: str, exc: Exception, started: float, backoff_s: float, statuses: frozenset[int]) -> float:
        """Seconds to wait before trying again; raises `exc` (final) or Unreachable (patience spent)."""
        transient = _transient(exc, statuses)
        if transient is None:
            raise exc
        why, after_s = transient
        wait_s = after_s if after_s is not None else backoff_s
        if time.monotonic() + wait_s > started + self.patience_s:
            raise Unreachable(f"{what}: no answer for {self.patience_s:.0f} s (last: {why})") from exc
        if self.on_retry is not None:
            self.on_retry(what, why, wait_s)
        return wait_s


# ---------------------------------------------------------------------- sync


class Client:
    """The sync client. `http`: an httpx.Client (or a compatible one, such as starlette's TestClient) to use
    instead of making one; `on_retry(what, why, seconds)` hears of each pause while waiting out an outage."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout_s: float = 60.0,
        patience_s: float = 600.0,
        backoff_s: float = 1.0,
        http: Any = None,
        on_retry: Callable[[str, str, float], None] | None = None,
    ):
        self.http = http or httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s)
        self.http.headers.update(_headers(api_key))
        self.timeout_s = timeout_s
        self.retry = _Retry(patience_s, backoff_s, on_retry)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _patiently(self, what: str, call: Callable[[], T], statuses: frozenset[int] = TRANSIENT) -> T:
        started, backoff_s = time.monotonic(), self.retry.backoff_s
        while True:
            try:
                return call()
            except Exception as exc:
                time.sleep(self.retry.pause(what, exc, started, backoff_s, statuses))
                backoff_s = min(2 * backoff_s, MAX_BACKOFF_S)

    def request(self, method: str, path: str, statuses: frozenset[int] = TRANSIENT, **kwargs: Any) -> Any:
        """One API call, waited out through outages; the decoded JSON answer."""

        def call() -> Any:
            response = self.http.request(method, path, **kwargs)
            _raise_for(response)
            return response.json()

        return self._patiently(f"{method} {path}", call, statuses)

    # --- jobs

    def submit(
        self, prompt: str, *, idempotency_key: str | None = None, wait_s: float | None = None, **params: Any
    ) -> Job:
        """Submit a job (parameters as in POST /v1/jobs: width, height, steps, seed, num_images...). With
        `wait_s`, the answer comes once the job has ended or that long has passed (`Prefer: wait`)."""
        headers = {"Idempotency-Key": idempotency_key or f"client-{uuid.uuid4().hex}"}
        if wait_s is not None:
            headers["Prefer"] = f"wait={wait_s:g}"
        timeout = (wait_s or 0) + self.timeout_s
        return Job.of(
            self.request("POST", "/v1/jobs", json=_job_body(prompt, params), headers=headers, timeout=timeout)
        )

    def get(self, job_id: str, wait_s: float = 0) -> Job:
        params = {"wait_s": f"{wait_s:g}"} if wait_s else None
        return Job.of(self.request("GET", f"/v1/jobs/{job_id}", params=params, timeout=wait_s + self.timeout_s))

    def wait(self, job_id: str, timeout_s: float = 600.0) -> Job:
        """The job once it has ended (or as it is after `timeout_s`): long waits, never a poll loop."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            job = self.get(job_id, wait_s=max(0.0, min(LONG_POLL_S, remaining)))
            if job.ended or remaining <= LONG_POLL_S:
                return job

    def generate(self, prompt: str, *, timeout_s: float = 600.0, **params: Any) -> Job:
        """Submit and wait for the end in the same request when the job is quick, else wait on; the job ended
        (its status says whether it succeeded)."""
        job = self.submit(prompt, wait_s=min(LONG_POLL_S, timeout_s), **params)
        return job if job.ended else self.wait(job.id, timeout_s)

    def events(self, job_id: str) -> Iterator[Event]:
        """The job's Server-Sent Events until it ends (GET /v1/jobs/{id}/events); a dropped stream is opened
        again (each event carries the whole state, so nothing is lost by reconnecting)."""
        while True:

            def open_stream() -> Iterator[Event]:
                no_read_timeout = httpx.Timeout(self.timeout_s, read=None)  # events may be minutes apart
                ctx = self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=no_read_timeout)
                response = ctx.__enter__()
                try:
                    if response.status_code >= 400:
                        response.read()
                        _raise_for(response)
                except BaseException:
                    ctx.__exit__(None, None, None)
                    raise
                return _closing(ctx, _parse_events(response.iter_lines()))

            stream = self._patiently(f"GET /v1/jobs/{job_id}/events", open_stream)
            try:
                for event in stream:
                    yield event
                    if event.final:
                        return
            except httpx.TransportError:
                continue  # dropped mid-stream: open it again
            finally:
                stream.close()

    def download(self, image: Image | str) -> bytes:
        """An image's bytes from its signed URL (a str: any signed URL the service gave)."""
        url = image if isinstance(image, str) else image.url

        def get() -> bytes:
            response = self.http.send(_download_request(self.http, url))
            _raise_for(response)
            return response.content

        return self._patiently(f"GET {url.split('?')[0]}", get)

    def download_to(self, url: str, target: Path) -> None:
        """Stream a signed URL into `target`, whole or not at all (a .part file renamed at the end)."""
        part = target.with_name(target.name + ".part")

        def get() -> None:
            with httpx.stream("GET", url, timeout=self.timeout_s) as response, part.open("wb") as f:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                for block in response.iter_bytes(1 << 20):
                    f.write(block)

        target.parent.mkdir(parents=True, exist_ok=True)
        self._patiently(f"downloading {target.name}", get)
        part.replace(target)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel")

    def jobs(self, offset: int = 0, limit: int = 20) -> list[Job]:
        """The caller's recent jobs, newest first."""
        answer = self.request("GET", "/v1/jobs", params={"offset": offset, "limit": limit})
        return [Job.of(j) for j in answer["jobs"]]

    def models(self) -> dict[str, Any]:
        return self.request("GET", "/v1/models")

    def loras(self) -> dict[str, Any]:
        """The LoRA adapters a job may name in `loras=[{"name": ..., "scale": ...}]`."""
        return self.request("GET", "/v1/loras")

    # --- data sets

    def create_dataset(
        self, jsonl: Path, options: dict[str, Any] | None = None, idempotency_key: str | None = None
    ) -> Dataset:
        """Upload a JSONL of prompts as a data set run. A refusal (bad lines, a limit) raises ApiError at once,
        429 included: too many runs in progress is a limit to report, not an outage to wait out."""

        def post() -> Any:
            with jsonl.open("rb") as f:
                response = self.http.post(
                    "/v1/datasets",
                    files={"input": (jsonl.name, f, "application/x-ndjson")},
                    data={"options": json.dumps(options or {})},
                    headers={"Idempotency-Key": idempotency_key or f"client-{uuid.uuid4().hex}"},
                    timeout=max(600.0, self.timeout_s),  # a large file is validated before the answer
                )
            _raise_for(response)
            return response.json()

        return Dataset.of(self._patiently("POST /v1/datasets", post, TRANSIENT - {429}))

    def dataset(self, run_id: str) -> Dataset:
        return Dataset.of(self.request("GET", f"/v1/datasets/{run_id}"))

    def dataset_files(self, run_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/datasets/{run_id}/files")

    def follow(self, run_id: str, every_s: float = 2.0) -> Iterator[Dataset]:
        """The run's status every `every_s` until it has finished (the last one yielded is the final one)."""
        while True:
            run = self.dataset(run_id)
            yield run
            if run.finished:
                return
            time.sleep(every_s)

    def download_dataset(self, run_id: str, out: Path) -> list[Path]:
        """Every file of the run (shards, manifest parts; once finished the manifest, failures) under `out`."""
        files, fetched = self.dataset_files(run_id), []
        wanted = {f"shards/shard-{i:06d}.tar": url for i, url in enumerate(files["shards"])}
        for name, url in files.items():
            if isinstance(url, str) and name not in ("shards", "manifest_parts"):
                wanted[name.replace("_jsonl", ".jsonl").replace("_parquet", ".parquet")] = url
        for name, url in wanted.items():
            self.download_to(url, out / name)
            fetched.append(out / name)
        return fetched

    def retry_dataset(self, run_id: str) -> dict[str, Any]:
        """Send the run's failed lines back to be generated again."""
        return self.request("POST", f"/v1/datasets/{run_id}/retry")

    def cancel_dataset(self, run_id: str) -> Dataset:
        return Dataset.of(self.request("POST", f"/v1/datasets/{run_id}/cancel"))

    def resume_dataset(self, run_id: str) -> dict[str, Any]:
        """Send a canceled run's canceled lines back to be generated (same ids, same seeds)."""
        return self.request("POST", f"/v1/datasets/{run_id}/resume")

    def datasets(self, offset: int = 0, limit: int = 20) -> list[Dataset]:
        """The tenant's recent runs, newest first."""
        page = self.request("GET", "/v1/datasets", params={"offset": offset, "limit": limit})
        return [Dataset.of(d) for d in page["datasets"]]


class _closing(Iterator[Event]):
    """An event iterator that closes its HTTP stream."""

    def __init__(self, ctx: Any, events: Iterator[Event]):
        self.ctx, self.events = ctx, events

    def __next__(self) -> Event:
        return next(self.events)

    def close(self) -> None:
        self.ctx.__exit__(None, None, None)


# ---------------------------------------------------------------------- async


class AsyncClient:
    """The async client: the sync client's job calls, awaited (data set runs are the CLI's, sync)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout_s: float = 60.0,
        patience_s: float = 600.0,
        backoff_s: float = 1.0,
        http: httpx.AsyncClient | None = None,
        on_retry: Callable[[str, str, float], None] | None = None,
    ):
        self.http = http or httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout_s)
        self.http.headers.update(_headers(api_key))
        self.timeout_s = timeout_s
        self.retry = _Retry(patience_s, backoff_s, on_retry)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _patiently(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        started, backoff_s = time.monotonic(), self.retry.backoff_s
        while True:
            try:
                return await call()
            except Exception as exc:
                await asyncio.sleep(self.retry.pause(what, exc, started, backoff_s, TRANSIENT))
                backoff_s = min(2 * backoff_s, MAX_BACKOFF_S)

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        async def call() -> Any:
            response = await self.http.request(method, path, **kwargs)
            _raise_for(response)
            return response.json()

        return await self._patiently(f"{method} {path}", call)

    async def submit(
        self, prompt: str, *, idempotency_key: str | None = None, wait_s: float | None = None, **params: Any
    ) -> Job:
        headers = {"Idempotency-Key": idempotency_key or f"client-{uuid.uuid4().hex}"}
        if wait_s is not None:
            headers["Prefer"] = f"wait={wait_s:g}"
        answer = await self.request(
            "POST", "/v1/jobs", json=_job_body(prompt, params), headers=headers, timeout=(wait_s or 0) + self.timeout_s
        )
        return Job.of(answer)

    async def get(self, job_id: str, wait_s: float = 0) -> Job:
        params = {"wait_s": f"{wait_s:g}"} if wait_s else None
        return Job.of(await self.request("GET", f"/v1/jobs/{job_id}", params=params, timeout=wait_s + self.timeout_s))

    async def wait(self, job_id: str, timeout_s: float = 600.0) -> Job:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            job = await self.get(job_id, wait_s=max(0.0, min(LONG_POLL_S, remaining)))
            if job.ended or remaining <= LONG_POLL_S:
                return job

    async def generate(self, prompt: str, *, timeout_s: float = 600.0, **params: Any) -> Job:
        job = await self.submit(prompt, wait_s=min(LONG_POLL_S, timeout_s), **params)
        return job if job.ended else await self.wait(job.id, timeout_s)

    async def events(self, job_id: str) -> AsyncIterator[Event]:
        """As Client.events."""
        path = f"/v1/jobs/{job_id}/events"
        while True:
            try:
                async with self.http.stream("GET", path, timeout=httpx.Timeout(self.timeout_s, read=None)) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        _raise_for(response)
                    parser = _EventParser()
                    async for line in response.aiter_lines():
                        event = parser.feed(line)
                        if event is not None:
                            yield event
                            if event.final:
                                return
            except httpx.TransportError as exc:
                await asyncio.sleep(
                    self.retry.pause(f"GET {path}", exc, time.monotonic(), self.retry.backoff_s, TRANSIENT)
                )

    async def download(self, image: Image | str) -> bytes:
        url = image if isinstance(image, str) else image.url

        async def get() -> bytes:
            response = await self.http.send(_download_request(self.http, url))
            _raise_for(response)
            return response.content

        return await self._patiently(f"GET {url.split('?')[0]}", get)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self.request("POST", f"/v1/jobs/{job_id}/cancel")

    async def jobs(self, offset: int = 0, limit: int = 20) -> list[Job]:
        answer = await self.request("GET", "/v1/jobs", params={"offset": offset, "limit": limit})
        return [Job.of(j) for j in answer["jobs"]]

    async def models(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/models")

    async def loras(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/loras")
