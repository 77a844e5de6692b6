// The page's address carries where the user is: ?session=<id>&turn=<n>. Reload, back/forward and a
// shared link open that turn again (a running job's progress included); the rest of the query
// (transport=poll) is kept.
import { setLayout } from "./editor.js";
import { showAlert } from "./messages.js";
import { $, state, updateButtons } from "./state.js";
import { openTurn, refreshSession } from "./turns.js";

export function setAddress(sessionId, turn, { replace = false } = {}) {
  const query = new URLSearchParams(location.search);
  if (query.get("session") === sessionId && query.get("turn") === String(turn)) return;
  query.set("session", sessionId);
  query.set("turn", String(turn));
  history[replace ? "replaceState" : "pushState"]({ sessionId, turn }, "", `${location.pathname}?${query}`);
}

// An address without a session: a fresh page (a new prompt starts a new session).
function clearSession() {
  if (state.watch) state.watch.abort();
  Object.assign(state, { sessionId: null, turns: [], shownJobId: null, running: null });
  $("timeline").replaceChildren();
  $("result").hidden = true;
  $("progress-wrap").hidden = true;
  $("compare").hidden = true;
  setLayout(null);
  updateButtons();
}

// Show what the address names.
export async function restoreAddress() {
  const query = new URLSearchParams(location.search);
  const sessionId = query.get("session");
  if (!sessionId) { clearSession(); return; }
  if (state.watch) state.watch.abort();
  state.running = null;
  state.sessionId = sessionId;
  $("compare").hidden = true;
  const session = await refreshSession();
  if (!session) return;
  if (!session.turns.length) { showAlert("This session has no turns yet.", "info"); return; }
  const wanted = Number(query.get("turn"));
  const turn = session.turns.find((t) => t.turn === wanted) || session.turns[session.turns.length - 1];
  const first = session.turns[0];
  if (first.kind !== "instruct") $("prompt").value = first.text;
  await openTurn(turn, { push: false });
}

export function setupAddress() {
  window.addEventListener("popstate", () => { restoreAddress(); });
}
