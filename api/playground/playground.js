// The playground: plain JS on the public API, with the key the user enters (kept in this browser's
// localStorage, sent as `Authorization: Bearer`). Progress comes from GET /v1/jobs/{id}/events read with
// fetch(): EventSource cannot send an Authorization header.
"use strict";

const KEY_STORAGE = "sdxl.apiKey";
const RECONNECT_MS = 2000; // the stream's own `retry:` hint
const DATASET_POLL_MS = 1000;
const GALLERY_JOBS = 12;
const DATASET_RUNS = 10;
const ENDED = new Set(["succeeded", "failed", "canceled"]);
const RUN_FINISHED = new Set(["completed", "canceled", "failed"]);

const $ = (id) => document.getElementById(id);
let served = null; // GET /v1/models
let currentJob = null; // the job the result panel follows
let currentRun = null; // the data set run the data set panel follows

class ApiError extends Error {
  constructor(status, problem, text) {
    const detail = problem && (problem.detail || problem.title);
    super(detail || `HTTP ${status}: ${text.slice(0, 200)}`);
    this.status = status;
    this.problem = problem || {};
  }
}

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders() {
  return { Authorization: `Bearer ${apiKey()}` };
}

async function api(path, { method = "GET", body, headers = {} } = {}) {
  const h = { ...authHeaders(), ...headers };
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    h["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const r = await fetch(path, { method, headers: h, body: payload });
  const text = await r.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!r.ok) throw new ApiError(r.status, data, text);
  return data;
}

// A key for Idempotency-Key: crypto.randomUUID exists only in secure contexts (https, localhost).
function randomKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function notify(message) {
  const el = $("notice");
  el.textContent = message || "";
  el.hidden = !message;
}

function explain(err) {
  if (!(err instanceof ApiError)) return `The service did not answer: ${err.message}`;
  if (err.status === 401) return "The API key was refused: check it, then save it again.";
  const fields = (err.problem.errors || []).map((e) => `${e.field}: ${e.message}`);
  const lines = (err.problem.lines || []).slice(0, 5).map((e) => `line ${e.line} ${e.field}: ${e.message}`);
  const extra = [...fields, ...lines].join("; ");
  const retry = err.status === 429 || err.status === 503 ? " Try again in a few seconds." : "";
  return `${err.message}${extra && !err.message.includes(extra) ? ` (${extra})` : ""}${retry}`;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// ---- pages -------------------------------------------------------------------------------------------

function showPage() {
  const datasets = location.hash === "#datasets";
  $("page-generate").hidden = datasets;
  $("page-datasets").hidden = !datasets;
  $("nav-generate").toggleAttribute("aria-current", !datasets);
  $("nav-datasets").toggleAttribute("aria-current", datasets);
  if (!apiKey()) return;
  if (datasets) refreshRuns();
  else refreshGallery();
}

// ---- the key and what is served ----------------------------------------------------------------------

async function loadModels() {
  const [models, adapterList] = await Promise.all([api("/v1/models"), api("/v1/loras")]);
  served = models;
  const size = $("size");
  size.replaceChildren(
    ...served.sizes.map((s) => el("option", { value: `${s.width}x${s.height}`, text: `${s.width} x ${s.height}` })),
  );
  $("scheduler").replaceChildren(...served.schedulers.map((s) => el("option", { value: s, text: s })));
  $("output_format").replaceChildren(...served.output_formats.map((s) => el("option", { value: s, text: s })));
  $("timestep_spacing").replaceChildren(
    el("option", { value: "", text: "the model's" }),
    ...served.timestep_spacings.map((s) => el("option", { value: s, text: s })),
  );
  $("refiner-field").hidden = !served.refiner;
  const entries = served.models || [];
  $("model").replaceChildren(
    ...entries.map((m) => el("option", { value: m.name, text: m.workers ? m.name : `${m.name} (no worker holds it)` })),
  );
  $("model").value = served.model;
  $("model-field").hidden = entries.length < 2;
  const adapters = adapterList.loras;
  $("lora-names").textContent = adapters.map((a) => a.name).join(", ");
  $("lora-list").replaceChildren(...adapters.map((a) => el("option", { value: a.name })));
  $("loras-field").hidden = adapters.length === 0;
  $("steps").max = served.limits.max_steps;
  $("num_images").max = served.limits.max_images_per_job;
}

async function saveKey(event) {
  event.preventDefault();
  localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  await checkKey();
}

async function checkKey() {
  const state = $("key-state");
  if (!apiKey()) {
    state.textContent = "Enter an API key (python -m api.keys create TENANT).";
    return false;
  }
  try {
    await api("/v1/jobs?limit=1");
    state.textContent = "Key accepted.";
    notify("");
    showPage();
    return true;
  } catch (err) {
    state.textContent = err.status === 401 ? "Key refused." : "Could not check the key.";
    notify(explain(err));
    return false;
  }
}

// ---- one job -----------------------------------------------------------------------------------------

// Input images of a job whose settings were taken ("Use these settings"): their stored keys, sent again
// until another file is chosen (a file input cannot be given a value).
let reused = {};

// A chosen file as a data: URL (the API takes base64 or a data: URL); null when none is chosen.
function fileData(input) {
  const file = input.files && input.files[0];
  if (!file) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function formRequest() {
  const f = $("job-form");
  const [width, height] = f.size.value.split("x").map(Number);
  const request = {
    prompt: f.prompt.value,
    width,
    height,
    steps: Number(f.steps.value),
    guidance_scale: Number(f.guidance_scale.value),
    num_images: Number(f.num_images.value),
    scheduler: f.scheduler.value,
    output_format: f.output_format.value,
    preview: f.preview.checked,
  };
  if (f.negative_prompt.value) request.negative_prompt = f.negative_prompt.value;
  if (f.seed.value !== "") request.seed = Number(f.seed.value);
  if (f.webhook_url.value) request.webhook_url = f.webhook_url.value;
  if (f.timestep_spacing.value) request.timestep_spacing = f.timestep_spacing.value;
  const init = await fileData(f.init_image);
  const mask = await fileData(f.mask_image);
  if (init || reused.init_image) request.init_image = init || reused.init_image;
  if (mask || reused.mask_image) request.mask_image = mask || reused.mask_image;
  if (f.strength.value !== "") request.strength = Number(f.strength.value);
  if (f.refiner.value !== "" && served.refiner) request.refiner = { switch_at: Number(f.refiner.value) };
  if (!$("model-field").hidden && f.model.value !== served.model) request.model = f.model.value;
  const loras = parseLoras(f.loras.value);
  if (loras.length) request.loras = loras;
  return request;
}

// "pixel-art:0.8, ink" -> [{name: "pixel-art", scale: 0.8}, {name: "ink", scale: 1}]; the API checks the rest.
function parseLoras(text) {
  return text
    .split(",")
    .map((part) => part.trim())
    .filter((part) => part)
    .map((part) => {
      const at = part.lastIndexOf(":");
      if (at < 0) return { name: part, scale: 1 };
      return { name: part.slice(0, at).trim(), scale: Number(part.slice(at + 1)) };
    });
}

function markFields(err) {
  for (const node of $("job-form").querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
  for (const e of (err && err.problem && err.problem.errors) || []) {
    const name = e.field.startsWith("loras") ? "loras" : e.field.split(".").pop();
    const target = name === "width" || name === "height" ? $("size") : $("job-form").elements[name];
    if (target) target.setAttribute("aria-invalid", "true");
  }
}

async function submitJob(event) {
  event.preventDefault();
  const button = $("submit");
  button.disabled = true;
  notify("");
  markFields(null);
  try {
    const job = await api("/v1/jobs", {
      method: "POST",
      body: await formRequest(),
      headers: { "Idempotency-Key": randomKey() },
    });
    showJob(job);
    follow(job.id);
  } catch (err) {
    markFields(err);
    notify(explain(err));
  } finally {
    button.disabled = false;
  }
}

function showJob(job) {
  currentJob = job.id;
  $("job-state").textContent = `Job ${job.id}: ${job.status}`;
  $("job-images").replaceChildren();
  $("job-params").hidden = true;
  $("job-progress").hidden = true;
  hidePreview();
  $("cancel").disabled = ENDED.has(job.status);
  onEvent(job.status, job);
}

// Reads the job's event stream until it ends; a dropped stream is opened again (it starts with the
// job's state), for as long as the panel still follows this job.
async function follow(jobId) {
  while (currentJob === jobId) {
    try {
      const r = await fetch(`/v1/jobs/${jobId}/events`, { headers: authHeaders() });
      if (!r.ok) {
        const text = await r.text();
        throw new ApiError(r.status, safeJson(text), text);
      }
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const event = parseEvent(block);
          if (!event || currentJob !== jobId) continue;
          onEvent(event.name, event.data);
          if (ENDED.has(event.name)) return;
        }
      }
    } catch (err) {
      if (err instanceof ApiError && err.status < 500 && err.status !== 429) {
        notify(explain(err));
        return;
      }
    }
    await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
  }
}

function safeJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  return data.length ? { name, data: JSON.parse(data.join("\n")) } : null;
}

// The job's current estimate, as the worker drew it (a small WebP data URL, every few steps): kept until
// the next one, since events between previews carry none.
function showPreview(url, step) {
  const img = $("job-preview");
  img.src = url;
  img.dataset.step = String(step);
  img.hidden = false;
}

function hidePreview() {
  const img = $("job-preview");
  img.hidden = true;
  img.removeAttribute("src");
  delete img.dataset.step;
}

function onEvent(name, data) {
  const state = $("job-state");
  const bar = $("job-progress");
  if (name === "queued") {
    const position = data.queue_position;
    state.textContent = position ? `Queued: position ${position} in the queue.` : "Queued.";
  } else if (name === "running") {
    const p = data.progress;
    if (p) {
      bar.hidden = false;
      bar.max = p.steps;
      bar.value = p.step;
      state.textContent = `Running: step ${p.step} of ${p.steps}.`;
      if (p.preview) showPreview(p.preview, p.step);
    } else {
      state.textContent = "Running: on a device.";
    }
  } else if (ENDED.has(name)) {
    $("cancel").disabled = true;
    hidePreview(); // the image itself, or the reason there is none, replaces it
    if (name === "succeeded") {
      bar.value = bar.max;
      const took = data.finished_at && data.created_at ? ` in ${(data.finished_at - data.created_at).toFixed(1)} s` : "";
      state.textContent = `Succeeded${took}.`;
      showImages(data);
    } else if (name === "failed") {
      bar.hidden = true;
      state.textContent = `Failed: ${data.error || "no reason given"}`;
    } else {
      bar.hidden = true;
      state.textContent = "Canceled.";
    }
    refreshGallery();
  }
}

function showImages(job) {
  const r = job.request;
  $("job-images").replaceChildren(
    ...job.images.map((image) =>
      el(
        "figure",
        {},
        el("img", { src: image.url, alt: `${r.prompt} (seed ${image.seed})`, width: image.width, height: image.height }),
        el(
          "figcaption",
          {},
          `seed ${image.seed} · ${image.width}x${image.height} · `,
          el("a", { href: image.url, download: `${job.id}-${image.seed}.${r.output_format}`, text: "download" }),
        ),
      ),
    ),
  );
  const params = $("job-params");
  params.replaceChildren();
  const rows = [
    ["job", job.id],
    ["prompt", r.prompt],
    ["negative prompt", r.negative_prompt ?? "(none)"],
    ["size", `${r.width}x${r.height}`],
    ["steps", r.steps],
    ["guidance scale", r.guidance_scale],
    ["seed", job.images.map((i) => i.seed).join(", ")],
    ["scheduler", r.scheduler],
    ["format", r.output_format],
  ];
  if (r.timestep_spacing) rows.push(["spacing", r.timestep_spacing]);
  if (r.init_image) rows.push(["init image", r.init_image]);
  if (r.mask_image) rows.push(["mask", r.mask_image]);
  if (r.strength != null) rows.push(["strength", r.strength]);
  if (r.refiner) rows.push(["refiner from", r.refiner.switch_at]);
  if (r.model) rows.push(["model", r.model]);
  if (r.loras && r.loras.length) rows.push(["loras", r.loras.map((l) => `${l.name}:${l.scale}`).join(", ")]);
  if (job.truncated) rows.push(["note", "the prompt was longer than 77 tokens and was cut"]);
  for (const [k, v] of rows) params.append(el("dt", { text: k }), el("dd", { text: String(v) }));
  params.hidden = false;
}

async function cancelJob() {
  if (!currentJob) return;
  try {
    await api(`/v1/jobs/${currentJob}/cancel`, { method: "POST" });
  } catch (err) {
    notify(explain(err));
  }
}

// "Use these settings": the job's parameters back in the form, with the seed its first image used, so
// submitting again makes the same image.
function useSettings(job) {
  const f = $("job-form");
  const r = job.request;
  f.prompt.value = r.prompt;
  f.negative_prompt.value = r.negative_prompt ?? "";
  const size = `${r.width}x${r.height}`;
  if ([...f.size.options].some((o) => o.value === size)) f.size.value = size;
  f.steps.value = r.steps;
  f.guidance_scale.value = r.guidance_scale;
  f.seed.value = r.seed ?? (job.images[0] ? job.images[0].seed : "");
  f.num_images.value = r.num_images;
  f.scheduler.value = r.scheduler;
  f.output_format.value = r.output_format;
  f.preview.checked = r.preview ?? true;
  f.timestep_spacing.value = r.timestep_spacing ?? "";
  reused = { init_image: r.init_image, mask_image: r.mask_image };
  f.init_image.value = "";
  f.mask_image.value = "";
  f.strength.value = r.strength ?? "";
  f.refiner.value = r.refiner ? r.refiner.switch_at : "";
  f.model.value = r.model ?? served.model;
  f.loras.value = (r.loras || []).map((l) => `${l.name}:${l.scale}`).join(", ");
  f.webhook_url.value = r.webhook_url ?? "";
  f.prompt.focus();
}

// A GET whose failure is only said (the lists refresh again on the next change): the page or null.
async function listing(path) {
  try {
    return await api(path);
  } catch (err) {
    notify(explain(err));
    return null;
  }
}

async function refreshGallery() {
  const page = await listing(`/v1/jobs?limit=${GALLERY_JOBS}`);
  if (!page) return;
  const gallery = $("gallery");
  $("gallery-empty").hidden = page.jobs.length > 0;
  gallery.replaceChildren(
    ...page.jobs.map((job) => {
      const r = job.request;
      const image = job.images[0];
      const picture = image
        ? el("img", { src: image.url, alt: r.prompt, loading: "lazy", width: image.width, height: image.height })
        : el("div", { class: "placeholder", text: job.status });
      const summary = `${r.width}x${r.height} · ${r.steps} steps · guidance ${r.guidance_scale} · ${r.scheduler}`;
      const seeds = job.images.length ? ` · seed ${job.images.map((i) => i.seed).join(", ")}` : "";
      return el(
        "li",
        { "data-job": job.id },
        picture,
        el("p", { class: "prompt", text: r.prompt }),
        el("p", { class: "meta", text: `${job.status} · ${summary}${seeds}` }),
        el("button", { type: "button", text: "Use these settings", onclick: () => useSettings(job) }),
      );
    }),
  );
}

// ---- data sets ---------------------------------------------------------------------------------------

async function submitDataset(event) {
  event.preventDefault();
  notify("");
  const file = $("dataset-file").files[0];
  if (!file) {
    notify("Choose a JSONL file first.");
    return;
  }
  const options = {
    on_invalid: $("dataset-on-invalid").value,
    shard_size: Number($("dataset-shard-size").value),
    order: $("dataset-order").value,
  };
  if ($("dataset-seed").value !== "") options.seed = Number($("dataset-seed").value);
  const defaults = $("dataset-defaults").value.trim();
  if (defaults) {
    try {
      options.defaults = JSON.parse(defaults);
    } catch (err) {
      notify(`Defaults are not valid JSON: ${err.message}`);
      return;
    }
  }
  const form = new FormData();
  form.append("input", file, file.name);
  form.append("options", JSON.stringify(options));
  try {
    const run = await api("/v1/datasets", { method: "POST", body: form, headers: { "Idempotency-Key": randomKey() } });
    followRun(run);
  } catch (err) {
    notify(explain(err));
  }
}

async function followRun(run) {
  currentRun = run.id;
  let shards = -1;
  for (;;) {
    if (currentRun !== run.id) return;
    showRun(run);
    if (run.shards !== shards || RUN_FINISHED.has(run.status)) {
      shards = run.shards;
      await showRunFiles(run);
    }
    if (RUN_FINISHED.has(run.status)) {
      refreshRuns();
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, DATASET_POLL_MS));
    try {
      run = await api(`/v1/datasets/${run.id}`);
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        notify(explain(err));
        return;
      }
      // 503 or no answer: the run goes on on the service; ask again next time
    }
  }
}

function duration(s) {
  if (s == null) return "unknown";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function showRun(run) {
  const c = run.counts;
  const done = c.succeeded + c.failed + c.canceled;
  const bar = $("dataset-progress");
  bar.hidden = false;
  bar.max = Math.max(c.total, 1);
  bar.value = done;
  $("dataset-state").textContent = `Run ${run.id}: ${run.status}`;
  const rate = run.images_per_s ? ` · ${run.images_per_s.toFixed(2)} images/s` : "";
  const eta = RUN_FINISHED.has(run.status) ? "" : ` · ETA ${run.stalled_s ? "stalled" : duration(run.eta_s)}`;
  $("dataset-counts").textContent =
    `${done} of ${c.total} done: ${c.succeeded} succeeded, ${c.failed} failed, ${c.canceled} canceled, ` +
    `${c.running} running, ${c.queued} queued, ${c.skipped} skipped${rate}${eta}`;
  const cancel = $("dataset-cancel");
  cancel.disabled = run.status !== "running";
  cancel.onclick = async () => {
    try {
      await api(`/v1/datasets/${run.id}/cancel`, { method: "POST" });
    } catch (err) {
      notify(explain(err));
    }
  };
  // retry: the failed lines again; resume: a canceled run's canceled lines (same seeds either way)
  const again = (button, action, enabled) => {
    button.disabled = !enabled;
    button.onclick = async () => {
      try {
        const answer = await api(`/v1/datasets/${run.id}/${action}`, { method: "POST" });
        followRun(answer.dataset);
      } catch (err) {
        notify(explain(err));
      }
    };
  };
  const ended = RUN_FINISHED.has(run.status);
  again($("dataset-retry"), "retry", ended && c.failed > 0);
  again($("dataset-resume"), "resume", run.status === "canceled" && c.canceled > 0);
}

async function showRunFiles(run) {
  let files;
  try {
    files = await api(`/v1/datasets/${run.id}/files`);
  } catch (err) {
    return; // links come on the next change
  }
  const links = [];
  const add = (url, text) => url && links.push(el("li", {}, el("a", { href: url, text })));
  add(files.manifest_jsonl, "manifest (JSONL)");
  add(files.manifest_parquet, "manifest (Parquet)");
  add(files.failures, "failures (JSONL)");
  add(files.invalid, "invalid lines (JSONL)");
  add(files.stats, "stats (JSON)");
  add(files.card, "data set card (README.md)");
  files.shards.forEach((url, i) => add(url, `shard ${i} (WebDataset tar)`));
  if (!files.manifest_jsonl) files.manifest_parts.forEach((url, i) => add(url, `manifest part ${i}`));
  $("dataset-links").replaceChildren(...links);
}

async function refreshRuns() {
  const page = await listing(`/v1/datasets?limit=${DATASET_RUNS}`);
  if (!page) return;
  $("runs-empty").hidden = page.datasets.length > 0;
  $("runs").replaceChildren(
    ...page.datasets.map((run) => {
      const c = run.counts;
      return el(
        "li",
        { "data-run": run.id },
        el("span", { text: `${run.id} · ${run.status} · ${c.succeeded}/${c.total} succeeded ` }),
        el("button", { type: "button", text: "Show", onclick: () => followRun(run) }),
      );
    }),
  );
}

// ---- start -------------------------------------------------------------------------------------------

async function start() {
  $("key-form").addEventListener("submit", saveKey);
  $("job-form").addEventListener("submit", submitJob);
  for (const name of ["init_image", "mask_image"]) {
    $(name).addEventListener("change", () => delete reused[name]); // a new file replaces the reused key
  }
  $("cancel").addEventListener("click", cancelJob);
  $("dataset-form").addEventListener("submit", submitDataset);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("job-form").requestSubmit();
  });
  window.addEventListener("hashchange", showPage);
  $("api-key").value = apiKey();
  showPage();
  try {
    await loadModels();
  } catch (err) {
    notify(explain(err));
  }
  await checkKey();
}

start();
