// Turns and compare: the session's timeline (GET /sessions/{id}), opening a turn, comparing two.
import { blobURL, getJSON } from "./api.js";
import { setAddress } from "./address.js";
import { colorsOf, placeBox } from "./editor.js";
import { showError } from "./messages.js";
import { openJob } from "./render.js";
import { $, state, updateButtons } from "./state.js";

// Read the session's turns and draw the timeline; the session view, or null when it cannot be read.
export async function refreshSession() {
  if (!state.sessionId) return null;
  let session;
  try {
    session = await getJSON(`/sessions/${state.sessionId}?limit=100`);
    state.turns = session.turns;
  } catch (err) { showError(err); return null; }
  const list = $("timeline");
  list.replaceChildren(...state.turns.map(turnItem));
  markCurrentTurn();
  updateButtons();
  return session;
}

export function thumbnail(layout, imageUrl, emptyText) {
  if (imageUrl) {
    const img = document.createElement("img");
    img.alt = "";
    blobURL(imageUrl).then((u) => { img.src = u; }).catch(() => {});
    return img;
  }
  const thumb = document.createElement("div");
  if (layout) {  // a plan: its layout in miniature
    thumb.className = "thumb-layout";
    const colors = colorsOf(layout);
    for (const o of layout.objects) {
      const b = document.createElement("span");
      b.style.setProperty("--c", colors.get(o.id));
      placeBox(b, o.box);
      thumb.append(b);
    }
  } else {
    thumb.className = "thumb-empty";
    thumb.textContent = emptyText;
  }
  return thumb;
}

function turnItem(t) {
  const li = document.createElement("li");
  li.className = "turn";
  li.dataset.jobId = t.job_id;
  const button = document.createElement("button");
  button.type = "button";
  button.setAttribute("aria-label", `Show turn ${t.turn}: ${t.text} (${t.state || "expired"})`);
  const rendered = t.state === "succeeded" && t.kind !== "plan";
  const thumb = thumbnail(t.state === "succeeded" ? t.layout : null, rendered ? `/jobs/${t.job_id}/image` : null, t.state || "expired");
  const text = document.createElement("span");
  text.className = `text state-${t.state}`;
  text.textContent = `${t.turn}. ${t.text}`;
  button.append(thumb, text);
  button.addEventListener("click", () => openTurn(t));
  const check = document.createElement("label");
  check.className = "check";
  const box = document.createElement("input");
  box.type = "checkbox";
  box.setAttribute("aria-label", `Compare turn ${t.turn}`);
  box.disabled = !rendered;
  box.addEventListener("change", updateButtons);
  check.append(box, " compare");
  li.append(button, check);
  return li;
}

export function markCurrentTurn() {
  document.querySelectorAll("#timeline .turn").forEach((li) => li.classList.toggle("current", li.dataset.jobId === state.shownJobId));
}

// Open a turn: the address names it (push: a new history entry), the page shows it.
export async function openTurn(t, { push = true } = {}) {
  if (push) setAddress(state.sessionId, t.turn);
  try {
    await openJob(await getJSON(`/jobs/${t.job_id}`));
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
    $("swipe-label-a").textContent = `◀ Turn ${ta.turn}`;
    $("swipe-label-b").textContent = `Turn ${tb.turn} ▶`;
    $("compare").hidden = false;
    showCompareMode();
  } catch (err) { showError(err); }
}

function showCompareMode() {
  const slider = $("compare-slider").checked;
  $("compare-side").hidden = slider;
  $("compare-swipe").hidden = !slider;
}

// The slider: turn A left of the divider, turn B right of it.
function swipe() {
  const at = $("swipe-range").value;
  $("swipe-clip").style.clipPath = `inset(0 0 0 ${at}%)`;
  $("swipe-divider").style.left = `${at}%`;
}

export function setupTurns() {
  $("compare-button").addEventListener("click", compare);
  $("compare-slider").addEventListener("change", showCompareMode);
  $("swipe-range").addEventListener("input", swipe);
}
