// Rendering and progress: the four ways to start a job (plan, generate, render, refine), following
// it, its previews, and the result (image, boxes, masks on hover, report, seed).
import { api, blobURL, getJSON, postJSON, watchJob } from "./api.js";
import { setAddress } from "./address.js";
import { boxElement, colorsOf, requestLayout, setLayout } from "./editor.js";
import { renderSettings, showSettings } from "./form.js";
import { refreshGallery } from "./gallery.js";
import { clearFieldErrors, showAlert, showError } from "./messages.js";
import { $, STAGES, announce, state, updateButtons } from "./state.js";
import { markCurrentTurn, refreshSession } from "./turns.js";

function setProgress(text, value = 0) {
  $("progress-wrap").hidden = false;
  $("progress-text").textContent = text;
  $("progress").value = value;
}

function hidePreview() {
  $("preview-figure").hidden = true;
  $("preview").removeAttribute("data-count");
}

export function showProgress(view) {
  const p = view.progress || {};
  const label = STAGES[p.stage] || p.stage || view.state;
  const steps = p.total ? ` — step ${p.step} of ${p.total}` : "";
  setProgress(`${label}${steps}${view.notice ? `. ${view.notice}` : ""}`, p.total ? p.step / p.total : 0);
  $("progress-text").classList.toggle("notice", !!view.notice);
  if (view.notice) showAlert(`This job cannot start: ${view.notice}.`, "info");
  if (p.preview && p.preview.count > state.previewsSeen && view.preview_url) {
    state.previewsSeen = p.preview.count;
    loadPreview(view.preview_url, p.preview);
  }
}

async function loadPreview(path, p) {
  try {
    const blob = await (await api("GET", path)).blob();
    if (!state.running) return;  // the job ended meanwhile: its preview is gone from the page
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

// What the progress line says once a job has ended: its real end, never a stage it left.
export function showEnd(view) {
  hidePreview();
  $("progress-text").classList.remove("notice");
  if (view.state === "failed") {
    const e = view.error || {};
    setProgress(`Failed (${e.code}): ${e.message}`);
    showAlert(`Turn ${view.turn} failed (${e.code}): ${e.message}`);
  } else if (view.state === "canceled") {
    setProgress("Canceled.");
    showAlert("Canceled.", "info");
  } else {
    setProgress(view.kind === "plan" ? "Layout planned." : "Done.", 1);
  }
}

// Start a job (start() returns POST's answer), put it in the address, follow it.
async function run(start, layoutShown = false) {
  clearFieldErrors();
  showAlert("");
  hidePreview();
  setProgress(`${STAGES.sending}…`);
  state.running = "starting";
  updateButtons();
  let accepted;
  try {
    accepted = await start();
  } catch (err) {
    state.running = null;
    updateButtons();
    $("progress-wrap").hidden = true;
    showError(err);
    return null;
  }
  state.sessionId = accepted.session_id;
  setAddress(accepted.session_id, accepted.turn);
  refreshSession();
  return follow(accepted.job_id, layoutShown);
}

// Follow a job to its end (a new one, or a running one the address names); then show the turn.
// layoutShown: the editor already holds the job's layout (a render of it, or a turn opened).
export async function follow(jobId, layoutShown = false) {
  state.running = jobId;
  state.previewsSeen = 0;
  state.shownJobId = jobId;
  updateButtons();
  let shownLayout = layoutShown;
  let view = null;
  try {
    view = await watchJob(jobId, (v) => {
      showProgress(v);
      if (v.layout && !shownLayout && v.kind !== "plan") {  // a generate or an instruct: its layout as soon as planned
        shownLayout = true;
        setLayout(v.layout, { keepHistory: true });
      }
    });
  } catch (err) {
    showError(err);
  } finally {
    if (state.running === jobId) state.running = null;
    updateButtons();
  }
  if (view === null) return null;  // stopped: another job is followed now
  refreshGallery();
  if (state.shownJobId !== jobId) {  // another turn was opened meanwhile: only the timeline follows this end
    refreshSession();
    return view;
  }
  showEnd(view);
  await refreshSession();
  if (view.state === "succeeded") {
    if (view.layout && !shownLayout) setLayout(view.layout, { keepHistory: view.kind !== "plan" });
    if (view.kind === "plan") {
      announce(`Planned ${view.layout.objects.length} objects.`);
      const first = $("editor").querySelector(".box");
      if (first) first.focus({ preventScroll: true });
    } else await showJob(view);
  }
  return view;
}

export async function plan(e) {
  e.preventDefault();
  // A new prompt starts a new session: its first turn is this plan, the renders follow it.
  $("result").hidden = true;
  await run(() => postJSON("/plan", { ...renderSettings(), prompt: $("prompt").value }));
}

// One click: plan and render in one job (POST /generate with the prompt); Ctrl+Enter.
export async function generate() {
  $("result").hidden = true;
  await run(() => postJSON("/generate", { ...renderSettings(), prompt: $("prompt").value, previews: true }));
}

export async function render() {
  const body = { ...renderSettings(), layout: requestLayout(), previews: true };
  const prompt = $("prompt").value.trim();
  if (prompt) body.prompt = prompt;
  if (state.sessionId) body.session_id = state.sessionId;
  await run(() => postJSON("/generate", body), true);
}

export async function instruct(e) {
  e.preventDefault();
  const instruction = $("instruction").value;
  const view = await run(() => postJSON(`/sessions/${state.sessionId}/instruct`, { instruction, previews: true }));
  if (view && view.state === "succeeded") $("instruction").value = "";
  if (view && view.layout && view.layout.warnings.some((w) => ["removed", "renamed", "kept"].includes(w.tag))) {
    showAlert("The revision changed more than the layout's objects you named: see the planner warnings.", "info");
  }
}

export async function cancel() {
  const jobId = state.running;
  if (!jobId || jobId === "starting") return;
  try {
    await postJSON(`/jobs/${jobId}/cancel`);
    if (state.running === jobId) setProgress("Canceling…", $("progress").value);  // not once it has ended
  } catch (err) { showError(err); }
}

// ---------------------------------------------------------------- the result ------------------
export async function showJob(view) {
  state.shownJobId = view.job_id;
  state.shownView = view;
  const result = view.result;
  if (!result) { $("result").hidden = true; markCurrentTurn(); return; }
  const url = await blobURL(result.image_url);
  $("result-image").src = url;
  $("result").hidden = false;
  $("result-image").alt = `Generated image of turn ${view.turn}: ${view.prompt}`;
  $("download").href = url;
  $("download").download = `lmd-turn${view.turn}-seed${view.seed}.png`;
  $("mask-image").hidden = true;
  $("result-seed").textContent = String(view.seed);
  $("result-info").textContent = `Turn ${view.turn}, ${view.width}×${view.height}, ${view.variant}/${view.preset}, ${view.steps ?? "default"} steps.`;
  $("mask-info").textContent = "Hover or focus a box to see its mask.";
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
  const colors = colorsOf(view.layout);
  for (const o of (view.layout && view.layout.objects) || []) {
    const el = boxElement(o, colors.get(o.id));
    el.setAttribute("aria-label", `${o.id}: ${o.phrase}. Show its mask`);
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
    for (const [text, num, title] of cells) {
      const cell = document.createElement(header ? "th" : "td");
      if (header) cell.scope = "col";
      cell.textContent = text;
      if (title) cell.title = title;
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

// Open a job in the page: its settings, layout, and its image or its progress.
export async function openJob(view) {
  showSettings(view);
  setLayout(view.layout || null, { keepHistory: !!state.layout && !!view.layout });
  state.shownJobId = view.job_id;
  markCurrentTurn();
  if (!["succeeded", "failed", "canceled"].includes(view.state)) {
    $("result").hidden = true;
    showProgress(view);
    await follow(view.job_id, !!view.layout);
    return;
  }
  showEnd(view);
  if (view.state === "succeeded" && view.kind !== "plan") await showJob(view);
  else $("result").hidden = true;
}

export function setupRender() {
  $("prompt-form").addEventListener("submit", plan);
  $("generate-button").addEventListener("click", generate);
  $("render-button").addEventListener("click", render);
  $("cancel-button").addEventListener("click", cancel);
  $("instruct-form").addEventListener("submit", instruct);
  $("prompt-form").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("generate-button").disabled) { e.preventDefault(); generate(); }
  });
  $("reuse-seed").addEventListener("click", () => {
    $("seed").value = $("result-seed").textContent;
    announce(`Seed ${$("seed").value} set for the next request.`);
  });
  $("overlay-toggle").addEventListener("change", () => $("result-overlay").classList.toggle("hidden", !$("overlay-toggle").checked));
}
