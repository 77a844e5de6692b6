// The layout editor: boxes drawn in % of a canvas at the image's aspect ratio; drag, resize, draw,
// keyboard editing, phrases, background and negative prompt, undo and redo.
import { size } from "./form.js";
import { $, announce, state, updateButtons } from "./state.js";

const NUDGE = 0.01, MIN_SIDE = 0.02;
const PALETTE = ["#2456c7", "#c7362f", "#1f8a4c", "#b86e00", "#7a3fc2", "#0f7f8c", "#c2367a", "#5c6b00"];

// Colours distinct within a layout: each object its id's palette colour when still free, else the
// next free one; past the palette, hues a golden angle apart. An object keeps its colour through
// edits of the others as long as it does not collide.
export function colorsOf(layout) {
  const colors = new Map();
  const used = new Set();
  for (const [index, o] of ((layout && layout.objects) || []).entries()) {
    let h = 0;
    for (const ch of o.id) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
    let color = null;
    for (let k = 0; k < PALETTE.length && color === null; k++) {
      const candidate = PALETTE[(h + k) % PALETTE.length];
      if (!used.has(candidate)) color = candidate;
    }
    color = color || `hsl(${Math.round((index * 137.508) % 360)} 70% 38%)`;
    used.add(color);
    colors.set(o.id, color);
  }
  return colors;
}

const snapshot = () => JSON.stringify(state.layout);
const round3 = (v) => Math.round(v * 1000) / 1000;
const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

// layout null: no layout (the editor shows its empty message).
export function setLayout(layout, { keepHistory = false } = {}) {
  if (keepHistory && state.layout) commit(snapshot());
  else if (!keepHistory) { state.undo = []; state.redo = []; }
  state.layout = layout ? JSON.parse(JSON.stringify(layout)) : null;
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

export function placeBox(el, box) {
  const [x0, y0, x1, y1] = box;
  Object.assign(el.style, { left: `${x0 * 100}%`, top: `${y0 * 100}%`, width: `${(x1 - x0) * 100}%`, height: `${(y1 - y0) * 100}%` });
}

// A box with its label, as the editor and the result's overlay draw it.
export function boxElement(o, color) {
  const el = document.createElement("div");
  el.className = "box";
  el.dataset.id = o.id;
  el.tabIndex = 0;
  el.style.setProperty("--c", color);
  placeBox(el, o.box);
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = `${o.id}: ${o.phrase}`;
  el.append(label);
  return el;
}

export function renderEditor() {
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
  $("objects-empty").hidden = !has || state.layout.objects.length > 0;
  if (!has) { updateButtons(); return; }
  const L = state.layout;
  const colors = colorsOf(L);
  for (const o of L.objects) {
    const el = boxElement(o, colors.get(o.id));
    if (o.id === state.selected) el.classList.add("selected");
    el.setAttribute("role", "button");
    el.setAttribute("aria-roledescription", "box");
    el.setAttribute("aria-label", boxText(o));
    const handle = document.createElement("div");
    handle.className = "handle";
    handle.setAttribute("aria-hidden", "true");
    el.append(handle);
    el.addEventListener("keydown", onBoxKey);
    el.addEventListener("focus", () => select(o.id, false));
    editor.append(el);
    $("objects").append(objectRow(o, colors.get(o.id)));
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

function objectRow(o, color) {
  const li = document.createElement("li");
  const head = document.createElement("div");
  head.className = "row";
  const swatch = document.createElement("span");
  swatch.className = "swatch";
  swatch.style.setProperty("--c", color);
  const lab = document.createElement("label");
  const input = document.createElement("input");
  input.type = "text";
  input.id = `phrase-${o.id}`;
  input.value = o.phrase;
  input.maxLength = 200;
  lab.htmlFor = input.id;
  lab.textContent = `Phrase of ${o.id}`;
  head.append(swatch, lab);
  input.addEventListener("change", () => {
    const text = input.value.trim();
    if (!text) { input.value = o.phrase; return; }
    mutate(() => { findObject(o.id).phrase = text; });
  });
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "Remove";
  remove.setAttribute("aria-label", `Remove ${o.id}`);
  remove.addEventListener("click", () => removeObject(o.id));
  const row = document.createElement("div");
  row.className = "row";
  row.append(input, remove);
  li.append(head, row);
  return li;
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

// The layout as a request sends it: ids, phrases, boxes, background, negative (no warnings).
export function requestLayout() {
  const L = state.layout;
  return { objects: L.objects.map((o) => ({ id: o.id, phrase: o.phrase, box: o.box })), background: L.background, negative: L.negative };
}

export function setupEditor() {
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
