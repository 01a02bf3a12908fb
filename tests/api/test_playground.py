"""The web playground (api/playground/, served at /) in a real browser: Debian's headless `chromium` driven by
Playwright, against the real stack (uvicorn, `python -m worker` on the tiny model, Redis: `live_stack`).
Screenshots go to the test's temp folder; with SDXL_SCREENSHOT_DIR set, the README's screenshot is written there
too (`SDXL_SCREENSHOT_DIR=docs/img scripts/test.sh tests/api/test_playground.py`)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
import redis

from common.api_keys import ApiKeyStore

CHROMIUM = os.environ.get("SDXL_CHROMIUM", "chromium")
JOB_S = 120_000  # ms: a job on the tiny model takes seconds, but the worker may be busy with other tests' jobs
# Records every text the job's state line shows, so a test sees states that lasted a moment only.
RECORD_STATES = """() => {
  window.states = [];
  const node = document.getElementById("job-state");
  new MutationObserver(() => window.states.push(node.textContent)).observe(node, {childList: true, subtree: true});
}"""
# Records each preview the page draws (its step and decoded size), as it loads: the job may end a moment later.
RECORD_PREVIEWS = """() => {
  window.previews = [];
  const img = document.getElementById("job-preview");
  img.addEventListener("load", () => window.previews.push([Number(img.dataset.step), img.naturalWidth,
    img.naturalHeight, !img.hidden && img.getBoundingClientRect().width > 0]));
}"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which(CHROMIUM)
    assert executable, f"{CHROMIUM} not found: scripts/setup.sh dev installs Debian's chromium (or set SDXL_CHROMIUM)"
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_stack):
    """A fresh browser profile (nothing in localStorage) and a fresh tenant (no jobs yet); fails the test on any
    uncaught error in the page's JavaScript."""
    url, _, settings = live_stack
    _, key = ApiKeyStore(redis.Redis.from_url(settings.redis_url), settings.key_prefix).create(
        f"web-{uuid.uuid4().hex[:6]}", "playground test"
    )
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    page.key = key  # type: ignore[attr-defined]
    yield page
    context.close()
    assert not errors, errors


def enter_key(page) -> None:
    # said once the page has read what is served (two requests at start): wait for it, do not race it
    page.wait_for_selector("#key-state:has-text('Enter an API key')")
    page.fill("#api-key", page.key)
    page.keyboard.press("Enter")  # the key form submits on Enter
    page.wait_for_selector("#key-state:has-text('Key accepted')")


def shown_params(page) -> dict[str, str]:
    """The job's parameters as the page lists them (#job-params: dt, dd pairs)."""
    return dict(
        zip(
            page.eval_on_selector_all("#job-params dt", "n => n.map(x => x.textContent)"),
            page.eval_on_selector_all("#job-params dd", "n => n.map(x => x.textContent)"),
            strict=True,
        )
    )


def screenshot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name), full_page=True)
    if target := os.environ.get("SDXL_SCREENSHOT_DIR"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(target) / f"playground-{name}")


def test_submit_see_progress_the_image_its_parameters_and_use_its_settings(page, tmp_path):
    enter_key(page)
    page.wait_for_selector("#gallery-empty", state="visible")  # a tenant with no jobs: the page works without one
    assert page.evaluate("localStorage.getItem('sdxl.apiKey')") == page.key  # kept in the browser
    sizes = page.eval_on_selector_all("#size option", "options => options.map(o => o.value)")
    assert sizes == ["64x64", "96x64"]  # from GET /v1/models
    page.evaluate(RECORD_STATES)
    page.evaluate(RECORD_PREVIEWS)
    assert page.is_checked("#preview")  # live previews unless unticked

    page.fill("#prompt", "a red fox in the snow")
    page.select_option("#size", "96x64")
    page.fill("#steps", "120")  # enough steps for several progress reports on the tiny model
    page.fill("#seed", "42")
    page.fill("#guidance_scale", "6.5")
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")  # submits from the keyboard

    page.wait_for_selector("#job-images img", timeout=JOB_S)
    assert page.inner_text("#job-state").startswith("Succeeded")
    states = page.evaluate("window.states")
    steps = [int(s.split("step ")[1].split(" ")[0]) for s in states if s.startswith("Running: step")]
    assert steps and steps == sorted(steps) and all(s.endswith(" of 120.") for s in states if "step" in s), states
    assert any(s.startswith("Queued") for s in states), states  # the job was seen queued before it ran
    # previews drawn while it ran: the worker's WebP of the estimate, the latents' size (96x64 / 8), shown
    previews = page.evaluate("window.previews")
    assert previews and all(p[1:] == [12, 8, True] and 5 <= p[0] < 120 for p in previews), previews
    assert page.is_hidden("#job-preview")  # the image replaced it
    # the <img> is in the page as the job ends; its bytes arrive a moment later (on a busy machine, later still)
    page.wait_for_function(
        "() => { const i = document.querySelector('#job-images img'); return i.complete && i.naturalWidth > 0; }",
        timeout=30_000,
    )
    size = page.eval_on_selector("#job-images img", "img => [img.complete, img.naturalWidth, img.naturalHeight]")
    assert size == [True, 96, 64]  # the signed URL served the real image
    params = shown_params(page)
    assert params["prompt"] == "a red fox in the snow" and params["seed"] == "42" and params["size"] == "96x64"
    assert params["steps"] == "120" and params["guidance scale"] == "6.5" and params["scheduler"] == "euler"
    screenshot(page, tmp_path, "job.png")

    # the gallery lists the job; "use these settings" puts its parameters back in the form
    card = page.locator("#gallery li").first
    assert "a red fox in the snow" in card.inner_text() and "seed 42" in card.inner_text()
    page.fill("#prompt", "something else")
    page.fill("#seed", "")
    page.select_option("#size", "64x64")
    card.get_by_role("button", name="Use these settings").click()
    assert page.input_value("#prompt") == "a red fox in the snow"
    assert page.input_value("#seed") == "42" and page.input_value("#size") == "96x64"
    assert page.input_value("#steps") == "120" and page.input_value("#guidance_scale") == "6.5"
    assert page.evaluate("document.activeElement.id") == "prompt"


def test_image_to_image_with_a_mask_and_the_refiner_from_the_page(page, tmp_path):
    """Files chosen in the form go as data: URLs; the job names the stored keys, and "Use these settings" sends
    them again without choosing the files anew."""
    import io

    import numpy as np
    from PIL import Image

    def png(array: np.ndarray) -> bytes:
        out = io.BytesIO()
        Image.fromarray(array).save(out, format="PNG")
        return out.getvalue()

    picture = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 24:72] = 255
    enter_key(page)
    assert page.is_visible("#refiner-field")  # live_stack serves a refiner
    spacings = page.eval_on_selector_all("#timestep_spacing option", "options => options.map(o => o.value)")
    assert spacings == ["", "leading", "linspace", "trailing"]
    page.fill("#prompt", "a lighthouse")
    page.select_option("#size", "96x64")
    page.fill("#steps", "4")
    page.set_input_files("#init_image", files=[{"name": "p.png", "mimeType": "image/png", "buffer": png(picture)}])
    page.set_input_files("#mask_image", files=[{"name": "m.png", "mimeType": "image/png", "buffer": png(mask)}])
    page.fill("#strength", "0.75")
    page.click("#submit")
    page.wait_for_selector("#job-images img", timeout=JOB_S)
    assert page.inner_text("#job-state").startswith("Succeeded")
    params = shown_params(page)
    assert params["init image"].startswith("inputs/") and params["mask"].startswith("inputs/")
    assert params["strength"] == "0.75"
    screenshot(page, tmp_path, "img2img.png")
    # the same settings again, the files not chosen anew: the stored keys go with the job; then the refiner
    page.locator("#gallery li").first.get_by_role("button", name="Use these settings").click()
    assert page.input_value("#strength") == "0.75"
    page.set_input_files("#mask_image", files=[])
    page.fill("#strength", "")
    page.evaluate("document.getElementById('init_image').dispatchEvent(new Event('change'))")  # drops the reuse
    page.fill("#refiner", "0.8")
    page.fill("#steps", "5")
    page.click("#submit")
    # the parameters are shown once the job has ended: the new job's, with the refiner and without an image
    page.wait_for_selector("#job-params dt:has-text('refiner from')", timeout=JOB_S)
    assert page.inner_text("#job-state").startswith("Succeeded")
    assert "init image" not in page.inner_text("#job-params")


def test_a_model_and_lora_adapters_from_the_page(page):
    """live_stack serves two models and three adapters: the page offers them, sends the choice, shows it with the
    job, and "Use these settings" puts it back; an unknown adapter is refused naming the field."""
    enter_key(page)
    assert page.is_visible("#model-field") and page.is_visible("#loras-field")
    models = page.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
    assert models == ["tiny", "lightning"] and page.input_value("#model") == "tiny"
    assert page.inner_text("#lora-names") == "ink, pixel-art, watercolor"
    page.fill("#prompt", "a windmill")
    page.select_option("#size", "96x64")
    page.fill("#steps", "3")
    page.select_option("#model", "lightning")
    page.fill("#loras", "pixel-art:0.5, ink")
    page.click("#submit")
    page.wait_for_selector("#job-params dt:has-text('loras')", timeout=JOB_S)
    assert page.inner_text("#job-state").startswith("Succeeded")
    params = shown_params(page)
    assert params["model"] == "lightning" and params["loras"] == "pixel-art:0.5, ink:1"
    page.select_option("#model", "tiny")
    page.fill("#loras", "")
    page.locator("#gallery li").first.get_by_role("button", name="Use these settings").click()
    assert page.input_value("#model") == "lightning" and page.input_value("#loras") == "pixel-art:0.5, ink:1"
    page.fill("#loras", "nope:1")
    page.click("#submit")
    page.wait_for_selector("#notice:visible")
    assert "no adapter named 'nope'" in page.inner_text("#notice")
    assert page.get_attribute("#loras", "aria-invalid") == "true"


def test_every_control_has_a_label_and_a_bad_key_is_said_plainly(page):
    unlabeled = page.eval_on_selector_all(
        "input, select, textarea", "nodes => nodes.filter(n => n.labels.length === 0).map(n => n.id)"
    )
    assert unlabeled == []
    page.fill("#api-key", "not-a-key")
    page.click("text=Save key")
    page.wait_for_selector("#key-state:has-text('Key refused')")
    assert "API key was refused" in page.inner_text("#notice")


def test_a_refused_job_names_the_field(page):
    enter_key(page)
    page.fill("#prompt", "x" * 50_000)  # longer than the deployment's max_prompt_chars
    page.click("#submit")
    page.wait_for_selector("#notice:visible")
    assert "prompt" in page.inner_text("#notice")
    assert page.get_attribute("#prompt", "aria-invalid") == "true"


def test_data_set_page_runs_a_five_line_file(page, tmp_path):
    enter_key(page)
    page.click("#nav-datasets")
    page.wait_for_selector("#page-datasets", state="visible")  # on the hashchange event, after the click
    assert not page.is_visible("#page-generate")
    page.wait_for_selector("#runs-empty", state="visible")  # the list is fetched after the page shows
    lines = [{"id": f"line-{i}", "prompt": f"a lighthouse, variation {i}"} for i in range(5)]
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    page.set_input_files("#dataset-file", str(source))
    page.fill("#dataset-seed", "7")
    page.fill("#dataset-shard-size", "2")
    page.fill("#dataset-defaults", '{"steps": 4}')
    page.select_option("#dataset-order", "input")
    page.click("#dataset-form button[type=submit]")

    page.wait_for_selector("#dataset-state:has-text('completed')", timeout=3 * JOB_S)
    assert page.inner_text("#dataset-counts").startswith("5 of 5 done: 5 succeeded, 0 failed")
    assert page.eval_on_selector("#dataset-progress", "p => [p.value, p.max]") == [5, 5]
    links = dict(
        zip(
            page.eval_on_selector_all("#dataset-links a", "n => n.map(a => a.textContent)"),
            page.eval_on_selector_all("#dataset-links a", "n => n.map(a => a.href)"),
            strict=True,
        )
    )
    assert {"manifest (JSONL)", "manifest (Parquet)", "shard 0 (WebDataset tar)", "shard 2 (WebDataset tar)"} <= set(
        links
    ), links
    manifest = page.request.get(links["manifest (JSONL)"])  # the signed link works from the browser
    assert manifest.ok
    rows = [json.loads(line) for line in manifest.text().splitlines()]
    assert sorted(r["id"] for r in rows) == [f"line-{i}" for i in range(5)]
    assert [r["id"] for r in rows] == [f"line-{i}" for i in range(5)]  # input order, as chosen
    assert page.request.get(links["shard 0 (WebDataset tar)"]).ok
    stats = page.request.get(links["stats (JSON)"]).json()
    assert [s["count"] for s in stats["shards"]] == [2, 2, 1]
    assert page.request.get(links["data set card (README.md)"]).text().startswith("---\nconfigs:")
    page.wait_for_selector("#runs li")
    assert "completed" in page.inner_text("#runs li")
    screenshot(page, tmp_path, "dataset.png")


def test_a_canceled_run_is_resumed_from_the_page(page, tmp_path):
    enter_key(page)
    page.click("#nav-datasets")
    source = tmp_path / "slow.jsonl"
    source.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"a pebble {i}"}) + "\n" for i in range(24)))
    page.set_input_files("#dataset-file", str(source))
    page.fill("#dataset-defaults", '{"steps": 40}')
    page.click("#dataset-form button[type=submit]")
    page.wait_for_selector("#dataset-cancel:enabled", timeout=JOB_S)
    page.click("#dataset-cancel")
    page.wait_for_selector("#dataset-state:has-text(': canceled')", timeout=JOB_S)
    assert page.is_enabled("#dataset-resume") and not page.is_enabled("#dataset-retry")  # nothing failed
    counts = page.inner_text("#dataset-counts")
    assert " canceled" in counts and ", 0 canceled" not in counts, counts
    page.click("#dataset-resume")
    page.wait_for_selector("#dataset-state:has-text(': completed')", timeout=3 * JOB_S)
    assert page.inner_text("#dataset-counts").startswith("24 of 24 done: 24 succeeded, 0 failed, 0 canceled")
