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
from pathlib import Path
from typing import Any

from client.api import ApiError, Client, Unreachable

FINISHED = ("completed", "canceled")
FINAL_FILES = {"manifest_jsonl": "manifest.jsonl", "manifest_parquet": "manifest.parquet", "failures": "failures.jsonl"}


class Refused(Exception):
    """The service refused the input; the message lists what to fix."""


def fingerprint(path: Path, options: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DatasetRunner:
    """The CLI's steps over the Python client (client/api.py), which waits out outages and rate limits."""

    def __init__(
        self, api: str, key: str | None, out: Path, poll_s: float = 2.0, timeout_s: float = 60, patience_s: float = 600
    ):
        self.api = Client(api, key, timeout_s=timeout_s, patience_s=patience_s, backoff_s=poll_s, on_retry=_say)
        self.out = out
        self.poll_s = poll_s

    @property
    def patience_s(self) -> float:
        return self.api.retry.patience_s

    @patience_s.setter
    def patience_s(self, value: float) -> None:
        self.api.retry.patience_s = value

    # ------------------------------------------------------------------ steps

    def submit_or_resume(self, jsonl: Path, options: dict[str, Any]) -> str:
        state_path = self.out / "run.json"
        fp = fingerprint(jsonl, options)
        if state_path.exists():
            state = json.loads(state_path.read_text())
            if state["fingerprint"] != fp:
                raise Refused(f"{self.out} holds run {state['run_id']} of another input or options; use another --out")
            return state["run_id"]

        try:  # safe to send again: the Idempotency-Key makes at most one run
            run_id = self.api.create_dataset(jsonl, options, idempotency_key=f"cli-{fp}").id
        except ApiError as exc:
            if exc.status >= 500:
                raise
            # the server says what to fix: bad lines, a bad key, a limit (429); RFC 9457 problem details
            lines = "".join(f"\n  line {e['line']}: {e['field']}: {e['message']}" for e in exc.lines)
            retry = f" (the server says retry in {exc.retry_after_s:g} s)" if exc.retry_after_s is not None else ""
            raise Refused(f"{exc.status}: {exc.detail}{retry}{lines}") from exc
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": run_id, "fingerprint": fp, "input": str(jsonl)}))
        os.replace(tmp, state_path)
        return run_id

    def status(self, run_id: str) -> dict[str, Any]:
        return self.api.dataset(run_id).raw

    def download_new(self, run_id: str, finished: bool) -> int:
        """Fetch shards (and, once finished, the manifest and failures) not yet here; returns files fetched."""
        files = self.api.dataset_files(run_id)
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
            self.api.download_to(url, target)  # whole or absent: an interrupted download is redone
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


def _say(what: str, why: str, wait_s: float) -> None:
    print(f"{what}: {why}; trying again in {wait_s:.0f} s", file=sys.stderr)


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
