// The LMD studio: a page on top of the public HTTP API only (docs/service.md), no build step.
// Plan a prompt (POST /plan), edit the layout, render it into a session (POST /generate with
// layout + session_id), follow the job (fetch-based server-sent events, polling as a fallback),
// show previews, the image, masks and report, refine (POST /sessions/{id}/instruct), compare turns.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "lmd.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const COLORS = ["#2456c7", "#c7362f", "#1f8a4c", "#b86e00", "#7a3fc2", "#0f7f8c", "#c2367a", "#5c6b00"];
const STAGES = {
  queued: "Waiting in the queue", planning: "Stage 1: the LLM plans the layout", waiting: "Planned; waiting for a render worker",
  loading: "A render worker is loading the model", requeued: "Its worker was lost; queued again",
  per_box: "Stage 2, per-box pass: each object alone in its box", masks: "Stage 2: masks of the objects",
  compose: "Stage 2: the objects composed by their masks",
  final: "Stage 2, final pass: the composed scene", sd: "Plain Stable Diffusion pass",
};
const NUDGE = 0.01, MIN_SIDE = 0.02;

const state = {
  limits: null,
  key: localStorage.getItem(KEY_STORAGE) || "",
  transport: new URLSearchParams(location.search).get("transport") === "poll" ? "poll" : "sse",
  layout: null, undo: [], redo: [], selected: null,
  sessionId: null, turns: [], shownJobId: null,
  running: null, watch: null, previewsSeen: 0,
  blobs: new Map(),  // url -> object URL (images fetched with the API key)
  report: null,
};
window.studio = state; // for the console: the page's whole state

// ---------------------------------------------------------------- the API ---------------------
class ApiError extends Error {
  constructor(status, message, detail, retryAfter) { super(message); this.status = status; this.detail = detail; this.retryAfter = retryAfter; }
}

function authHeaders() { return state.key ? { Authorization: `Bearer ${state.key}` } : {}; }

function describe(status, detail, retryAfter) {
  const text = typeof detail === "string" ? detail : "";
  const wait = retryAfter ? ` Try again in ${retryAfter} s.` : "";
  switch (status) {
    case 401: return "This service needs a valid API key. Enter it (button at the top right) and try again.";
    case 404: return `Not found: ${text || "the job or session expired or belongs to another key"}.`;
    case 409: return `Not now: ${text}`;
    case 413: return "The request is too large.";
    case 422: return "The request was refused:\n" + (Array.isArray(detail) ? detail.map((d) => `• ${fieldOf(d) || "request"}: ${d.msg}`).join("\n") : text);
    case 429: return `The service is busy (too many jobs queued).${wait || " Try again shortly."}`;
    case 503: return `The service is recovering and cannot take requests right now (${text || "unavailable"}).${wait}`;
    default: return `The service answered ${status}${text ? `: ${text}` : ""}.`;
  }
}

function fieldOf(d) { return Array.isArray(d.loc) ? d.loc.filter((p) => p !== "body").join(".") : ""; }

async function api(method, path, body) {
  const headers = authHeaders();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(0, `The service cannot be reached (${err.message}). Is lmd serve running?`);
  }
  if (res.ok) return res;
  let detail = null;
  try { detail = (await res.json()).detail; } catch { /* not JSON */ }
  const retryAfter = res.headers.get("Retry-After");
  if (res.status === 401) askKey("The service refused the request: it needs a valid API key.");
  throw new ApiError(res.status, describe(res.status, detail, retryAfter), detail, retryAfter);
}
const getJSON = async (path) => (await api("GET", path)).json();
const postJSON = async (path, body) => (await api("POST", path, body)).json();

async function blobURL(path) {
  if (state.blobs.has(path)) return state.blobs.get(path);
  const url = URL.createObjectURL(await (await api("GET", path)).blob());
  state.blobs.set(path, url);
  return url;
}

// Server-sent events read with fetch, so the API key travels in a header (EventSource cannot send one).
async function* events(path, signal) {
  const res = await fetch(path, { headers: { ...authHeaders(), Accept: "text/event-stream" }, signal });
  if (!res.ok || !res.body) throw new ApiError(res.status, describe(res.status, null, null));
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = val;
        else if (field === "data") data.push(val);
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Follow a job to its end; onView(view) on every change. Events first, polling when they fail.
async function watchJob(jobId, onView) {
  const controller = new AbortController();
  state.watch = controller;
  let last = null;
  if (state.transport === "sse") {
    try {
      for await (const ev of events(`/jobs/${jobId}/events`, controller.signal)) {
        if (ev.event === "state") { last = JSON.parse(ev.data); onView(last); }
        else if (ev.event === "end" || ev.event === "gone" || ev.event === "unavailable") break;
      }
      if (last && TERMINAL.has(last.state)) return last;
    } catch (err) {
      if (err.name === "AbortError") throw err;
      if (err instanceof ApiError && [401, 404].includes(err.status)) throw err;
      // anything else (a proxy that buffers, a dropped stream): poll instead
    }
  }
  for (;;) {
    if (controller.signal.aborted) throw new DOMException("stopped", "AbortError");
    try {
      const view = await getJSON(`/jobs/${jobId}`);
      if (!last || JSON.stringify(view.progress) !== JSON.stringify(last.progress) || view.state !== last.state) onView(view);
      last = view;
      if (TERMINAL.has(view.state)) return view;
      await sleep(400);
    } catch (err) {
      if (!(err instanceof ApiError) || ![0, 503].includes(err.status)) throw err;
      showAlert(err.message);
      await sleep(1000 * (Number(err.retryAfter) || 2));
    }
  }
}

// ---------------------------------------------------------------- messages --------------------
function showAlert(text, kind = "error") {
  const el = $("alert");
  el.textContent = text;
  el.className = kind === "info" ? "info" : "";
  el.hidden = !text;
}

function clearFieldErrors() {
  document.querySelectorAll(".field-error").forEach((el) => { el.textContent = ""; });
  document.querySelectorAll("[aria-invalid=true]").forEach((el) => el.removeAttribute("aria-invalid"));
}

function showError(err) {
  if (err && err.name === "AbortError") return;
  if (err instanceof ApiError && err.status === 422 && Array.isArray(err.detail)) {
    for (const d of err.detail) {
      const field = Array.isArray(d.loc) ? d.loc[1] : null;
      const slot = field && $(`err-${field}`);
      if (slot) {
        slot.textContent = d.msg;
        const input = $(field);
        if (input) input.setAttribute("aria-invalid", "true");
      }
    }
  }
  showAlert(err instanceof Error ? err.message : String(err));
}

function askKey(reason) {
  $("key-reason").textContent = reason || "This service needs an API key. It is kept in this browser only.";
  $("key-input").value = state.key;
  $("key-button").hidden = false;
  if (!$("key-dialog").open) $("key-dialog").showModal();
}

// ---------------------------------------------------------------- the form --------------------
async function loadLimits() {
  for (;;) {
    try {
      state.limits = await getJSON("/limits");
      break;
    } catch (err) {
      showAlert(`${err.message} Retrying…`);
      await sleep(2000);
    }
  }
  const L = state.limits;
  showAlert("");
  $("prompt").maxLength = L.max_prompt_chars;
  $("hint-prompt").textContent = `Up to ${L.max_prompt_chars} characters.`;
  for (const id of ["width", "height"]) Object.assign($(id), { min: L.min_size, max: L.max_size, step: 8 });
  $("hint-size").textContent = `Width and height: ${L.min_size}–${L.max_size} px, multiples of 8.`;
  $("seed").max = L.max_seed;
  $("hint-seed").textContent = `0–${L.max_seed}; empty: the session's seed (a new session draws one).`;
  $("steps").max = L.max_steps;
  $("steps").value = L.default_steps;
  $("hint-steps").textContent = `1–${L.max_steps}; the reference uses ${L.default_steps}.`;
  $("instruction").maxLength = L.max_instruction_chars;
  for (const [id, values, chosen] of [["preset", L.presets, L.preset], ["variant", L.variants, L.variant]]) {
    $(id).replaceChildren(...values.map((v) => new Option(v, v, v === chosen, v === chosen)));
  }
  $("key-button").hidden = !L.auth;
  if (L.auth && !state.key) askKey();
}

function numberField(id) {
  const raw = $(id).value.trim();
  return raw === "" ? null : Number(raw);
}

function renderSettings() {
  const body = {
    width: numberField("width"), height: numberField("height"), steps: numberField("steps"),
    preset: $("preset").value || null, variant: $("variant").value || null,
  };
  const seed = numberField("seed");
  if (seed !== null) body.seed = seed;
  return body;
}

function size() {
  const w = numberField("width"), h = numberField("height");
  return { w: w > 0 ? w : 512, h: h > 0 ? h : 512 };
}

// ---------------------------------------------------------------- the layout editor -----------
const snapshot = () => JSON.stringify(state.layout);
const round3 = (v) => Math.round(v * 1000) / 1000;
const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

function colorOf(id) {
  let h = 0;
  for (const ch of id) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  return COLORS[h % COLORS.length];
}

function setLayout(layout, { keepHistory = false } = {}) {
  if (keepHistory && state.layout) commit(snapshot());
  else if (!keepHistory) { state.undo = []; state.redo = []; }
  state.layout = JSON.parse(JSON.stringify(layout));
  state.selected = null;
  renderEditor();
}

function commit(before) {
  if (before === snapshot()) return;
  state.undo.push(before);
  state.redo = [];
  updateButtons();
}

function mutate(fn) {
  const before = snapshot();
  fn();
  commit(before);
  renderEditor();
}

function restore(from, to) {
  if (!from.length) return;
  to.push(snapshot());
  state.layout = JSON.parse(from.pop());
  if (state.selected && !findObject(state.selected)) state.selected = null;
  renderEditor();
  announce("Undone or redone.");
}

const findObject = (id) => state.layout && state.layout.objects.find((o) => o.id === id);

function newId(base = "object") {
  const taken = new Set(state.layout.objects.map((o) => o.id));
  for (let n = state.layout.objects.length + 1; ; n++) if (!taken.has(`${base}${n}`)) return `${base}${n}`;
}

function boxText(o) {
  const [x0, y0, x1, y1] = o.box.map((v) => Math.round(v * 100));
  return `${o.id}: ${o.phrase}; left ${x0}%, top ${y0}%, width ${x1 - x0}%, height ${y1 - y0}%`;
}

function announce(text) { $("status").textContent = text; } // read by screen readers, not shown

function placeBox(el, box) {
  const [x0, y0, x1, y1] = box;
  Object.assign(el.style, { left: `${x0 * 100}%`, top: `${y0 * 100}%`, width: `${(x1 - x0) * 100}%`, height: `${(y1 - y0) * 100}%` });
}

function renderEditor() {
  const editor = $("editor");
  const hadFocus = editor.contains(document.activeElement);
  const has = !!state.layout;
  editor.hidden = !has;
  $("editor-empty").hidden = has;
  for (const id of ["add-box", "background", "negative"]) $(id).disabled = !has;
  const { w, h } = size();
  editor.style.aspectRatio = `${w} / ${h}`;
  editor.replaceChildren();
  $("objects").replaceChildren();
  if (!has) { updateButtons(); return; }
  const L = state.layout;
  for (const o of L.objects) {
    const el = document.createElement("div");
    el.className = "box" + (o.id === state.selected ? " selected" : "");
    el.dataset.id = o.id;
    el.tabIndex = 0;
    el.setAttribute("role", "button");
    el.setAttribute("aria-roledescription", "box");
    el.setAttribute("aria-label", boxText(o));
    el.style.setProperty("--c", colorOf(o.id));
    placeBox(el, o.box);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = `${o.id}: ${o.phrase}`;
    const handle = document.createElement("div");
    handle.className = "handle";
    handle.setAttribute("aria-hidden", "true");
    el.append(label, handle);
    el.addEventListener("keydown", onBoxKey);
    el.addEventListener("focus", () => select(o.id, false));
    editor.append(el);

    const li = document.createElement("li");
    li.innerHTML = `<div class="row"><span class="swatch"></span><label></label></div><div class="row"><input type="text"><button type="button">Remove</button></div>`;
    li.querySelector(".swatch").style.setProperty("--c", colorOf(o.id));
    const input = li.querySelector("input");
    input.id = `phrase-${o.id}`;
    input.value = o.phrase;
    input.maxLength = 200;
    const lab = li.querySelector("label");
    lab.htmlFor = input.id;
    lab.textContent = `Phrase of ${o.id}`;
    input.addEventListener("change", () => {
      const text = input.value.trim();
      if (!text) { input.value = o.phrase; return; }
      mutate(() => { findObject(o.id).phrase = text; });
    });
    const remove = li.querySelector("button");
    remove.setAttribute("aria-label", `Remove ${o.id}`);
    remove.addEventListener("click", () => removeObject(o.id));
    $("objects").append(li);
  }
  $("background").value = L.background || "";
  $("negative").value = L.negative || "";
  $("warnings-wrap").hidden = !(L.warnings && L.warnings.length);
  // a warning is {tag, text} (a plain "tag: text" line in layouts saved before warnings had fields)
  const warningLine = (w) => (typeof w === "string" ? w : `${w.tag}: ${w.text}`);
  $("warnings").replaceChildren(...(L.warnings || []).map((w) => Object.assign(document.createElement("li"), { textContent: warningLine(w) })));
  if (hadFocus && state.selected) {
    const el = editor.querySelector(`.box[data-id="${CSS.escape(state.selected)}"]`);
    if (el) el.focus();
  }
  updateButtons();
}

function select(id, rerender = true) {
  if (state.selected === id) return;
  state.selected = id;
  document.querySelectorAll("#editor .box").forEach((el) => el.classList.toggle("selected", el.dataset.id === id));
  if (rerender) renderEditor();
}

function removeObject(id) {
  const index = state.layout.objects.findIndex((o) => o.id === id);
  if (index < 0) return;
  mutate(() => { state.layout.objects.splice(index, 1); });
  const next = state.layout.objects[Math.min(index, state.layout.objects.length - 1)];
  state.selected = next ? next.id : null;
  const el = next && $("editor").querySelector(`.box[data-id="${CSS.escape(next.id)}"]`);
  (el || $("add-box")).focus();
  announce(`Removed ${id}.`);
}

function addObject(box, phrase = "an object") {
  const id = newId();
  mutate(() => { state.layout.objects.push({ id, phrase, box: box.map(round3) }); });
  return id;
}

function moveBox(box, dx, dy) {
  const [x0, y0, x1, y1] = box;
  const mx = clamp(dx, -x0, 1 - x1), my = clamp(dy, -y0, 1 - y1);
  return [x0 + mx, y0 + my, x1 + mx, y1 + my].map(round3);
}

function resizeBox(box, dx, dy) {
  const [x0, y0, x1, y1] = box;
  return [x0, y0, clamp(x1 + dx, x0 + MIN_SIDE, 1), clamp(y1 + dy, y0 + MIN_SIDE, 1)].map(round3);
}

function onBoxKey(e) {
  const id = e.currentTarget.dataset.id;
  const o = findObject(id);
  if (!o) return;
  const arrows = { ArrowLeft: [-NUDGE, 0], ArrowRight: [NUDGE, 0], ArrowUp: [0, -NUDGE], ArrowDown: [0, NUDGE] };
  if (arrows[e.key]) {
    e.preventDefault();
    const [dx, dy] = arrows[e.key];
    state.selected = id;
    mutate(() => { o.box = e.shiftKey ? resizeBox(o.box, dx, dy) : moveBox(o.box, dx, dy); });
    announce(boxText(o));
  } else if (e.key === "Delete" || e.key === "Backspace") {
    e.preventDefault();
    removeObject(id);
  } else if (e.key === "Enter") {
    e.preventDefault();
    $(`phrase-${id}`).focus();
  }
}

function setupEditor() {
  const editor = $("editor");
  let drag = null;
  const point = (e) => {
    const r = editor.getBoundingClientRect();
    return [clamp((e.clientX - r.left) / r.width, 0, 1), clamp((e.clientY - r.top) / r.height, 0, 1)];
  };
  editor.addEventListener("pointerdown", (e) => {
    if (!state.layout || e.button !== 0) return;
    const boxEl = e.target.closest(".box");
    const [px, py] = point(e);
    drag = { before: snapshot(), start: [px, py], moved: false };
    if (boxEl) {
      const o = findObject(boxEl.dataset.id);
      Object.assign(drag, { mode: e.target.classList.contains("handle") ? "resize" : "move", id: o.id, box: o.box.slice(), el: boxEl });
      select(o.id, false);
      boxEl.focus({ preventScroll: true });
    } else {
      const el = document.createElement("div");
      el.className = "box drawing";
      editor.append(el);
      Object.assign(drag, { mode: "draw", el, box: [px, py, px, py] });
    }
    editor.setPointerCapture(e.pointerId);
    e.preventDefault();
  });
  editor.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const [px, py] = point(e);
    const dx = px - drag.start[0], dy = py - drag.start[1];
    drag.moved = drag.moved || Math.abs(dx) + Math.abs(dy) > 0.003;
    if (drag.mode === "draw") {
      drag.box = [Math.min(px, drag.start[0]), Math.min(py, drag.start[1]), Math.max(px, drag.start[0]), Math.max(py, drag.start[1])];
      placeBox(drag.el, drag.box);
    } else {
      const o = findObject(drag.id);
      o.box = drag.mode === "move" ? moveBox(drag.box, dx, dy) : resizeBox(drag.box, dx, dy);
      placeBox(drag.el, o.box);
    }
  });
  const end = () => {
    if (!drag) return;
    const d = drag;
    drag = null;
    if (d.mode === "draw") {
      d.el.remove();
      const [x0, y0, x1, y1] = d.box;
      if (x1 - x0 >= MIN_SIDE && y1 - y0 >= MIN_SIDE) {
        const id = addObject(d.box);
        state.selected = id;
        renderEditor();
        const input = $(`phrase-${id}`);
        input.focus();
        input.select();
      }
      return;
    }
    commit(d.before);
    renderEditor();
    const el = editor.querySelector(`.box[data-id="${CSS.escape(d.id)}"]`);
    if (el) el.focus({ preventScroll: true });
  };
  editor.addEventListener("pointerup", end);
  editor.addEventListener("pointercancel", end);

  $("add-box").addEventListener("click", () => {
    const id = addObject([0.35, 0.35, 0.65, 0.65]);
    state.selected = id;
    renderEditor();
    editor.querySelector(`.box[data-id="${CSS.escape(id)}"]`).focus();
  });
  $("undo").addEventListener("click", () => restore(state.undo, state.redo));
  $("redo").addEventListener("click", () => restore(state.redo, state.undo));
  for (const field of ["background", "negative"]) {
    $(field).addEventListener("change", () => mutate(() => { state.layout[field] = $(field).value.trim(); }));
  }
  document.addEventListener("keydown", (e) => {
    if (!(e.ctrlKey || e.metaKey) || !state.layout) return;
    const typing = e.target.matches("input[type=text], textarea");
    const key = e.key.toLowerCase();
    if (typing) return; // the field's own undo
    if (key === "z" && !e.shiftKey) { e.preventDefault(); restore(state.undo, state.redo); }
    else if ((key === "z" && e.shiftKey) || key === "y") { e.preventDefault(); restore(state.redo, state.undo); }
  });
  for (const id of ["width", "height"]) $(id).addEventListener("input", renderEditor);
}

function updateButtons() {
  const busy = !!state.running;
  const hasObjects = !!(state.layout && state.layout.objects.length);
  $("plan-button").disabled = busy;
  $("render-button").disabled = busy || !hasObjects;
  $("cancel-button").disabled = !busy;
  $("undo").disabled = !state.undo.length;
  $("redo").disabled = !state.redo.length;
  const last = state.turns[state.turns.length - 1];
  $("instruct-button").disabled = busy || !last || last.state !== "succeeded";
  $("compare-button").disabled = document.querySelectorAll("#timeline input:checked").length !== 2;
}

// ---------------------------------------------------------------- jobs ------------------------
function showProgress(view) {
  const p = view.progress || {};
  const label = STAGES[p.stage] || p.stage || view.state;
  const steps = p.total ? ` — step ${p.step} of ${p.total}` : "";
  $("progress-wrap").hidden = false;
  $("progress-text").textContent = `${label}${steps}`;
  $("progress").value = p.total ? p.step / p.total : 0;
  if (p.preview && p.preview.count > state.previewsSeen && view.preview_url) {
    state.previewsSeen = p.preview.count;
    loadPreview(view.preview_url, p.preview);
  }
}

async function loadPreview(path, p) {
  try {
    const blob = await (await api("GET", path)).blob();
    const img = $("preview");
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(blob);
    img.dataset.count = String(p.count);
    $("preview-figure").hidden = false;
    $("preview-caption").textContent = `Preview (latents → RGB, no VAE): ${STAGES[p.stage] || p.stage}, step ${p.step} of ${p.total}`;
  } catch (err) {
    console.warn("preview not shown:", err.message); // a preview is a nicety: never an error on the page
  }
}

async function run(kind, start) {
  clearFieldErrors();
  showAlert("");
  let accepted;
  try {
    state.running = "starting";
    updateButtons();
    accepted = await start();
  } catch (err) {
    state.running = null;
    updateButtons();
    showError(err);
    return null;
  }
  state.running = accepted.job_id;
  state.previewsSeen = 0;
  $("preview-figure").hidden = true;
  updateButtons();
  try {
    const view = await watchJob(accepted.job_id, (v) => {
      showProgress(v);
      if (kind === "instruct" && v.layout && !state.instructLayoutShown) {
        state.instructLayoutShown = true;
        setLayout(v.layout, { keepHistory: true });
      }
    });
    state.instructLayoutShown = false;
    if (view.state === "failed") {
      const e = view.error || {};
      showAlert(`The job failed (${e.code}): ${e.message}`);
    } else if (view.state === "canceled") {
      showAlert("Canceled.", "info");
      $("progress-text").textContent = "Canceled.";
    } else {
      $("progress-text").textContent = kind === "plan" ? "Layout planned." : "Done.";
      $("progress").value = 1;
    }
    return view;
  } catch (err) {
    showError(err);
    return null;
  } finally {
    state.running = null;
    state.instructLayoutShown = false;
    updateButtons();
  }
}

async function plan(e) {
  e.preventDefault();
  // A new prompt starts a new session: its first turn is this plan, the renders follow it.
  const body = { ...renderSettings(), prompt: $("prompt").value };
  const view = await run("plan", async () => {
    const accepted = await postJSON("/plan", body);
    state.sessionId = accepted.session_id;
    $("compare").hidden = true;
    return accepted;
  });
  await refreshSession();
  if (view && view.state === "succeeded" && view.layout) {
    setLayout(view.layout);
    announce(`Planned ${view.layout.objects.length} objects.`);
    state.shownJobId = view.job_id;
    markCurrentTurn();
    const first = $("editor").querySelector(".box");
    if (first) first.focus({ preventScroll: true });
  }
}

async function render() {
  const layout = { ...state.layout, objects: state.layout.objects.map((o) => ({ id: o.id, phrase: o.phrase, box: o.box })) };
  const body = { ...renderSettings(), layout, previews: true };
  const prompt = $("prompt").value.trim();
  if (prompt) body.prompt = prompt;
  if (state.sessionId) body.session_id = state.sessionId;
  const view = await run("render", async () => {
    const accepted = await postJSON("/generate", body);
    state.sessionId = accepted.session_id;
    return accepted;
  });
  await afterTurn(view);
}

async function instruct(e) {
  e.preventDefault();
  const instruction = $("instruction").value;
  const view = await run("instruct", () => postJSON(`/sessions/${state.sessionId}/instruct`, { instruction, previews: true }));
  if (view && view.state === "succeeded") $("instruction").value = "";
  await afterTurn(view);
}

async function afterTurn(view) {
  await refreshSession();
  if (view && view.state === "succeeded") await showJob(view);
}

async function cancel() {
  if (!state.running || state.running === "starting") return;
  try {
    await postJSON(`/jobs/${state.running}/cancel`);
    $("progress-text").textContent = "Canceling…";
  } catch (err) { showError(err); }
}

// ---------------------------------------------------------------- results ---------------------
async function showJob(view) {
  state.shownJobId = view.job_id;
  const result = view.result;
  if (!result) { $("result").hidden = true; return; }
  const url = await blobURL(result.image_url);
  $("result-image").src = url;
  $("result").hidden = false;
  $("result-image").alt = `Generated image of turn ${view.turn}: ${view.prompt}`;
  $("download").href = url;
  $("download").download = `lmd-turn${view.turn}-seed${view.seed}.png`;
  $("mask-image").hidden = true;
  $("mask-info").textContent = `Turn ${view.turn}, seed ${view.seed}, ${view.width}×${view.height}, ${view.variant}/${view.preset}. Hover or focus a box to see its mask.`;
  state.report = null;
  try { state.report = await getJSON(result.report_url); } catch (err) { showError(err); }
  drawOverlay(view);
  drawReport(state.report);
  markCurrentTurn();
}

function drawOverlay(view) {
  const overlay = $("result-overlay");
  overlay.replaceChildren();
  overlay.classList.toggle("hidden", !$("overlay-toggle").checked);
  for (const o of (view.layout && view.layout.objects) || []) {
    const el = document.createElement("div");
    el.className = "box";
    el.tabIndex = 0;
    el.dataset.id = o.id;
    el.style.setProperty("--c", colorOf(o.id));
    el.setAttribute("aria-label", `${o.id}: ${o.phrase}. Show its mask`);
    placeBox(el, o.box);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = `${o.id}: ${o.phrase}`;
    el.append(label);
    const show = () => showMask(view, o);
    el.addEventListener("mouseenter", show);
    el.addEventListener("focus", show);
    el.addEventListener("mouseleave", hideMask);
    el.addEventListener("blur", hideMask);
    overlay.append(el);
  }
}

async function showMask(view, o) {
  const url = view.result && view.result.masks && view.result.masks[o.id];
  const entry = state.report && state.report.objects.find((r) => r.id === o.id);
  const source = entry ? entry.mask_source || "none" : "unknown";
  const iou = entry && entry.mask_box_iou != null ? `, mask/box IoU ${entry.mask_box_iou.toFixed(2)}` : "";
  $("mask-info").textContent = `${o.id} (“${o.phrase}”): mask from ${source}${iou}${entry && entry.mask_detail ? ` — ${entry.mask_detail}` : ""}`;
  if (!url) return;
  try {
    $("mask-image").src = await blobURL(url);
    $("mask-image").hidden = false;
  } catch (err) { showError(err); }
}

function hideMask() { $("mask-image").hidden = true; }

const fmt = (v, digits = 2) => (v == null ? "–" : Number(v).toFixed(digits));

function drawReport(report) {
  const objects = $("report-objects"), stages = $("report-stages");
  objects.querySelectorAll("tr").forEach((r) => r.remove());
  stages.querySelectorAll("tr").forEach((r) => r.remove());
  if (!report) return;
  const row = (table, cells, header = false) => {
    const tr = table.insertRow();
    for (const [text, num] of cells) {
      const cell = document.createElement(header ? "th" : "td");
      if (header) cell.scope = "col";
      cell.textContent = text;
      if (num) cell.className = "num";
      tr.append(cell);
    }
  };
  row(objects, [["object"], ["mask"], ["mask/box IoU"], ["per-box energy start → end"], ["final energy start → end"]], true);
  for (const o of report.objects) {
    row(objects, [[`${o.id}: ${o.phrase}`], [o.mask_source || "–"], [fmt(o.mask_box_iou), true],
      [`${fmt(o.per_box_energy.start)} → ${fmt(o.per_box_energy.end)}`, true], [`${fmt(o.final_energy.start)} → ${fmt(o.final_energy.end)}`, true]]);
  }
  row(stages, [["stage"], ["steps"], ["seconds"], ["UNet forwards"], ["UNet backwards"]], true);
  for (const s of report.stages) row(stages, [[s.name], [String(s.steps), true], [fmt(s.wall_s), true], [String(s.unet.forward), true], [String(s.unet.backward), true]]);
  row(stages, [["total"], [String(report.steps), true], [fmt(report.wall_s), true], [String(report.unet_total.forward), true], [String(report.unet_total.backward), true]]);
}

// ---------------------------------------------------------------- session timeline ------------
async function refreshSession() {
  if (!state.sessionId) return;
  try {
    const session = await getJSON(`/sessions/${state.sessionId}`);
    state.turns = session.turns;
  } catch (err) { showError(err); return; }
  const list = $("timeline");
  list.replaceChildren();
  for (const t of state.turns) {
    const li = document.createElement("li");
    li.className = "turn";
    li.dataset.jobId = t.job_id;
    const button = document.createElement("button");
    button.type = "button";
    button.setAttribute("aria-label", `Show turn ${t.turn}: ${t.text} (${t.state || "expired"})`);
    const rendered = t.state === "succeeded" && t.kind !== "plan";
    const thumb = document.createElement(rendered ? "img" : "div");
    if (rendered) {
      thumb.alt = "";
      blobURL(`/jobs/${t.job_id}/image`).then((u) => { thumb.src = u; }).catch(() => {});
    } else if (t.state === "succeeded" && t.layout) {  // a plan: its layout in miniature
      thumb.className = "thumb-layout";
      for (const o of t.layout.objects) {
        const b = document.createElement("span");
        b.style.setProperty("--c", colorOf(o.id));
        placeBox(b, o.box);
        thumb.append(b);
      }
    } else {
      thumb.className = "thumb-empty";
      thumb.textContent = t.state || "expired";
    }
    const text = document.createElement("span");
    text.className = `text state-${t.state}`;
    text.textContent = `${t.turn}. ${t.text}`;
    button.append(thumb, text);
    button.addEventListener("click", () => openTurn(t));
    const check = document.createElement("label");
    check.className = "check";
    check.innerHTML = `<input type="checkbox"> compare`;
    check.querySelector("input").setAttribute("aria-label", `Compare turn ${t.turn}`);
    check.querySelector("input").disabled = !rendered;
    check.querySelector("input").addEventListener("change", updateButtons);
    li.append(button, check);
    list.append(li);
  }
  markCurrentTurn();
  updateButtons();
}

function markCurrentTurn() {
  document.querySelectorAll("#timeline .turn").forEach((li) => li.classList.toggle("current", li.dataset.jobId === state.shownJobId));
}

async function openTurn(t) {
  try {
    const view = await getJSON(`/jobs/${t.job_id}`);
    if (view.layout) setLayout(view.layout, { keepHistory: true });
    for (const [id, value] of [["width", view.width], ["height", view.height]]) $(id).value = value;
    renderEditor();
    if (view.state === "succeeded") await showJob(view);
    else {
      state.shownJobId = view.job_id;
      markCurrentTurn();
      if (view.error) showAlert(`Turn ${view.turn} failed (${view.error.code}): ${view.error.message}`);
    }
  } catch (err) { showError(err); }
}

async function compare() {
  const chosen = [...document.querySelectorAll("#timeline .turn")].filter((li) => li.querySelector("input:checked"));
  if (chosen.length !== 2) return;
  try {
    const [a, b] = await Promise.all(chosen.map((li) => blobURL(`/jobs/${li.dataset.jobId}/image`)));
    const [ta, tb] = chosen.map((li) => state.turns.find((t) => t.job_id === li.dataset.jobId));
    $("compare-a").src = $("swipe-a").src = a;
    $("compare-b").src = $("swipe-b").src = b;
    $("compare-a-caption").textContent = `Turn ${ta.turn}: ${ta.text}`;
    $("compare-b-caption").textContent = `Turn ${tb.turn}: ${tb.text}`;
    $("compare").hidden = false;
    showCompareMode();
  } catch (err) { showError(err); }
}

function showCompareMode() {
  const slider = $("compare-slider").checked;
  $("compare-side").hidden = slider;
  $("compare-swipe").hidden = !slider;
}

// ---------------------------------------------------------------- PNGs dropped on the page ----
// Images written by LMD carry their parameters in iTXt chunks named lmd:<field> (docs/studio.md).
// --- PNG text bounds: the rules of grounded_sd/image_parameters.py read_text_chunks (lmd info) ---
// Only uncompressed tEXt/iTXt chunks named lmd:*, each <= 256 KiB, all <= 1 MiB, in <= 10,000
// chunks; JSON nested <= 16 deep; pixels never decoded. The page reads files up to 64 MiB whole.
const PNG_LIMITS = { file: 64 * 1024 * 1024, chunk: 256 * 1024, total: 1024 * 1024, chunks: 10000, depth: 16 };

async function pngParameters(file) {
  if (file.size > PNG_LIMITS.file) throw new Error("it is larger than any PNG LMD writes (64 MiB)");
  const bytes = new Uint8Array(await file.arrayBuffer());
  const view = new DataView(bytes.buffer);
  const decoder = new TextDecoder();
  if (bytes.length < 8 || bytes[1] !== 0x50 || bytes[2] !== 0x4e || bytes[3] !== 0x47) throw new Error("not a PNG file");
  const fields = {};
  let total = 0;
  for (let at = 8, n = 0; ; n++) {
    if (n >= PNG_LIMITS.chunks) throw new Error(`it has more than ${PNG_LIMITS.chunks} chunks`);
    if (at + 8 > bytes.length) throw new Error("the PNG is cut short");
    const length = view.getUint32(at), type = decoder.decode(bytes.subarray(at + 4, at + 8));
    if (type === "IEND") break;
    const data = bytes.subarray(at + 8, at + 8 + length);
    const zero = data.indexOf(0);
    const keyword = decoder.decode(data.subarray(0, zero < 0 ? Math.min(80, data.length) : zero));
    if ((type === "iTXt" || type === "tEXt") && keyword.startsWith("lmd:")) {
      total += length;
      if (length > PNG_LIMITS.chunk || total > PNG_LIMITS.total) throw new Error("a text chunk is larger than LMD ever writes");
      if (data.length < length) throw new Error("the PNG is cut short");
      let text;
      if (type === "tEXt") text = new TextDecoder("latin1").decode(data.subarray(zero + 1));
      else if (data[zero + 1] === 0) {  // uncompressed iTXt: skip language tag and translated keyword
        let p = data.indexOf(0, zero + 3);
        p = data.indexOf(0, p + 1);
        text = decoder.decode(data.subarray(p + 1));
      }
      if (text !== undefined) fields[keyword.slice(4)] = text;
    }
    at += 12 + length;
  }
  if (fields.layout && jsonDepth(fields.layout) > PNG_LIMITS.depth) throw new Error("its layout is nested too deeply");
  return fields;
}

function jsonDepth(text) {
  let depth = 0, deepest = 0, inString = false, escaped = false;
  for (const c of text) {
    if (inString) { if (escaped) escaped = false; else if (c === "\\") escaped = true; else if (c === '"') inString = false; }
    else if (c === '"') inString = true;
    else if (c === "[" || c === "{") deepest = Math.max(deepest, ++depth);
    else if (c === "]" || c === "}") depth--;
  }
  return deepest;
}
// --- end of PNG text bounds ---

async function onDrop(e) {
  e.preventDefault();
  const file = e.dataTransfer && e.dataTransfer.files[0];
  if (!file) return;
  try {
    const p = await pngParameters(file);
    if (!p.layout) { showAlert(`${file.name} carries no LMD parameters.`); return; }
    $("prompt").value = p.prompt || "";
    for (const id of ["seed", "steps", "width", "height"]) if (p[id]) $(id).value = p[id];
    for (const id of ["preset", "variant"]) if (p[id] && [...$(id).options].some((o) => o.value === p[id])) $(id).value = p[id];
    setLayout(JSON.parse(p.layout), { keepHistory: true });
    showAlert(`Restored the settings and layout of ${file.name}.`, "info");
  } catch (err) { showAlert(`${file.name} could not be read: ${err.message}`); }
}

// ---------------------------------------------------------------- wiring ----------------------
function setup() {
  $("prompt-form").addEventListener("submit", plan);
  $("render-button").addEventListener("click", render);
  $("cancel-button").addEventListener("click", cancel);
  $("instruct-form").addEventListener("submit", instruct);
  $("dice").addEventListener("click", () => {
    const max = state.limits ? state.limits.max_seed : 2 ** 32 - 1;
    $("seed").value = String(Math.floor(Math.random() * (max + 1)));
  });
  $("overlay-toggle").addEventListener("change", () => $("result-overlay").classList.toggle("hidden", !$("overlay-toggle").checked));
  $("compare-button").addEventListener("click", compare);
  $("compare-slider").addEventListener("change", showCompareMode);
  $("swipe-range").addEventListener("input", () => { $("swipe-clip").style.clipPath = `inset(0 0 0 ${$("swipe-range").value}%)`; });
  $("key-button").addEventListener("click", () => askKey());
  $("key-dialog").addEventListener("close", () => {
    if ($("key-dialog").returnValue !== "save") return;
    state.key = $("key-input").value.trim();
    if (state.key) localStorage.setItem(KEY_STORAGE, state.key);
    else localStorage.removeItem(KEY_STORAGE);
    state.blobs.clear();
    showAlert("API key saved in this browser.", "info");
  });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", onDrop);
  setupEditor();
  renderEditor();
  loadLimits();
}

setup();
