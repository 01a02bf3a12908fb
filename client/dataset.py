"""The data set CLI: run a JSONL of prompts to a local folder, and look after runs.

    python -m client.dataset run prompts.jsonl --out my-set --api http://127.0.0.1:8000 --key "$SDXL_API_KEY"
    python -m client.dataset status RUN [--json]     one line (or the whole answer as JSON)
    python -m client.dataset list [--limit N]        the tenant's recent runs, a line each
    python -m client.dataset cancel RUN              stop feeding; what finished is kept
    python -m client.dataset retry RUN               generate the failed lines again (same seeds)
    python -m client.dataset resume RUN              generate a canceled run's canceled lines (same seeds)
    python -m client.dataset download RUN --out DIR  the shards, manifest, failures, stats and card written so far

`run` is the default command: `python -m client.dataset prompts.jsonl --out my-set` works too. Run the same
command again after an interruption (Ctrl-C, a lost connection, a reboot) and it picks up where it stopped:
the run id is kept in <out>/run.json, the submit carries an Idempotency-Key derived from the input, options
and folder (so a crash right after submitting cannot start a second run), and shards already downloaded are not fetched
again. The service keeps generating while this command is not running. After `retry` or `resume`, the same
`run` command follows the run to its new end and downloads what changed.

When a run ends with lines not generated (failed, canceled, or invalid and skipped), `run` writes them, as
they were in the input, to <out>/remaining.jsonl: fix or keep them and run that file, or use retry/resume.

While it runs, a service that does not answer (a restart, Redis away: connection errors, 502/503/504) or a
rate limit (429) costs a pause, not the run: it waits (the answer's Retry-After, else backing off from
--poll-s to a minute) for up to --patience-s in a row, saying so.

Exit status (every refusal is one line on stderr, never a traceback):
    0    done: every line generated (run), or the command did what it says
    1    the run ended with lines not generated: failed, canceled or skipped (see remaining.jsonl)
    2    bad arguments or input: usage, a file that cannot be read, bad --defaults JSON, refused lines
    3    the service did not answer for --patience-s (run the same command again to resume)
    4    the service refused the command: a bad API key, no such run, not in a state that allows it, a limit
    130  interrupted (run the same command again to resume)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from client.api import ApiError, Client, Unreachable

FINISHED = ("completed", "canceled", "failed")
FINAL_FILES = {
    "manifest_jsonl": "manifest.jsonl",
    "manifest_parquet": "manifest.parquet",
    "failures": "failures.jsonl",
    "stats": "stats.json",
    "card": "README.md",
}


EXIT_OK, EXIT_NOT_ALL, EXIT_INPUT, EXIT_UNREACHABLE, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
COMMANDS = ("run", "status", "list", "cancel", "retry", "resume", "download")


class Refused(Exception):
    """The service (or this command) refused; the message says what to fix, `exit_code` which kind it was."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED):
        super().__init__(message)
        self.exit_code = exit_code


def refusal(exc: ApiError) -> Refused:
    """A 4xx answer as one line: a refused input file is the user's input (2); anything else the service's no (4)."""
    lines = "".join(f"\n  line {e['line']}: {e['field']}: {e['message']}" for e in exc.lines)
    retry = f" (the server says retry in {exc.retry_after_s:g} s)" if exc.retry_after_s is not None else ""
    code = EXIT_INPUT if exc.status in (413, 415, 422) else EXIT_REFUSED
    return Refused(f"{exc.status}: {exc.detail}{retry}{lines}", code)


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
                raise Refused(
                    f"{self.out} holds run {state['run_id']} of another input or options; use another --out", EXIT_INPUT
                )
            return state["run_id"]

        # The key names the input, options and output folder: sent again (a crash right after submitting), it
        # gives the same run; the same file run into another folder is another run.
        folder = hashlib.sha256(str(self.out.resolve()).encode()).hexdigest()[:16]
        try:  # safe to send again: the Idempotency-Key makes at most one run
            run_id = self.api.create_dataset(jsonl, options, idempotency_key=f"cli-{fp[:32]}-{folder}").id
        except ApiError as exc:
            if exc.status >= 500:
                raise
            # the server says what to fix: bad lines, a bad key, a limit (429); RFC 9457 problem details
            raise refusal(exc) from exc
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
        print(f"data set {run_id}: writing to {self.out}", file=sys.stderr)
        st = self.follow(run_id, progress)
        c = st["counts"]
        remaining = write_remaining(jsonl, self.out / "manifest.jsonl", self.out / "remaining.jsonl")
        print(
            f"{st['status']}: {c['succeeded']} images, {c['failed']} failed, {c['canceled']} canceled, "
            f"{c['skipped']} skipped; {st['shards']} shards in {self.out / 'shards'}"
            + (f"; {remaining} lines not generated, in {self.out / 'remaining.jsonl'}" if remaining else ""),
            file=sys.stderr,
        )
        return EXIT_OK if st["status"] == "completed" and not remaining else EXIT_NOT_ALL

    def follow(self, run_id: str, progress: bool = True) -> dict[str, Any]:
        """Show progress and download as shards appear, until the run has finished; its last status."""
        bar = _bar(progress)
        while True:
            st = self.status(run_id)
            c = st["counts"]
            done = c["succeeded"] + c["failed"] + c["canceled"]
            bar.update(done, c["total"], st.get("images_per_s"), st.get("eta_s"), c["failed"], st.get("stalled_s"))
            finished = st["status"] in FINISHED
            self.download_new(run_id, finished)
            if finished:
                bar.close()
                break
            time.sleep(self.poll_s)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "status.json").write_text(json.dumps(st, indent=2))
        return st


def write_remaining(jsonl: Path, manifest: Path, target: Path) -> int:
    """The input's lines (as they were) that did not give all their images (failed, canceled, or invalid and
    skipped), written to `target`; returns how many. No such line: `target` is removed."""
    generated = set()
    if manifest.exists():
        generated = {json.loads(row)["id"] for row in manifest.read_text().splitlines() if row.strip()}
    left = []
    with jsonl.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if number == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            try:
                line = json.loads(text)
                line_id, count = str(line["id"]), int(line.get("num_images", 1))
                ids = [line_id] if count == 1 else [f"{line_id}_{k}" for k in range(count)]
            except (ValueError, TypeError, KeyError, AttributeError):
                ids = []  # not even an object with an id: it was refused or skipped, so it is left
            if not ids or not all(i in generated for i in ids):
                left.append(text + "\n")
    if left:
        target.write_text("".join(left))
    else:
        target.unlink(missing_ok=True)
    return len(left)


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

    def update(
        self, done: int, total: int, rate: float | None, eta_s: float | None, failed: int, stalled_s: float | None
    ) -> None:
        if not self.enabled:
            return
        if self.tqdm is None:  # made at the first status, when the total is known
            from tqdm import tqdm

            self.tqdm = tqdm(total=total, unit="img", dynamic_ncols=True)
        self.tqdm.total = total
        self.tqdm.n = done
        # no figure the service does not have: "?" until it has measured a rate, "stalled" while nothing ends
        speed = "? img/s" if rate is None else f"{rate:.2f} img/s"
        eta = "stalled" if stalled_s else "?" if eta_s is None else f"{eta_s:.0f} s"
        self.tqdm.set_postfix_str(f"{speed} (service), eta {eta}, failed {failed}", refresh=False)
        self.tqdm.refresh()

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", default=os.environ.get("SDXL_API_URL", "http://127.0.0.1:8000"))
    p.add_argument("--key", default=os.environ.get("SDXL_API_KEY"), help="API key (default: $SDXL_API_KEY)")
    p.add_argument("--patience-s", type=float, default=600, help="how long to wait out a service that does not answer")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit 2, as argparse does, with our prog name
        self.exit(EXIT_INPUT, f"{self.prog}: {message} (--help for usage)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "run")  # the old form: python -m client.dataset prompts.jsonl --out DIR
    p = _Parser(
        prog="python -m client.dataset",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    commands = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("run", help="submit a JSONL (or pick up its run) and follow it into --out")
    run.add_argument("jsonl", type=Path, help='one line per image: {"id": ..., "prompt": ..., optional parameters}')
    run.add_argument("--out", type=Path, required=True, help="local folder for the shards, manifest and run state")
    run.add_argument("--defaults", default="{}", help='run-wide defaults as JSON, e.g. {"width": 512, "steps": 20}')
    run.add_argument("--seed", type=int, help="run seed (lines without a seed derive theirs from it and their id)")
    run.add_argument("--on-invalid", choices=["reject", "skip"], default="reject")
    run.add_argument("--shard-size", type=int, default=1000, help="images per WebDataset shard")
    run.add_argument(
        "--order",
        choices=["completion", "input"],
        default="completion",
        help="completion: shards fill as lines finish; input: shard k holds lines k*size.. in order",
    )
    run.add_argument(
        "--caption-field",
        default="caption",
        help="the line field written as <id>.txt (or metadata.KEY); lines without it: the prompt",
    )
    run.add_argument(
        "--loose-images",
        action="store_true",
        help="also keep each image as its own object in the service's storage (this command downloads the shards, "
        "so by default the service keeps images only in them: once, not twice)",
    )
    run.add_argument("--poll-s", type=float, default=2.0)
    run.add_argument("--no-progress", action="store_true")
    _connection(run)
    for name, what in (
        ("status", "one line of the run's state"),
        ("cancel", "stop feeding; finished lines kept"),
        ("retry", "generate the failed lines again"),
        ("resume", "generate the canceled lines"),
    ):
        sub = commands.add_parser(name, help=what)
        sub.add_argument("run_id")
        if name == "status":
            sub.add_argument("--json", action="store_true", help="the whole answer, as JSON")
        _connection(sub)
    listing = commands.add_parser("list", help="the tenant's recent runs")
    listing.add_argument("--limit", type=int, default=20)
    _connection(listing)
    download = commands.add_parser("download", help="fetch a run's files into --out")
    download.add_argument("run_id")
    download.add_argument("--out", type=Path, required=True)
    _connection(download)
    return p.parse_args(argv)


def summary(d: dict[str, Any]) -> str:
    c = d["counts"]
    eta = f", eta {d['eta_s']:.0f} s" if d.get("eta_s") is not None else ""
    return (
        f"{d['id']}  {d['status']:<9}  {c['succeeded']}/{c['total']} succeeded, {c['failed']} failed, "
        f"{c['canceled']} canceled, {c['skipped']} skipped, {d['shards']} shards{eta}"
    )


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    try:
        defaults = json.loads(args.defaults)
    except json.JSONDecodeError as exc:
        raise Refused(f"--defaults is not JSON: {exc.msg} at column {exc.colno}", EXIT_INPUT) from exc
    if not isinstance(defaults, dict):
        raise Refused('--defaults must be a JSON object, e.g. {"width": 512, "steps": 20}', EXIT_INPUT)
    options: dict[str, Any] = {
        "defaults": defaults,
        "on_invalid": args.on_invalid,
        "shard_size": args.shard_size,
        "loose_images": args.loose_images,
        "order": args.order,
        "caption_field": args.caption_field,
    }
    if args.seed is not None:
        options["seed"] = args.seed
    if not args.jsonl.is_file():
        raise Refused(f"{args.jsonl}: no such file", EXIT_INPUT)
    try:
        with args.jsonl.open("rb"):
            pass
    except OSError as exc:
        raise Refused(f"{args.jsonl}: {exc.strerror}", EXIT_INPUT) from exc
    return options


def command(args: argparse.Namespace) -> int:
    out = getattr(args, "out", None) or Path(".")
    runner = DatasetRunner(args.api, args.key, out, getattr(args, "poll_s", 2.0), patience_s=args.patience_s)
    api = runner.api
    try:
        if args.command == "run":
            return runner.run(args.jsonl, run_options(args), progress=not args.no_progress)
        if args.command == "status":
            d = api.dataset(args.run_id).raw
            print(json.dumps(d, indent=2) if args.json else summary(d))
        elif args.command == "list":
            for d in api.datasets(limit=args.limit):
                print(summary(d.raw))
        elif args.command == "cancel":
            print(summary(api.cancel_dataset(args.run_id).raw))
        elif args.command == "retry":
            answer = api.retry_dataset(args.run_id)
            print(f"{answer['retried']} failed lines sent back; {summary(answer['dataset'])}")
        elif args.command == "resume":
            answer = api.resume_dataset(args.run_id)
            print(f"{answer['resumed']} canceled lines sent back; {summary(answer['dataset'])}")
        elif args.command == "download":
            d = api.dataset(args.run_id).raw
            fetched = runner.download_new(args.run_id, d["status"] in FINISHED)
            print(f"{fetched} files fetched into {out}; {summary(d)}")
        return EXIT_OK
    except ApiError as exc:
        raise refusal(exc) from exc
    finally:
        api.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return command(args)
    except Refused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return exc.exit_code
    except Unreachable as exc:
        print(f"{exc}; run the same command again to resume", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
