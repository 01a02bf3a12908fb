"""Run a JSONL of prompts to a local folder: submit it, show progress, download the shards and manifest.

    python -m client.dataset prompts.jsonl --out my-set --api http://127.0.0.1:8000 --key "$SDXL_API_KEY"

Run the same command again after an interruption (Ctrl-C, a lost connection, a reboot) and it picks up
where it stopped: the run id is kept in <out>/run.json, the submit carries an Idempotency-Key derived from
the input and options (so a crash right after submitting cannot start a second run), and shards already
downloaded are not fetched again. The service keeps generating while this command is not running.

While it runs, a service that does not answer (a restart, Redis away: connection errors, 502/503/504) or a
rate limit (429) costs a pause, not the run: it waits (the answer's Retry-After, else backing off from
--poll-s to a minute) for up to --patience-s in a row, saying so, then gives up with exit status 3.

Exit status: 0 every line succeeded; 1 the run ended with failed or canceled lines (see failures.jsonl);
2 the input was refused (the bad lines are printed); 3 the service did not answer for --patience-s (run it
again to resume); 130 interrupted (run it again to resume).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

FINISHED = ("completed", "canceled")
FINAL_FILES = {"manifest_jsonl": "manifest.jsonl", "manifest_parquet": "manifest.parquet", "failures": "failures.jsonl"}


T = TypeVar("T")
TRANSIENT = (429, 502, 503, 504)  # answers worth waiting out; any other error is final


class Refused(Exception):
    """The service refused the input; the message lists what to fix."""


class Answered(Exception):
    """An HTTP error answer. Raised by _check rather than httpx's raise_for_status: the client may be an
    httpx-compatible one of another package (starlette's TestClient is built on httpx2 where that is
    installed, and huggingface_hub 2 installs it), whose HTTPStatusError is another class."""

    def __init__(self, response: Any):
        super().__init__(f"{response.status_code} from {response.request.method} {response.request.url}")
        self.response = response


def _check(response: Any) -> None:
    if response.status_code >= 400:
        raise Answered(response)


class Unreachable(Exception):
    """The service did not answer (or kept answering 429/5xx) for the whole patience."""


def fingerprint(path: Path, options: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DatasetRunner:
    def __init__(
        self, api: str, key: str | None, out: Path, poll_s: float = 2.0, timeout_s: float = 60, patience_s: float = 600
    ):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=api.rstrip("/"), headers=headers, timeout=timeout_s)
        self.out = out
        self.poll_s = poll_s
        self.patience_s = patience_s

    def _patiently(self, what: str, call: Callable[[], T]) -> T:
        """call() until it does not fail transiently: connection errors and TRANSIENT answers are waited out
        (Retry-After when given, else a backoff from poll_s to 60 s) for up to patience_s in a row."""
        give_up = time.monotonic() + self.patience_s
        backoff_s = self.poll_s
        while True:
            try:
                return call()
            except httpx.TransportError as exc:
                why, wait_s = type(exc).__name__, backoff_s
            except Answered as exc:
                if exc.response.status_code not in TRANSIENT:
                    raise
                why = str(exc.response.status_code)
                wait_s = float(exc.response.headers.get("Retry-After") or backoff_s)
            if time.monotonic() + wait_s > give_up:
                raise Unreachable(f"{what}: no answer for {self.patience_s:.0f} s (last: {why})")
            print(f"{what}: {why}; trying again in {wait_s:.0f} s", file=sys.stderr)
            time.sleep(wait_s)
            backoff_s = min(backoff_s * 2, 60.0)

    def _get_json(self, path: str) -> Any:
        def get() -> Any:
            r = self.http.get(path)
            _check(r)
            return r.json()

        return self._patiently(f"GET {path}", get)

    # ------------------------------------------------------------------ steps

    def submit_or_resume(self, jsonl: Path, options: dict[str, Any]) -> str:
        state_path = self.out / "run.json"
        fp = fingerprint(jsonl, options)
        if state_path.exists():
            state = json.loads(state_path.read_text())
            if state["fingerprint"] != fp:
                raise Refused(f"{self.out} holds run {state['run_id']} of another input or options; use another --out")
            return state["run_id"]

        def post() -> httpx.Response:  # safe to send again: the Idempotency-Key makes at most one run
            with jsonl.open("rb") as f:
                r = self.http.post(
                    "/v1/datasets",
                    files={"input": (jsonl.name, f, "application/x-ndjson")},
                    data={"options": json.dumps(options)},
                    headers={"Idempotency-Key": f"cli-{fp}"},
                    timeout=max(600.0, self.http.timeout.read or 0),  # a large file is validated before the answer
                )
            if r.status_code >= 500:
                _check(r)  # 502/503/504 are waited out; a 429 here is a limit to report (below)
            return r

        r = self._patiently("submitting", post)
        if 400 <= r.status_code < 500:  # the server says what to fix: bad lines, a bad key, a limit (429)
            try:
                body = r.json()
            except ValueError:
                body = {}
            lines = "".join(f"\n  line {e['line']}: {e['field']}: {e['message']}" for e in body.get("lines", []))
            message = body.get("detail") or r.text  # RFC 9457 problem details (api/errors.py)
            retry = f" (the server says retry in {r.headers['Retry-After']} s)" if "Retry-After" in r.headers else ""
            raise Refused(f"{r.status_code}: {message}{retry}{lines}")
        _check(r)
        run_id = r.json()["id"]
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": run_id, "fingerprint": fp, "input": str(jsonl)}))
        os.replace(tmp, state_path)
        return run_id

    def status(self, run_id: str) -> dict[str, Any]:
        return self._get_json(f"/v1/datasets/{run_id}")

    def download_new(self, run_id: str, finished: bool) -> int:
        """Fetch shards (and, once finished, the manifest and failures) not yet here; returns files fetched."""
        files = self._get_json(f"/v1/datasets/{run_id}/files")
        wanted = {f"shards/shard-{i:06d}.tar": url for i, url in enumerate(files["shards"])}
        if finished:
            for field, name in FINAL_FILES.items():
                if files.get(field):
                    wanted[name] = files[field]
        if files.get("invalid"):
            wanted["invalid.jsonl"] = files["invalid"]
        fetched = 0
        for name, url in wanted.items():
            target = self.out / name
            if target.exists() and not finished_file_may_change(name):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + ".part")

            def download(url: str = url, part: Path = part) -> None:
                with httpx.stream("GET", url, timeout=self.http.timeout) as response, part.open("wb") as f:
                    _check(response)
                    for block in response.iter_bytes(1 << 20):
                        f.write(block)

            self._patiently(f"downloading {name}", download)
            os.replace(part, target)  # a file is either whole or absent: an interrupted download is redone
            fetched += 1
        return fetched

    def run(self, jsonl: Path, options: dict[str, Any], progress: bool = True) -> int:
        run_id = self.submit_or_resume(jsonl, options)
        bar = _bar(progress)
        print(f"data set {run_id}: writing to {self.out}", file=sys.stderr)
        while True:
            st = self.status(run_id)
            c = st["counts"]
            done = c["succeeded"] + c["failed"] + c["canceled"]
            bar.update(done, c["total"], st.get("images_per_s"), st.get("eta_s"), c["failed"])
            finished = st["status"] in FINISHED
            self.download_new(run_id, finished)
            if finished:
                bar.close()
                break
            time.sleep(self.poll_s)
        (self.out / "status.json").write_text(json.dumps(st, indent=2))
        print(
            f"{st['status']}: {c['succeeded']} images, {c['failed']} failed, {c['canceled']} canceled, "
            f"{c['skipped']} skipped; {st['shards']} shards in {self.out / 'shards'}",
            file=sys.stderr,
        )
        return 0 if st["status"] == "completed" and c["failed"] == 0 else 1


def finished_file_may_change(name: str) -> bool:
    # The manifest and failures are rewritten when failed lines are retried; shards never change.
    return name in FINAL_FILES.values()


class _bar:
    """A tqdm progress bar when asked for (and installed), else nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tqdm = None

    def update(self, done: int, total: int, rate: float | None, eta_s: float | None, failed: int) -> None:
        if not self.enabled:
            return
        if self.tqdm is None:  # made at the first status, when the total is known
            from tqdm import tqdm

            self.tqdm = tqdm(total=total, unit="img", dynamic_ncols=True)
        self.tqdm.total = total
        self.tqdm.n = done
        self.tqdm.set_postfix_str(
            f"{rate or 0:.2f} img/s (service), eta {'?' if eta_s is None else f'{eta_s:.0f} s'}, failed {failed}",
            refresh=False,
        )
        self.tqdm.refresh()

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client.dataset", description=__doc__.split("\n\n")[0])
    p.add_argument("jsonl", type=Path, help='one line per image: {"id": ..., "prompt": ..., optional parameters}')
    p.add_argument("--out", type=Path, required=True, help="local folder for the shards, manifest and run state")
    p.add_argument("--api", default=os.environ.get("SDXL_API_URL", "http://127.0.0.1:8000"))
    p.add_argument("--key", default=os.environ.get("SDXL_API_KEY"), help="API key (default: $SDXL_API_KEY)")
    p.add_argument("--defaults", default="{}", help='run-wide defaults as JSON, e.g. {"width": 512, "steps": 20}')
    p.add_argument("--seed", type=int, help="run seed (lines without a seed derive theirs from it and their id)")
    p.add_argument("--on-invalid", choices=["reject", "skip"], default="reject")
    p.add_argument("--shard-size", type=int, default=1000, help="images per WebDataset shard")
    p.add_argument(
        "--loose-images", action="store_true",
        help="also keep each image as its own object in the service's storage (this command downloads the shards, "
        "so by default the service keeps images only in them: once, not twice)",
    )  # fmt: skip
    p.add_argument("--poll-s", type=float, default=2.0)
    p.add_argument("--patience-s", type=float, default=600, help="how long to wait out a service that does not answer")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options: dict[str, Any] = {
        "defaults": json.loads(args.defaults),
        "on_invalid": args.on_invalid,
        "shard_size": args.shard_size,
        "loose_images": args.loose_images,
    }
    if args.seed is not None:
        options["seed"] = args.seed
    runner = DatasetRunner(args.api, args.key, args.out, args.poll_s, patience_s=args.patience_s)
    try:
        return runner.run(args.jsonl, options, progress=not args.no_progress)
    except Refused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    except Unreachable as exc:
        print(f"{exc}; run the same command again to resume", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
