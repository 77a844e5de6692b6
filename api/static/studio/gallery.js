// The gallery: this API key's sessions (GET /sessions), latest first, a page at a time; each opens
// its latest turn (sessions made with curl too).
import { getJSON } from "./api.js";
import { restoreAddress, setAddress } from "./address.js";
import { showError } from "./messages.js";
import { $, state } from "./state.js";
import { thumbnail } from "./turns.js";

const PAGE = 12;

function card(s) {
  const li = document.createElement("li");
  li.className = "turn session";
  li.dataset.sessionId = s.session_id;
  const link = document.createElement("a");
  link.href = `?session=${encodeURIComponent(s.session_id)}${s.latest ? `&turn=${s.latest.turn}` : ""}`;
  const latest = s.latest || {};
  link.setAttribute("aria-label", `Open session: ${s.prompt} (${s.total_turns} turns, latest ${latest.state || "expired"})`);
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = s.prompt || "(no prompt)";
  const meta = document.createElement("span");
  meta.className = "text meta";
  meta.textContent = `${s.total_turns} turn${s.total_turns === 1 ? "" : "s"} · ${new Date(s.updated_at).toLocaleString()}`;
  link.append(thumbnail(latest.layout, s.thumbnail_url, latest.state || "expired"), text, meta);
  link.addEventListener("click", (e) => {
    e.preventDefault();
    setAddress(s.session_id, latest.turn || 1);
    restoreAddress();
  });
  li.append(link);
  return li;
}

// Read the first page again (after a new turn ended, or a key was entered); "more" appends the next one.
export async function refreshGallery({ more = false } = {}) {
  const offset = more ? state.gallery.next : 0;
  let page;
  try {
    page = await getJSON(`/sessions?offset=${offset}&limit=${PAGE}`);
  } catch (err) {
    if (err.status !== 401) showError(err);
    return;
  }
  state.gallery.sessions = more ? [...state.gallery.sessions, ...page.sessions] : page.sessions;
  state.gallery.next = page.next_offset;
  $("gallery").replaceChildren(...state.gallery.sessions.map(card));
  $("gallery-empty").hidden = state.gallery.sessions.length > 0;
  $("gallery-more").hidden = page.next_offset === null;
  $("gallery-count").textContent = `${page.total} session${page.total === 1 ? "" : "s"}`;
}

export function setupGallery() {
  $("gallery-more").addEventListener("click", () => refreshGallery({ more: true }));
}
