// The page's whole state, shared by the modules (window.studio in the console), and small helpers.

export const $ = (id) => document.getElementById(id);
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export const KEY_STORAGE = "lmd.apiKey";
// The API key lives in this tab's sessionStorage (gone when the tab closes); in localStorage
// only when the user ticked "Remember this key on this device" (messages.js keepKey).
const storedKey = () => sessionStorage.getItem(KEY_STORAGE) || localStorage.getItem(KEY_STORAGE) || "";
export const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

// What each progress.stage means, in words (docs/service.md "Job lifecycle").
export const STAGES = {
  sending: "Sending the request", queued: "Waiting in the queue", planning: "Stage 1: the LLM plans the layout",
  waiting: "Planned; waiting for a render worker", starting: "A render worker took the job",
  loading: "A render worker is loading the model", requeued: "Its worker was lost; queued again",
  per_box: "Stage 2, per-box pass: each object alone in its box", masks: "Stage 2: masks of the objects",
  compose: "Stage 2: the objects composed by their masks",
  final: "Stage 2, final pass: the composed scene", sd: "Plain Stable Diffusion pass", refine: "The SDXL refiner pass",
};

export const state = {
  limits: null,
  key: storedKey(),
  transport: new URLSearchParams(location.search).get("transport") === "poll" ? "poll" : "sse",
  layout: null, undo: [], redo: [], selected: null,
  sessionId: null, turns: [], shownJobId: null, shownView: null,
  running: null, watch: null, previewsSeen: 0,
  blobs: new Map(),  // url -> object URL (images fetched with the API key)
  report: null,
  gallery: { sessions: [], next: 0 },
};
window.studio = state;

export function announce(text) { $("status").textContent = text; } // read by screen readers, not shown

// The buttons that depend on what is going on: a job running, a layout, turns, checked turns.
export function updateButtons() {
  const busy = !!state.running;
  $("plan-button").disabled = busy;
  $("generate-button").disabled = busy;
  $("render-button").disabled = busy || !state.layout;  // an empty layout renders its background
  $("cancel-button").disabled = !busy || state.running === "starting";
  $("undo").disabled = !state.undo.length;
  $("redo").disabled = !state.redo.length;
  const last = state.turns[state.turns.length - 1];
  $("instruct-button").disabled = busy || !last || last.state !== "succeeded";
  $("compare-button").disabled = document.querySelectorAll("#timeline input:checked").length !== 2;
}
