// The API client: every call the page makes goes through here (docs/service.md), with the key in a header.
import { askKey, showAlert } from "./messages.js";
import { TERMINAL, sleep, state } from "./state.js";

export class ApiError extends Error {
  constructor(status, message, detail, retryAfter) { super(message); this.status = status; this.detail = detail; this.retryAfter = retryAfter; }
}

function authHeaders() { return state.key ? { Authorization: `Bearer ${state.key}` } : {}; }

function fieldOf(d) { return Array.isArray(d.loc) ? d.loc.filter((p) => p !== "body").join(".") : ""; }

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

export async function api(method, path, body) {
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
export const getJSON = async (path) => (await api("GET", path)).json();
export const postJSON = async (path, body) => (await api("POST", path, body)).json();

// An image fetched with the key (an <img src> cannot send a header), as a blob URL kept for the page's life.
export async function blobURL(path) {
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

// Follow a job to its end; onView(view) on every change. Events first, polling when they fail.
// A new watch stops the one before (the page follows one job at a time).
export async function watchJob(jobId, onView) {
  if (state.watch) state.watch.abort();
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
      if (controller.signal.aborted) throw new DOMException("stopped", "AbortError");
      if (!last || JSON.stringify(view.progress) !== JSON.stringify(last.progress) || view.state !== last.state
          || view.notice !== last.notice) onView(view);
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
