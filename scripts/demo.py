"""Run the whole stack on this machine and generate a sample job (what `scripts/run.sh` runs).

Starts, as child processes: an embedded Redis when none answers at SDXL_REDIS_URL, the API (uvicorn) and
one worker (`python -m worker`). Defaults: the `tiny` model (random weights: its images are noise, see
README "Serving real SDXL weights"), local-folder storage under var/images, 512x512 images.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from common import redis_server

ROOT = Path(__file__).resolve().parent.parent
VAR = ROOT / "var"


def _secret() -> str:
    path = VAR / "url-signing-secret"
    if not path.exists():
        VAR.mkdir(exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def _api_key(redis_url: str) -> str:
    """The demo tenant's API key: made once and kept in var/ (mode 0600), as a user would keep theirs. Made again
    when this Redis does not know the kept one (another SDXL_REDIS_URL, or its data wiped): the submit would be
    a 401."""
    import redis

    from common.api_keys import ApiKeyStore

    store = ApiKeyStore(redis.Redis.from_url(redis_url), os.environ.get("SDXL_KEY_PREFIX", "sdxl"))
    path = VAR / "demo-api-key"
    if not path.exists() or store.verify(path.read_text().strip()) is None:
        _, key = store.create("demo", "scripts/run.sh")
        path.write_text(key)
        path.chmod(0o600)
    return path.read_text().strip()


def _wait_ready(base: str, procs: dict[str, subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode}; see var/{name}.log")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"not ready after {timeout_s:.0f} s; see var/api.log and var/worker.log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true", help="stop everything after the sample job")
    parser.add_argument("--prompt", default="a lighthouse on a cliff at sunset, oil painting")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--ready-timeout-s", type=float, default=900)
    args = parser.parse_args()

    env = dict(os.environ)
    env.setdefault("SDXL_MODEL", "tiny")
    # 512x512 by default: on a laptop CPU the tiny model makes 4 images in ~20 s at 512x512, but ~5 min at
    # 1024x1024 (attention over 4096 latent tokens). On an accelerator set SDXL_IMAGE_SIZES=1024x1024.
    env.setdefault("SDXL_IMAGE_SIZES", "512x512")
    env.setdefault("SDXL_STORAGE", "local")
    env.setdefault("SDXL_LOCAL_STORAGE_DIR", str(VAR / "images"))
    env.setdefault("SDXL_URL_SIGNING_SECRET", _secret())
    base = env.setdefault("SDXL_PUBLIC_BASE_URL", "http://127.0.0.1:8000").rstrip("/")
    url, embedded = redis_server.ensure(env.get("SDXL_REDIS_URL", "redis://127.0.0.1:6379/0"), VAR / "redis")
    env["SDXL_REDIS_URL"] = url
    print(f"redis:  {url}" + (" (embedded Valkey, data in var/redis)" if embedded else ""))

    VAR.mkdir(exist_ok=True)
    api_port = str(urlparse(base).port or 8000)
    procs = {
        "api": subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", api_port],
            cwd=ROOT,
            env=env,
            stdout=open(VAR / "api.log", "ab"),  # noqa: SIM115 - the process owns it
            stderr=subprocess.STDOUT,
        ),
        "worker": subprocess.Popen(
            [sys.executable, "-m", "worker"],
            cwd=ROOT,
            env=env,
            stdout=open(VAR / "worker.log", "ab"),  # noqa: SIM115 - the process owns it
            stderr=subprocess.STDOUT,
        ),
    }
    print(f"api:    {base}  (OpenAPI at {base}/openapi.json; log var/api.log)")
    print("worker: loading and compiling the model (log var/worker.log) ...")
    try:
        t0 = time.monotonic()
        _wait_ready(base, procs, args.ready_timeout_s)
        print(f"ready in {time.monotonic() - t0:.1f} s")
        w, _, h = env["SDXL_IMAGE_SIZES"].split(",")[0].partition("x")
        body = {"prompt": args.prompt, "num_images": args.images, "width": int(w), "height": int(h)}
        key = _api_key(url)
        auth = {"Authorization": f"Bearer {key}"}
        job = httpx.post(f"{base}/v1/jobs", json=body, timeout=10, headers=auth).json()
        print(f"submitted job {job['id']} (seed {job['request']['seed']}); waiting ...")
        t0 = time.monotonic()
        while job["status"] not in ("succeeded", "failed", "canceled"):  # long polls: answered when it ends
            job = httpx.get(job["status_url"], params={"wait_s": 50}, timeout=70, headers=auth).json()
        print(f"job {job['status']} after {time.monotonic() - t0:.1f} s")
        if job["status"] != "succeeded":
            raise SystemExit(f"error: {job.get('error')}")
        folder = Path(env["SDXL_LOCAL_STORAGE_DIR"])
        for image in job["images"]:
            object_key = httpx.URL(image["url"]).path.removeprefix("/v1/files/")  # not `key`: that is the API key
            print(f"  {folder / object_key}\n    {image['url']}")
        if env["SDXL_MODEL"] == "tiny":
            print("(the tiny model has random weights: its images are noise. README: 'Serving real SDXL weights')")
        if not args.once:
            body = '{"prompt": "a fox", "width": 512, "height": 512}'
            example = (
                f"curl -s -X POST {base}/v1/jobs -H 'Authorization: Bearer {key}' "
                f"-H 'Content-Type: application/json' -d '{body}'"
            )
            dataset = (
                f"{sys.executable} -m client.dataset prompts.jsonl --out my-set --api {base} --key {key} "
                """--defaults '{"width": 512, "height": 512}'"""
            )
            print(f"\nThe stack keeps running. In a browser: {base}/ (the playground; API key {key})")
            print(f"or try:\n  {example}\nor a data set (README: Data sets):\n  {dataset}")
            print("Ctrl-C stops it.")
            # Blocked first, so that sigwait takes them: unblocked, SIGTERM would end this process at once and
            # leave the API and worker running without it.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if embedded:
            embedded.stop()


if __name__ == "__main__":
    main()
