// The playground's only script: a plain ES module, served as it is (no build step, no
// framework, nothing from the internet; see index.html). It is a window on the JSON API:
// every request below is one a user could make with curl.

const $ = (id) => document.getElementById(id);
const KEY_STORE = "softvq-api-key";
const METRICS_EVERY_MS = 3000;
const MODELS_EVERY_MS = 15000;

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  models: null, // GET /models
  genAbort: null, // AbortController of the running /generate
  genJob: null, // the running /generate's job ({id, urls}), to cancel it
  lastSent: null, // the last /generate body sent (the curl box shows it)
  file: null, // the image of the reconstruct panel
  recRun: 0, // reconstruct runs: a newer one supersedes an older one's answers
  prevMetrics: null, // {t, images: {model: count}} of the previous /metrics poll
  rates: {}, // model -> images/s
};

// --- talking to the API ---------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.name = "ApiError";
    Object.assign(this, { status, code, retryAfter });
  }
}

class InputError extends Error {}

async function api(path, { method = "GET", json, form, signal, accept, prefer } = {}) {
  const headers = {};
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  if (accept) headers.Accept = accept;
  if (prefer) headers.Prefer = prefer;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form; // the browser sets multipart/form-data with its boundary
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal, cache: "no-store" });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "network_error", e.message || String(e));
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

// Every error of the API is {"error": code, "message": text}; anything else (a proxy's HTML
// page) is shown as its first few hundred characters.
async function errorOf(response) {
  const text = await response.text().catch(() => "");
  let code = "";
  let message = "";
  try {
    const body = JSON.parse(text);
    code = typeof body.error === "string" ? body.error : "";
    message = typeof body.message === "string" ? body.message : "";
  } catch {
    message = text.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim().slice(0, 300);
  }
  if (response.status === 401) askForKey(state.key ? "The key was refused." : "");
  return new ApiError(
    response.status,
    code || `http_${response.status}`,
    message || response.statusText || "no details",
    response.headers.get("Retry-After"),
  );
}

const HEADLINES = {
  400: "The server could not read the request",
  401: "This service needs an API key",
  404: "Not found",
  413: "Too large for the server",
  415: "Unsupported content type",
  422: "The server refused the request",
  429: "Too many requests",
  499: "The request was dropped",
  503: "The service is unavailable right now",
  504: "The request ran out of time",
};

// A failed job's error code -> the HTTP status the same request would have had synchronously.
const JOB_ERROR_STATUS = {
  timeout: 504,
  queue_full: 429,
  invalid_input: 422,
  broker_unavailable: 503,
  model_hung: 503,
};

// Follows a job's Server-Sent Events (GET /jobs/{id}/events) with fetch, so the API key goes
// in a header as everywhere else: ``onProgress(step, steps)`` per progress event and, when
// given, ``onPreview({step, steps, png})`` per preview event (?previews=1); resolves with the
// job's output, or throws its error (an AbortError once it was cancelled).
async function followJob(job, onProgress, signal, onPreview = null) {
  const url = onPreview ? `${job.urls.events}?previews=1` : job.urls.events;
  const response = await api(url, { signal, accept: "text/event-stream" });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "message";
  let data = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (line === "") {
        if (data) {
          const body = JSON.parse(data);
          if (event === "progress") onProgress(body.step, body.steps);
          if (event === "preview" && onPreview) onPreview(body);
          if (event === "succeeded") return body.output;
          if (event === "failed") {
            const { error, message } = body.error;
            throw new ApiError(JOB_ERROR_STATUS[error] || 500, error, message);
          }
          if (event === "canceled") throw new DOMException("cancelled", "AbortError");
        }
        event = "message";
        data = "";
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") event = text;
        if (field === "data") data = data ? `${data}\n${text}` : text;
      }
    }
  }
  throw new ApiError(0, "network_error", "the job's event stream ended early");
}

function describe(err) {
  if (typeof err === "string") return err;
  if (err instanceof InputError) return err.message;
  if (err.name === "AbortError") return "Cancelled.";
  if (!(err instanceof ApiError)) return `Something went wrong in the page: ${err.message || err}`;
  if (err.status === 0) {
    return `Could not reach the service at ${location.origin} (${err.message}). Is it running?`;
  }
  const head =
    HEADLINES[err.status] || (err.status >= 500 ? "The service failed" : "The request failed");
  let text = `${head} (${err.status} ${err.code}): ${err.message}`;
  if (!/[.!?]$/.test(text)) text += ".";
  if (err.retryAfter) text += ` Retry after ${err.retryAfter} s.`;
  if (err.status === 401) text += " Enter one in the API key box.";
  if (err.status === 504) text += " Try fewer images or fewer steps.";
  return text;
}

function showError(el, err, tone = "error") {
  el.textContent = describe(err);
  el.classList.toggle("notice", tone === "notice");
  el.hidden = false;
}

function clearError(el) {
  el.hidden = true;
  el.textContent = "";
}

// A failure nobody caught still reaches the page, never only the console.
window.addEventListener("error", (e) => showError($("page-error"), e.error || e.message));
window.addEventListener("unhandledrejection", (e) => showError($("page-error"), e.reason));

// --- the API key ----------------------------------------------------------------------------
function askForKey(why) {
  const panel = $("key-panel");
  const fresh = panel.hidden || !panel.classList.contains("needed");
  panel.hidden = false;
  panel.classList.add("needed");
  if (why) $("key-why").textContent = `${why} Enter a valid API key.`;
  if (fresh) $("key-input").focus(); // once, not at every refresh that gets a 401
}

$("key-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  state.key = $("key-input").value.trim();
  if (state.key) sessionStorage.setItem(KEY_STORE, state.key);
  else sessionStorage.removeItem(KEY_STORE);
  $("key-input").value = "";
  $("key-panel").classList.remove("needed");
  clearError($("page-error"));
  if (await loadModels()) $("key-why").textContent = "Using the key you entered (this tab only).";
  refreshCurl();
});

$("key-forget").addEventListener("click", () => {
  state.key = "";
  sessionStorage.removeItem(KEY_STORE);
  $("key-why").textContent = "Key forgotten.";
  refreshCurl();
});

// --- formatting helpers -----------------------------------------------------------------------
const fmtInt = (n) => Math.round(n).toLocaleString("en-US");
const fmtBytes = (n) => `${fmtInt(n)} B`;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function shellQuote(s) {
  return `'${String(s).replace(/'/g, "'\\''")}'`;
}

function className(gen, id) {
  const names = gen && Array.isArray(gen.class_names) ? gen.class_names : null;
  return names && names[id] !== undefined ? String(names[id]) : `class ${id}`;
}

function intField(input, name, { min = 0 } = {}) {
  if (input.validity.badInput) throw new InputError(`${name}: not a number.`);
  const text = input.value.trim();
  if (text === "") return null;
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < min) {
    throw new InputError(`${name}: a whole number from ${min} up, please (got ${text}).`);
  }
  return n;
}

function numberField(input, name) {
  if (input.validity.badInput) throw new InputError(`${name}: not a number.`);
  const text = input.value.trim();
  if (text === "") return null;
  const n = Number(text);
  if (!Number.isFinite(n)) throw new InputError(`${name}: not a number (${text}).`);
  return n;
}

// --- models --------------------------------------------------------------------------------
async function loadModels() {
  try {
    const response = await api("/models");
    const first = !state.models;
    state.models = await response.json();
    clearError($("status-error"));
    if (first) clearError($("page-error")); // "could not list the models", if it was shown
    renderModelChoices();
    renderModelsTable();
    return true;
  } catch (e) {
    showError($("status-error"), e);
    if (!state.models) showError($("page-error"), `Could not list the models. ${describe(e)}`);
    $("live").textContent = "Not connected";
    return false;
  }
}

const generators = () => (state.models ? state.models.generators : []);
const tokenizers = () => (state.models ? state.models.tokenizers : []);
const currentGenerator = () => generators().find((g) => g.name === $("gen-model").value);

function renderModelChoices() {
  const select = $("gen-model");
  const names = generators().map((g) => g.name);
  const had = [...select.options].map((o) => o.value);
  if (names.join("\n") !== had.join("\n")) {
    const keep = select.value;
    select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
    if (names.includes(keep)) select.value = keep;
    renderClasses();
  }
  $("gen-run").disabled = names.length === 0 || state.genAbort !== null;
  if (!names.length) $("gen-model-info").textContent = "This server serves no generator.";

  const box = $("rec-models");
  const toks = tokenizers().map((t) => t.name);
  const shown = [...box.querySelectorAll("input")].map((i) => i.value);
  if (toks.join("\n") !== shown.join("\n")) {
    box.replaceChildren(
      ...tokenizers().map((t) =>
        el(
          "label",
          { class: "check" },
          el("input", { type: "checkbox", value: t.name, checked: true }),
          ` ${t.name} (${t.num_tokens} tokens)`,
        ),
      ),
    );
  }
}

function renderClasses() {
  const gen = currentGenerator();
  const box = $("gen-classes");
  if (!gen) {
    box.replaceChildren();
    return;
  }
  const n = gen.num_classes;
  const tick = n <= 16 ? n : 8; // all of a small label set; a sample of a large one
  box.replaceChildren(
    ...Array.from({ length: n }, (_, i) =>
      el(
        "label",
        { class: "check", title: `class id ${i}` },
        el("input", { type: "checkbox", value: String(i), checked: i < tick }),
        ` ${className(gen, i)}`,
      ),
    ),
  );
  applySamplingDefaults(gen);
  const tokens = gen.num_tokens ? `, ${gen.num_tokens} tokens` : "";
  $("gen-model-info").textContent =
    `${n} classes, ${gen.image_size} px${tokens}, tokenizer ${gen.tokenizer}.`;
  $("gen-classes-hint").textContent =
    (Array.isArray(gen.class_names) ? "" : "Ids: /models lists no class names. ") +
    "None ticked: classes drawn from the seed.";
  syncClassControls();
}

// The chosen generator's own settings (GET /models' sampling_defaults, from its config.json)
// fill the sampling fields, so a first click draws what the model draws best.
function applySamplingDefaults(gen) {
  const d = gen.sampling_defaults;
  if (!d) return;
  $("gen-steps").value = String(d.steps);
  $("gen-sampler").value = d.sampler;
  $("gen-cfg").value = String(d.cfg_scale);
  $("gen-gi-lo").value = String(d.guidance_interval[0]);
  $("gen-gi-hi").value = String(d.guidance_interval[1]);
}

const checkedClasses = () =>
  [...$("gen-classes").querySelectorAll("input:checked")].map((i) => Number(i.value));

function syncClassControls() {
  const any = checkedClasses().length > 0;
  $("gen-count-label").textContent = any ? "Images per class" : "Number of images";
  $("gen-same-seed").disabled = !any;
  refreshCurl();
}

$("gen-model").addEventListener("change", renderClasses);
$("gen-classes").addEventListener("change", syncClassControls);
$("gen-classes-all").addEventListener("click", () => {
  for (const i of $("gen-classes").querySelectorAll("input")) i.checked = true;
  syncClassControls();
});
$("gen-classes-none").addEventListener("click", () => {
  for (const i of $("gen-classes").querySelectorAll("input")) i.checked = false;
  syncClassControls();
});

// --- generate ------------------------------------------------------------------------------
function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0] >>> 1; // [0, 2^31)
}

// The /generate body the form describes. ``submit``: an empty seed with "same seed for every
// class" draws one here (written back into the form, so the run can be repeated).
function generateBody(submit = false) {
  const gen = currentGenerator();
  const body = {};
  if (gen) body.model = gen.name;
  const classes = checkedClasses();
  const count = intField($("gen-count"), "Images", { min: 1 }) ?? 1;
  let seed = intField($("gen-seed"), "Seed");
  if (classes.length) {
    body.class_labels = classes.flatMap((c) => Array(count).fill(c));
    if ($("gen-same-seed").checked && classes.length > 1) {
      if (seed === null && submit) {
        seed = randomSeed();
        $("gen-seed").value = String(seed);
      }
      if (seed !== null) {
        body.seeds = classes.flatMap(() => Array.from({ length: count }, (_, i) => seed + i));
      }
    } else if (seed !== null) {
      body.seed = seed;
    }
  } else {
    body.num_images = count;
    if (seed !== null) body.seed = seed;
  }
  const steps = intField($("gen-steps"), "Steps", { min: 1 });
  if (steps !== null) body.steps = steps;
  body.sampler = $("gen-sampler").value;
  const cfg = numberField($("gen-cfg"), "CFG scale");
  if (cfg !== null) body.cfg_scale = cfg;
  const lo = numberField($("gen-gi-lo"), "Guidance interval, from") ?? 0;
  const hi = numberField($("gen-gi-hi"), "Guidance interval, to") ?? 1;
  body.guidance_interval = [lo, hi];
  return body;
}

function curlFor(path, body) {
  const lines = [`curl -s ${shellQuote(location.origin + path)}`];
  lines.push("-H 'Content-Type: application/json'");
  if (state.key) lines.push(`-H "Authorization: Bearer $SOFTVQ_API_KEY"`);
  lines.push(`-d ${shellQuote(JSON.stringify(body))}`);
  return lines.join(" \\\n     ");
}

function refreshCurl() {
  let text;
  try {
    text = curlFor("/generate", state.lastSent ?? generateBody(false));
  } catch (e) {
    text = `# ${describe(e)}`;
  }
  $("gen-curl").textContent = text;
}

// Editing the form shows the request it would send; after a run, the one that was sent.
$("gen-form").addEventListener("input", () => {
  state.lastSent = null;
  refreshCurl();
});
$("gen-form").addEventListener("change", () => {
  state.lastSent = null;
  refreshCurl();
});

$("gen-seed-random").addEventListener("click", () => {
  $("gen-seed").value = String(randomSeed());
  state.lastSent = null;
  refreshCurl();
});

$("gen-copy").addEventListener("click", async () => {
  const text = $("gen-curl").textContent;
  const status = $("gen-copy-status");
  try {
    await navigator.clipboard.writeText(text);
    status.textContent = "Copied.";
  } catch {
    // No clipboard API (a page not served from localhost or https): select it instead.
    const range = document.createRange();
    range.selectNodeContents($("gen-curl"));
    const sel = getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    status.textContent = document.execCommand("copy") ? "Copied." : "Selected: press Ctrl+C.";
  }
});

function setGenerating(on, text = "") {
  const run = $("gen-run");
  const cancel = $("gen-cancel");
  const hadFocus = document.activeElement;
  run.disabled = on;
  cancel.disabled = !on;
  $("gen-progress").hidden = !on;
  $("gen-progress-text").textContent = text;
  // Indeterminate until the first progress event of the job arrives.
  document.querySelector("#gen-progress progress").removeAttribute("value");
  // No preview until the job's first one arrives.
  const preview = $("gen-preview");
  preview.hidden = true;
  preview.removeAttribute("src");
  if (on && hadFocus === run) cancel.focus();
  if (!on && hadFocus === cancel) run.focus();
}

$("gen-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (state.genAbort) return;
  const errorBox = $("gen-error");
  clearError(errorBox);
  let body;
  try {
    body = generateBody(true);
  } catch (e) {
    showError(errorBox, e);
    return;
  }
  state.lastSent = body;
  refreshCurl();
  const n = body.class_labels ? body.class_labels.length : body.num_images;
  const what = `${n} image${n === 1 ? "" : "s"}${body.steps ? `, ${body.steps} steps each` : ""}`;
  const controller = new AbortController();
  state.genAbort = controller;
  const t0 = performance.now();
  // The request runs as a job (POST /jobs); its event stream drives the bar: the
  // sampler's step of the steps, and the time spent.
  let done = "";
  const tick = () => {
    const s = ((performance.now() - t0) / 1000).toFixed(0);
    $("gen-progress-text").textContent = `Generating ${what}… ${done}${s} s`;
  };
  const onProgress = (step, steps) => {
    const bar = document.querySelector("#gen-progress progress");
    bar.max = steps;
    bar.value = step;
    done = `step ${step} of ${steps}, `;
    tick();
  };
  // The sampler's current estimate of the images, about every second (POST /jobs previews).
  const onPreview = ({ step, steps, png }) => {
    const img = $("gen-preview");
    img.src = `data:image/png;base64,${png}`;
    img.title = `Estimate at step ${step} of ${steps}`;
    img.hidden = false;
  };
  setGenerating(true);
  tick();
  const timer = setInterval(tick, 500);
  try {
    // interactive: someone is watching (async jobs default to the batch lane)
    const accepted = await api("/jobs", {
      method: "POST",
      json: { task: "generate", input: body, priority: "interactive", previews: true },
      signal: controller.signal,
    });
    const job = await accepted.json();
    state.genJob = job;
    const data = await followJob(job, onProgress, controller.signal, onPreview);
    renderGrid(data, (performance.now() - t0) / 1000);
  } catch (e) {
    if (e.name === "AbortError") {
      showError(
        errorBox,
        "Cancelled. The server drops the job, or stops it at its next sampling step.",
        "notice",
      );
    } else {
      showError(errorBox, e);
    }
  } finally {
    clearInterval(timer);
    state.genAbort = null;
    state.genJob = null;
    setGenerating(false);
  }
});

$("gen-cancel").addEventListener("click", () => {
  if (state.genJob) api(state.genJob.urls.cancel, { method: "DELETE" }).catch(() => {});
  if (state.genAbort) state.genAbort.abort();
});

function renderGrid(data, seconds) {
  const gen = generators().find((g) => g.name === data.model) || currentGenerator();
  const grid = $("gen-grid");
  const perClass = state.lastSent && state.lastSent.class_labels ? countPerClass(data) : 0;
  grid.classList.toggle("rows", perClass > 1);
  grid.style.setProperty("--cols", String(Math.max(perClass, 1)));
  grid.replaceChildren(
    ...data.images.map((b64, i) => {
      const cls = data.class_labels[i];
      const seed = data.seeds[i];
      const name = className(gen, cls);
      const src = `data:image/png;base64,${b64}`;
      const file = `${data.model}-${name.replace(/[^\w-]+/g, "_")}-seed${seed}.png`;
      return el(
        "li",
        {},
        el(
          "figure",
          { class: "sample" },
          el("img", { src, alt: `${name}, seed ${seed}`, width: 128, height: 128 }),
          el(
            "figcaption",
            {},
            el("span", { class: "cls", text: name }),
            el("span", { class: "seed", text: `seed ${seed}` }),
            el("a", {
              href: src,
              download: file,
              class: "download",
              text: "PNG",
              "aria-label": `Download ${name}, seed ${seed}, as PNG`,
            }),
          ),
        ),
      );
    }),
  );
  const p = data.parameters || {};
  const gi = Array.isArray(p.guidance_interval) ? ` [${p.guidance_interval.join(", ")}]` : "";
  $("gen-summary").textContent =
    `${data.images.length} image${data.images.length === 1 ? "" : "s"} from ${data.model} ` +
    `in ${seconds.toFixed(1)} s: ${p.steps} steps, ${p.sampler}, cfg ${p.cfg_scale}` +
    (p.cfg_scale > 1 ? `, guidance in t${gi}` : "") +
    ".";
}

function countPerClass(data) {
  // Images come class by class: the run of the first label is the count per class.
  const labels = data.class_labels;
  let k = 0;
  while (k < labels.length && labels[k] === labels[0]) k++;
  return k;
}

// --- tokenize and reconstruct -----------------------------------------------------------
const checkedTokenizers = () => {
  const names = [...$("rec-models").querySelectorAll("input:checked")].map((i) => i.value);
  return tokenizers().filter((t) => names.includes(t.name));
};

$("rec-file").addEventListener("change", () => {
  const file = $("rec-file").files[0];
  if (file) useImage(file);
});

const drop = $("rec-drop");
drop.addEventListener("dragover", (ev) => {
  ev.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => {
  ev.preventDefault();
  drop.classList.remove("over");
  const file = ev.dataTransfer.files[0];
  if (file) useImage(file);
  else showError($("rec-error"), "That was not a file: drop an image file.");
});
document.addEventListener("paste", (ev) => {
  const file = [...(ev.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
  if (file) useImage(file);
});

$("rec-sample").addEventListener("click", async () => useImage(await sampleImage()));

$("rec-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if (state.file) reconstruct();
});

function useImage(file) {
  state.file = file;
  $("rec-run").disabled = false;
  reconstruct();
}

// A landscape test card (not square, so the crop shows): a gradient, a ring and a star.
async function sampleImage() {
  const c = el("canvas", { width: 240, height: 160 });
  const g = c.getContext("2d");
  const bg = g.createLinearGradient(0, 0, 240, 160);
  bg.addColorStop(0, "#1d3557");
  bg.addColorStop(1, "#a8dadc");
  g.fillStyle = bg;
  g.fillRect(0, 0, 240, 160);
  g.lineWidth = 14;
  g.strokeStyle = "#f1faee";
  g.beginPath();
  g.arc(92, 80, 44, 0, 2 * Math.PI);
  g.stroke();
  g.fillStyle = "#e63946";
  g.beginPath();
  for (let i = 0; i < 10; i++) {
    const r = i % 2 ? 16 : 38;
    const a = -Math.PI / 2 + (i * Math.PI) / 5;
    g.lineTo(150 + r * Math.cos(a), 84 + r * Math.sin(a));
  }
  g.closePath();
  g.fill();
  const blob = await new Promise((resolve) => c.toBlob(resolve, "image/png"));
  return new File([blob], "sample.png", { type: "image/png" });
}

// The service's preprocessing, redone in a canvas for display: the picture upright (the
// bitmap obeys EXIF orientation, as the service does), its shorter side resized to the model's
// size and the centre square kept where it lies (model/images.py: resize_center_crop), on white.
function cropCanvas(bitmap, size) {
  const { width: w, height: h } = bitmap;
  const scale = size / Math.min(w, h);
  const c = el("canvas", { width: size, height: size });
  const g = c.getContext("2d");
  g.fillStyle = "#fff";
  g.fillRect(0, 0, size, size);
  g.imageSmoothingEnabled = true;
  g.imageSmoothingQuality = "high";
  g.drawImage(bitmap, (size - w * scale) / 2, (size - h * scale) / 2, w * scale, h * scale);
  return c;
}

async function reconstruct() {
  const file = state.file;
  const toks = checkedTokenizers();
  const errorBox = $("rec-error");
  clearError(errorBox);
  if (!toks.length) {
    showError(errorBox, "Tick at least one tokenizer.");
    return;
  }
  const run = ++state.recRun;
  $("rec-progress").hidden = false;
  $("rec-progress-text").textContent =
    `Tokenizing and reconstructing with ${toks.map((t) => t.name).join(", ")}…`;
  const cards = $("rec-cards");
  cards.replaceChildren();

  let bitmap = null;
  try {
    bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  } catch {
    // The browser cannot read it: the service will say what is wrong with it.
  }
  const crops = {};
  for (const size of [...new Set(toks.map((t) => t.image_size))]) {
    if (!bitmap) break;
    const canvas = cropCanvas(bitmap, size);
    const png = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    crops[size] = { canvas, pngBytes: png ? png.size : null };
    cards.append(originalCard(file, bitmap, size, crops[size]));
  }
  $("rec-summary").textContent =
    `${file.name || "image"}: ${fmtBytes(file.size)}` +
    (bitmap
      ? `, ${bitmap.width} × ${bitmap.height} px.`
      : " (this browser cannot draw it, HEIC for one; the service reads it).");

  const jobs = toks.map((tok) => {
    const card = el("article", { class: "card", "aria-label": `Tokenizer ${tok.name}` });
    card.append(el("h3", { text: tok.name }), el("p", { class: "hint", text: "Working…" }));
    cards.append(card);
    return reconstructWith(tok, file, crops[tok.image_size], card, run);
  });
  await Promise.allSettled(jobs);
  if (run === state.recRun) $("rec-progress").hidden = true;
}

function originalCard(file, bitmap, size, crop) {
  crop.canvas.setAttribute("role", "img");
  crop.canvas.setAttribute("aria-label", `Your image, cropped to ${size} by ${size}`);
  crop.canvas.className = "pixels";
  return el(
    "article",
    { class: "card original", "aria-label": "Original" },
    el("h3", { text: "Original" }),
    el(
      "figure",
      {},
      crop.canvas,
      el("figcaption", {
        text:
          `As the service sees it: ${bitmap.width} × ${bitmap.height} resized on the shorter ` +
          `side to ${size} px and centre-cropped (drawn here in a canvas; the service's bicubic ` +
          `resize can differ slightly).`,
      }),
    ),
    crop.pngBytes ? el("p", { class: "hint", text: `PNG of this crop: ${fmtBytes(crop.pngBytes)}.` }) : null,
  );
}

async function reconstructWith(tok, file, crop, card, run) {
  const form = (extra = {}) => {
    const f = new FormData();
    f.append("image", file, file.name || "image.png");
    f.append("model", tok.name);
    for (const [k, v] of Object.entries(extra)) f.append(k, v);
    return f;
  };
  try {
    const [rec, tokens] = await Promise.all([
      api("/reconstruct", { method: "POST", form: form() }).then((r) => r.json()),
      api("/tokenize", { method: "POST", form: form({ format: "base64" }) }).then((r) => r.json()),
    ]);
    if (run !== state.recRun) return;
    fillCard(card, tok, rec, tokens, file, crop);
  } catch (e) {
    if (run !== state.recRun) return;
    const box = el("div", { class: "error", role: "alert" });
    showError(box, e);
    card.replaceChildren(el("h3", { text: tok.name }), box);
    showError($("rec-error"), `${tok.name}: ${describe(e)}`);
  }
}

function decodeTokens(data) {
  const [, L, D] = data.shape;
  const raw = Uint8Array.from(atob(data.tokens_b64), (c) => c.charCodeAt(0));
  const view = new DataView(raw.buffer);
  const values = new Float32Array(L * D);
  for (let i = 0; i < values.length; i++) values[i] = view.getFloat32(i * 4, true); // little-endian
  return { L, D, values };
}

// Diverging colours: blue (negative), white (0), red (positive).
function diverging(x) {
  const t = Math.max(-1, Math.min(1, x));
  const [r0, g0, b0] = t < 0 ? [59, 76, 192] : [180, 4, 38];
  const a = Math.abs(t);
  return [255 + (r0 - 255) * a, 255 + (g0 - 255) * a, 255 + (b0 - 255) * a];
}

function heatmap({ L, D, values }) {
  // One column per token, one row per dimension.
  const c = el("canvas", { width: L, height: D, class: "pixels heat" });
  const g = c.getContext("2d");
  const img = g.createImageData(L, D);
  let peak = 0;
  for (const v of values) peak = Math.max(peak, Math.abs(v));
  peak = peak || 1;
  for (let l = 0; l < L; l++) {
    for (let d = 0; d < D; d++) {
      const [r, gr, b] = diverging(values[l * D + d] / peak);
      const o = (d * L + l) * 4;
      img.data.set([r, gr, b, 255], o);
    }
  }
  g.putImageData(img, 0, 0);
  c.style.height = `${Math.max(24, Math.min(4 * D, 96))}px`; // cells stretched across the card
  return { canvas: c, peak };
}

function indexMap(indices) {
  // One row per codebook, one cell per token of its group; a colour per code.
  const G = indices.length;
  const n = G ? indices[0].length : 0;
  const c = el("canvas", { width: n, height: G, class: "pixels codes" });
  const g = c.getContext("2d");
  indices.forEach((row, gi) =>
    row.forEach((code, j) => {
      g.fillStyle = `hsl(${(code * 137.508) % 360} 65% ${45 + (code % 3) * 12}%)`;
      g.fillRect(j, gi, 1, 1);
    }),
  );
  c.style.height = `${Math.min(14 * G, 96)}px`;
  return c;
}

function bar(label, bytes, max, detail) {
  const pct = max ? Math.max(0.5, (100 * bytes) / max) : 0;
  return el(
    "li",
    {},
    el("span", { class: "bar-label", text: label }),
    el("span", { class: "bar" }, el("span", { class: "fill", style: `width:${pct.toFixed(1)}%` })),
    el("span", { class: "bar-value", text: detail }),
  );
}

function fillCard(card, tok, rec, tokens, file, crop) {
  const psnr = rec.psnr[0];
  const psnrText = psnr === null ? "PSNR ∞ (identical)" : `PSNR ${psnr.toFixed(2)} dB`;
  const recon = el("img", {
    src: `data:image/png;base64,${rec.images[0]}`,
    alt: `Reconstruction by ${tok.name}`,
    class: "pixels",
    width: tok.image_size,
    height: tok.image_size,
  });

  const t = decodeTokens(tokens);
  const { canvas: heat, peak } = heatmap(t);
  heat.setAttribute("role", "img");
  heat.setAttribute("aria-label", `Heat map of ${t.L} tokens by ${t.D} dimensions`);
  const indices = tokens.indices[0]; // (G, L/G)
  const codes = indexMap(indices);
  codes.setAttribute("role", "img");
  codes.setAttribute("aria-label", `Code indices of ${indices.length} codebooks`);

  // What the tokens cost: L*D float32 values, or G*(L/G) code indices of log2(K) bits each.
  const floatBytes = t.L * t.D * 4;
  const count = indices.reduce((s, row) => s + row.length, 0);
  let maxCode = 0;
  for (const row of indices) for (const c of row) maxCode = Math.max(maxCode, c);
  const K = tok.codebook_size;
  const bits = K ? Math.ceil(Math.log2(K)) : Math.max(1, Math.ceil(Math.log2(maxCode + 1)));
  const indexBytes = Math.ceil((count * bits) / 8);
  const pngBytes = crop && crop.pngBytes ? crop.pngBytes : null;
  const max = Math.max(floatBytes, indexBytes, pngBytes || 0, file.size);
  const bars = el(
    "ul",
    { class: "bars", "aria-label": "Bytes" },
    bar("tokens, float32", floatBytes, max, `${fmtBytes(floatBytes)} (${t.L} × ${t.D} × 4)`),
    bar(
      "code indices",
      indexBytes,
      max,
      `${fmtBytes(indexBytes)} (${count} × ${K ? "" : "≥ "}${bits} bits)`,
    ),
    pngBytes
      ? bar(`PNG ${tok.image_size}²`, pngBytes, max, `${fmtBytes(pngBytes)}`)
      : null,
    bar("your file", file.size, max, fmtBytes(file.size)),
  );
  const ratio = pngBytes ? ` The PNG of the crop is ${(pngBytes / floatBytes).toFixed(1)}× the float tokens, ${(pngBytes / indexBytes).toFixed(0)}× the indices.` : "";
  const codeText = indices.map((row, g) => `codebook ${g + 1}: ${row.join(" ")}`).join("\n");

  card.replaceChildren(
    el("h3", { text: tok.name }),
    el("p", { class: "hint", text: `${t.L} tokens × ${t.D} dims, ${indices.length} codebooks` }),
    el("figure", {}, recon, el("figcaption", { class: "psnr", text: psnrText })),
    el(
      "figure",
      {},
      heat,
      el("figcaption", {
        text: `Tokens: ${t.L} columns × ${t.D} dims; blue < 0 < red, scale ±${peak.toFixed(2)}.`,
      }),
    ),
    el(
      "figure",
      {},
      codes,
      el("figcaption", {
        text: `Code indices: ${indices.length} codebooks × ${indices[0]?.length ?? 0}, a colour per code.`,
      }),
    ),
    el("details", {}, el("summary", { text: "Indices as numbers" }), el("pre", { text: codeText })),
    bars,
    el("p", {
      class: "hint",
      text: (K ? "" : "Codebook size not listed by /models: bits from the largest index seen.") + ratio,
    }),
  );
}

$("rec-models").addEventListener("change", () => {
  if (state.file) reconstruct();
});

// --- status --------------------------------------------------------------------------------
function parseMetrics(text) {
  const images = {};
  let queue = 0;
  for (const line of text.split("\n")) {
    const m = /^(\w+)(?:\{([^}]*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    const value = Number(m[3]);
    if (m[1] === "softvq_images_processed_total") {
      images[labels.model] = (images[labels.model] || 0) + value;
    } else if (m[1] === "softvq_queue_depth") {
      queue += value;
    }
  }
  return { images, queue };
}

async function pollMetrics() {
  try {
    const response = await api("/metrics", { accept: "text/plain" });
    const m = parseMetrics(await response.text());
    const now = performance.now();
    const prev = state.prevMetrics;
    const total = Object.values(m.images).reduce((a, b) => a + b, 0);
    let rate = null;
    if (prev) {
      const dt = (now - prev.t) / 1000;
      rate = 0;
      for (const [model, count] of Object.entries(m.images)) {
        const before = prev.images[model] ?? 0;
        const r = count >= before ? (count - before) / dt : count / dt; // a restart resets
        state.rates[model] = r;
        rate += r;
      }
    }
    state.prevMetrics = { t: now, images: m.images };
    $("stat-rate").textContent = rate === null ? "measuring…" : rate.toFixed(1);
    $("stat-queue").textContent = fmtInt(m.queue);
    $("stat-total").textContent = fmtInt(total);
    $("stat-time").textContent = new Date().toLocaleTimeString();
    clearError($("status-error"));
    renderModelsTable();
    const nt = tokenizers().length;
    const ng = generators().length;
    $("live").textContent =
      (state.models ? `${nt} tokenizer${nt === 1 ? "" : "s"}, ${ng} generator${ng === 1 ? "" : "s"} · ` : "") +
      `${rate === null ? "–" : rate.toFixed(1)} images/s · queue ${fmtInt(m.queue)}`;
  } catch (e) {
    showError($("status-error"), e);
    $("live").textContent = "Status unavailable";
  }
}

function renderModelsTable() {
  const rows = [
    ...tokenizers().map((t) => ["tokenizer", t]),
    ...generators().map((g) => ["generator", g]),
  ].map(([kind, m]) => {
    const rate = state.rates[m.name];
    return el(
      "tr",
      {},
      el("th", { scope: "row", text: m.name }),
      el("td", { text: kind }),
      el("td", { text: `${m.image_size} px` }),
      el("td", { text: `${m.num_tokens} × ${m.token_dim}` }),
      el("td", { text: m.backend ?? "–" }),
      el("td", { text: m.device ?? "–" }),
      el("td", { text: m.dtype ?? "–" }),
      el("td", { text: String(m.workers ?? "–") }),
      el("td", { text: rate === undefined ? "–" : rate.toFixed(1) }),
    );
  });
  $("models-body").replaceChildren(...rows);
}

$("status-refresh").addEventListener("click", async () => {
  await loadModels();
  await pollMetrics();
});

// --- start ---------------------------------------------------------------------------------
if (state.key) {
  $("key-panel").hidden = false;
  $("key-why").textContent = "Using the key stored in this tab.";
}
refreshCurl();
await loadModels();
refreshCurl();
await pollMetrics();
setInterval(() => document.hidden || pollMetrics(), METRICS_EVERY_MS);
setInterval(() => document.hidden || loadModels(), MODELS_EVERY_MS);
document.body.dataset.ready = "true"; // for tests: the first /models and /metrics are done
